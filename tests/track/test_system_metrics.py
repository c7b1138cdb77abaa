"""Each node's system metrics, from the worker that trains there: sampled into the run under the
node's name, and stopped when the worker's loop ends, also when it fails."""

import socket
import threading
import time
from types import SimpleNamespace

import mlflow
import pytest

from genflow.config import TrainParams
from genflow.track.system_metrics import held_gpus, node_id, node_system_metrics
from genflow.train import loop


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking URI, experiment id): one SQLite store for the module (making one takes seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('system')}/mlflow.db"
    return uri, mlflow.MlflowClient(uri).create_experiment("system")


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]


def worker_of_a_run(store, monkeypatch, rank: int, world_size: int):
    """(client, config) of a Train worker of a new run, on node 0 (its local rank is `rank`), with
    Ray Train's context stood in for and system metrics sampled every 0.1 s."""
    uri, experiment_id = store
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(experiment_id).info.run_id
    context = SimpleNamespace(get_world_rank=lambda: rank, get_world_size=lambda: world_size,
                              get_local_rank=lambda: rank, get_node_rank=lambda: 0)
    monkeypatch.setattr(loop.ray.train, "get_context", lambda: context)
    config = SimpleNamespace(train=TrainParams(system_metrics_every=0.1), tracking_uri=uri, mlflow_run_id=run_id)
    return client, config


def test_the_node_id_names_the_node_rank_and_the_host_in_characters_mlflow_takes():
    assert node_id(3, "gpu-worker-7f9c.cluster.local") == "node3-gpu-worker-7f9c.cluster.local"
    assert node_id(0, "odd host:name") == "node0-odd_host_name"
    assert node_id(1) == f"node1-{socket.gethostname()}".replace(":", "_").replace(" ", "_")


def test_the_node_monitor_stops_and_keeps_its_samples_when_the_workers_loop_raises(store, monkeypatch, capfd, four_gpus):
    client, config = worker_of_a_run(store, monkeypatch, rank=0, world_size=1)

    def setup_that_fails(config, rank, world_size):
        time.sleep(1.0)  # a few samples' time
        raise RuntimeError("the loop failed")

    monkeypatch.setattr(loop, "setup", setup_that_fails)
    with pytest.raises(RuntimeError, match="the loop failed"):
        loop.train_worker(config)
    assert not monitor_threads()
    # What it sampled before the failure is in the run, under this node's name.
    metrics = client.get_run(config.mlflow_run_id).data.metrics
    assert f"system/{node_id(0)}/cpu_utilization_percentage" in metrics
    assert not [key for key in metrics if not key.startswith(f"system/{node_id(0)}/")]
    # A CPU run (train.gpu false) on a node with GPUs, which other runs may hold: no GPU metrics,
    # and nothing said about it on the console.
    assert not [key for key in metrics if "/gpu_" in key] and "GPU" not in capfd.readouterr().err


@pytest.fixture
def four_gpus(monkeypatch):
    """NVML faked with four GPUs whose utilisation is 10, 20, 30, 40 %; their handles by index and
    by full UUID (GPU-0aaaaaaa-1111 ... GPU-3aaaaaaa-1111), as NVML has them."""
    import pynvml  # nvidia-ml-py, which MLflow's GPU monitor reads; NVML itself is faked here

    uuids = [f"GPU-{i}aaaaaaa-1111" for i in range(4)]

    def by_index(i):
        if not 0 <= i < 4:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return i

    def by_uuid(uuid):
        if uuid not in uuids:  # NVML takes only a whole UUID
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return uuids.index(uuid)

    fake = {
        "nvmlInit": lambda: None, "nvmlDeviceGetCount": lambda: 4, "nvmlDeviceGetHandleByIndex": by_index,
        "nvmlDeviceGetHandleByUUID": by_uuid, "nvmlDeviceGetUUID": lambda handle: uuids[handle],
        "nvmlDeviceGetMemoryInfo": lambda handle: SimpleNamespace(used=2e9, total=8e9),
        "nvmlDeviceGetUtilizationRates": lambda handle: SimpleNamespace(gpu=10 * (handle + 1)),
        "nvmlDeviceGetPowerUsage": lambda handle: 100_000, "nvmlDeviceGetEnforcedPowerLimit": lambda handle: 400_000,
    }
    for name, function in fake.items():
        monkeypatch.setattr(pynvml, name, function)


