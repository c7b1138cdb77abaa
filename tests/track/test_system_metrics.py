"""Each node's system metrics, from the worker that trains there: sampled into the run under the
node's name, and stopped when the worker's loop ends, also when it fails."""

import socket
import threading
import time
from types import SimpleNamespace

import mlflow
import pytest

from genflow.config import TrainParams
from genflow.track.system_metrics import node_id, node_system_metrics
from genflow.train import loop


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, experiment id): one SQLite store for the module (making one takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('system')}/mlflow.db"
    return uri, mlflow.MlflowClient(uri).create_experiment("system")


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def test_the_node_id_names_the_node_rank_and_the_host_in_characters_mlflow_takes():
    assert node_id(3, "gpu-worker-7f9c.cluster.local") == "node3-gpu-worker-7f9c.cluster.local"
    assert node_id(0, "odd host:name") == "node0-odd_host_name"
    assert node_id(1) == f"node1-{socket.gethostname()}".replace(":", "_").replace(" ", "_")


def test_the_node_monitor_stops_and_keeps_its_samples_when_the_workers_loop_raises(store, monkeypatch, capfd):
    uri, experiment_id = store
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(experiment_id).info.run_id
    context = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1, get_local_rank=lambda: 0,
                              get_node_rank=lambda: 0)
    monkeypatch.setattr(loop.ray.train, "get_context", lambda: context)

    def setup_that_fails(config, rank, world_size):
        time.sleep(1.0)  # a few samples' time
        raise RuntimeError("the loop failed")

    monkeypatch.setattr(loop, "setup", setup_that_fails)
    config = SimpleNamespace(train=TrainParams(system_metrics_every=0.1), tracking_uri=uri, mlflow_run_id=run_id)
    with pytest.raises(RuntimeError, match="the loop failed"):
        loop.train_worker(config)
    assert not monitor_threads()
    # What it sampled before the failure is in the run, under this node's name.
    metrics = client.get_run(run_id).data.metrics
    assert f"system/{node_id(0)}/cpu_utilization_percentage" in metrics
    assert not [key for key in metrics if not key.startswith(f"system/{node_id(0)}/")]
    # No GPU here (or no NVIDIA driver): no GPU metrics, and nothing said about it on the console.
    assert not [key for key in metrics if "/gpu_" in key] and "GPU" not in capfd.readouterr().err


def test_a_node_with_an_nvidia_gpu_logs_its_gpu_metrics_through_nvml(store, monkeypatch):
    import pynvml  # nvidia-ml-py, which MLflow's GPU monitor reads; NVML itself is faked here

    fake = {
        "nvmlInit": lambda: None, "nvmlDeviceGetCount": lambda: 1, "nvmlDeviceGetHandleByIndex": lambda i: f"gpu{i}",
        "nvmlDeviceGetMemoryInfo": lambda handle: SimpleNamespace(used=2e9, total=8e9),
        "nvmlDeviceGetUtilizationRates": lambda handle: SimpleNamespace(gpu=42),
        "nvmlDeviceGetPowerUsage": lambda handle: 100_000, "nvmlDeviceGetEnforcedPowerLimit": lambda handle: 400_000,
    }
    for name, function in fake.items():
        monkeypatch.setattr(pynvml, name, function)
    uri, experiment_id = store
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(experiment_id).info.run_id
    with node_system_metrics(uri, run_id, "node1-gpuhost", every_s=0.1):
        time.sleep(0.5)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["system/node1-gpuhost/gpu_0_utilization_percentage"] == 42
    assert metrics["system/node1-gpuhost/gpu_0_memory_usage_percentage"] == 25
    assert metrics["system/node1-gpuhost/gpu_0_power_usage_watts"] == 100


def test_only_each_nodes_local_rank_0_samples(store, monkeypatch):
    uri, experiment_id = store
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(experiment_id).info.run_id
    context = SimpleNamespace(get_world_rank=lambda: 1, get_world_size=lambda: 2, get_local_rank=lambda: 1,
                              get_node_rank=lambda: 0)
    monkeypatch.setattr(loop.ray.train, "get_context", lambda: context)
    seen = []
    monkeypatch.setattr(loop, "train_rank", lambda config, rank, world_size: seen.append(monitor_threads()))
    config = SimpleNamespace(train=TrainParams(system_metrics_every=0.1), tracking_uri=uri, mlflow_run_id=run_id)
    loop.train_worker(config)
    assert seen == [[]]
