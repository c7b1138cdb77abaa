"""System metrics from the machines that train: one MLflow SystemMetricsMonitor per node.

The local rank 0 worker of each node (genflow/train/loop.py) samples that node's CPU, memory,
disk and network use, and its GPUs' (utilisation, memory, power: through `nvidia-ml-py`, where
NVML finds a driver; NVML sees every GPU of the machine or container, whatever CUDA_VISIBLE_DEVICES
Ray gives the worker), into the run it trains: `system/NODE/cpu_utilization_percentage`,
`system/NODE/gpu_0_utilization_percentage`, ... NODE is `node<rank>-<host>`: Ray Train's node
rank and the machine's host name (a Kubernetes pod's, an EC2 instance's), so a slow node is
found by name. The driver logs none (on a cluster it is the CPU head, which trains nothing).

MLflow's monitor is the library's own; genflow chooses where it runs, how often it samples
(`train.system_metrics_every` seconds, 0 = none) and that it stops when the worker's loop ends,
however it ends.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from typing import Iterator

import genflow  # noqa: F401  (telemetry off before mlflow loads)


def node_id(node_rank: int, host: str | None = None) -> str:
    """The node's part of its metric names: `node0-gpu-worker-7f9c` (characters MLflow refuses in
    a metric name become `_`)."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", host or socket.gethostname())
    return f"node{node_rank}-{host}"


@contextlib.contextmanager
def node_system_metrics(tracking_uri: str, run_id: str, node: str, every_s: float) -> Iterator[object | None]:
    """Sample this node's system metrics into run `run_id` every `every_s` seconds (none when 0)
    while the block runs; the sampling thread is stopped, and what it sampled written, when the
    block ends, also by an exception. Yields the monitor (None when off)."""
    if not every_s:
        yield None
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its INFO lines ("Skip logging GPU metrics...", "Started monitoring...") would repeat on every
    # node's console; a machine without a GPU or an NVIDIA driver simply has no GPU metrics.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    # resume_logging: a resumed run's samples continue after those of its earlier attempt.
    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=True, node_id=node,
                                   tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.finish()