def gpu_utilisation(client, run_id: str, node: str) -> dict[str, float]:
    return {key.removeprefix(f"system/{node}/"): value for key, value in client.get_run(run_id).data.metrics.items()
            if key.endswith("utilization_percentage") and "/gpu_" in key}


@pytest.mark.parametrize("held, expected", [
    (None, {"gpu_0": 10, "gpu_1": 20, "gpu_2": 30, "gpu_3": 40}),  # outside Ray: all the process sees
    (["3", "1"], {"gpu_0": 40, "gpu_1": 20}),  # the run's cuda:0 is the node's GPU 3
    (["GPU-2aaaaaaa-1111"], {"gpu_0": 30}),  # CUDA_VISIBLE_DEVICES may name a GPU by UUID
    (["GPU-3", "GPU-0a"], {"gpu_0": 40, "gpu_1": 10}),  # or by its UUID's unique prefix, as CUDA takes it
    ([], {}),  # a CPU run on a GPU node
])
def test_a_node_logs_the_gpus_its_run_holds_there_through_nvml(store, four_gpus, held, expected):
    uri, experiment_id = store
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(experiment_id).info.run_id
    with node_system_metrics(uri, run_id, "node1-gpuhost", every_s=0.1, gpus=held):
        time.sleep(0.5)
    assert gpu_utilisation(client, run_id, "node1-gpuhost") == {f"{gpu}_utilization_percentage": value
                                                                for gpu, value in expected.items()}
    metrics = client.get_run(run_id).data.metrics
    if expected:
        assert metrics["system/node1-gpuhost/gpu_0_memory_usage_percentage"] == 25
        assert metrics["system/node1-gpuhost/gpu_0_power_usage_watts"] == 100
    assert "system/node1-gpuhost/cpu_utilization_percentage" in metrics


@pytest.mark.parametrize("held", [["MIG-GPU-2aaaaaaa-1111/1/0"], ["GPU-"], ["1", "7"]])
def test_a_gpu_nvml_does_not_find_turns_the_gpu_metrics_off_not_the_training(store, four_gpus, held, caplog):
    # CUDA's older MIG form, a prefix of every UUID, an index past the node's GPUs.
    uri, experiment_id = store
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(experiment_id).info.run_id
    with node_system_metrics(uri, run_id, "node1-gpuhost", every_s=0.1, gpus=held):
        time.sleep(0.3)
    assert gpu_utilisation(client, run_id, "node1-gpuhost") == {}
    assert "system/node1-gpuhost/cpu_utilization_percentage" in client.get_run(run_id).data.metrics
    assert f"no GPU metrics on this node: NVML finds no GPU for CUDA_VISIBLE_DEVICES={','.join(held)}" in caplog.text


def test_the_gpus_a_worker_holds_are_its_cuda_visible_devices_and_none_for_a_cpu_run():
    assert held_gpus(True, "2,3") == ["2", "3"]
    assert held_gpus(True, "GPU-5f1c, GPU-77aa") == ["GPU-5f1c", "GPU-77aa"]
    assert held_gpus(True, "") == []
    assert held_gpus(True, None) is None
    assert held_gpus(False, "0,1") == [] and held_gpus(False, None) == []


def test_only_each_nodes_local_rank_0_samples(store, monkeypatch):
    _, config = worker_of_a_run(store, monkeypatch, rank=1, world_size=2)  # node 0's second worker
    seen = []
    monkeypatch.setattr(loop, "train_rank", lambda config, rank, world_size: seen.append(monitor_threads()))
    loop.train_worker(config)
    assert seen == [[]]
