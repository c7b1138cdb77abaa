"""System metrics from the machines that train: one MLflow SystemMetricsMonitor per node.

The local rank 0 worker of each node (genflow/train/loop.py) samples that node's CPU, memory,
disk and network use, and the GPUs the run holds there (utilisation, memory, power: through
`nvidia-ml-py`, where NVML finds a driver), into the run it trains:
`system/NODE/cpu_utilization_percentage`, `system/NODE/gpu_0_utilization_percentage`, ...

NVML sees every GPU of the machine, also those that Ray gave to other trials sharing the node; the
run's own are those in CUDA_VISIBLE_DEVICES, which Ray Train sets, on each node, to the GPUs of all
the run's workers there (the union, sorted: ray/train/v2/_internal/callbacks/accelerators.py;
with TRAIN_ENABLE_SHARE_CUDA_VISIBLE_DEVICES=0 each worker has only its own, and the node's first
worker logs only that). So `gpu_I` is the run's CUDA device I on that node (`cuda:I` in its
workers), and a run that trains on CPUs logs no GPU metrics. NODE is `node<rank>-<host>`: Ray Train's node
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
def node_system_metrics(tracking_uri: str, run_id: str, node: str, every_s: float,
                        gpus: list[str] | None = None) -> Iterator[object | None]:
    """Sample this node's system metrics into run `run_id` every `every_s` seconds (none when 0)
    while the block runs; the sampling thread is stopped, and what it sampled written, when the
    block ends, also by an exception. `gpus`: the GPUs of the run on this node, as
    CUDA_VISIBLE_DEVICES lists them (held_gpus); None: every GPU NVML sees. Yields the monitor
    (None when off)."""
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
    if gpus is not None:
        _only_these_gpus(monitor, gpus)
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.finish()


def held_gpus(use_gpu: bool, visible: str | None) -> list[str] | None:
    """The GPUs a worker's run holds on its node: CUDA_VISIBLE_DEVICES's entries (`visible`), none
    when the run trains on CPUs (Ray may still leave the variable unset then), and None (all of
    them) when a GPU run has the variable unset (outside Ray: the process sees every GPU)."""
    if not use_gpu:
        return []
    if visible is None:
        return None
    return [entry.strip() for entry in visible.split(",") if entry.strip()]


def _only_these_gpus(monitor, gpus: list[str]) -> None:
    """Point the monitor's NVML sampler at `gpus` alone (CUDA_VISIBLE_DEVICES entries), in that
    order; drop it when there are none, or when NVML finds no GPU an entry names: metrics are not
    worth a failed training run, so that is a warning on the worker's log."""
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    for sampler in [m for m in monitor.monitors if isinstance(m, GPUMonitor)]:
        handles = []
        if gpus:
            import pynvml

            try:
                handles = [_nvml_handle(gpu) for gpu in gpus]
            except (pynvml.NVMLError, LookupError) as unknown:
                logging.getLogger(__name__).warning(
                    "genflow: no GPU metrics on this node: NVML finds no GPU for CUDA_VISIBLE_DEVICES=%s (%s)",
                    ",".join(gpus), unknown)
        if not handles:
            monitor.monitors.remove(sampler)
            continue
        sampler.gpu_handles = handles
        sampler.num_gpus = len(handles)


def _nvml_handle(entry: str):
    """NVML's handle of the GPU that a CUDA_VISIBLE_DEVICES entry names, in the forms CUDA takes: an
    index (nvidia-smi's, which is NVML's: Ray writes the node's own entries there, e.g. 2,3 for its
    GPUs 0,1 on a node started under CUDA_VISIBLE_DEVICES=2,3), a GPU-/MIG- UUID, or a GPU UUID's
    unique prefix (`GPU-8932f937`)."""
    import pynvml

    if entry.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(entry))
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(entry)
    except pynvml.NVMLError:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        named = [handle for handle in handles if pynvml.nvmlDeviceGetUUID(handle).startswith(entry)]
        if len(named) != 1:
            raise LookupError(f"{entry!r} is the start of {len(named)} GPUs' UUIDs") from None
        return named[0]
