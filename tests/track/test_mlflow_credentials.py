"""MLflow credentials never travel in a Ray runtime_env (the Ray dashboard shows it to anyone): only
their names do, and a process that lacks them fails at once, saying what to set on the nodes."""

import socket
from types import SimpleNamespace

import pytest

from genflow.config import TrackingParams
from genflow.track.mlflow import CREDENTIALS, CREDENTIALS_NEEDED, TrackingError, configure, worker_env
from genflow.train import loop


@pytest.fixture
def no_credentials(monkeypatch):
    for name in (*CREDENTIALS, CREDENTIALS_NEEDED):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_workers_env_names_the_drivers_credentials_without_their_values(no_credentials):
    assert worker_env("http://mlflow:5000") == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    no_credentials.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    no_credentials.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-password")
    env = worker_env("http://mlflow:5000")
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000",
                   CREDENTIALS_NEEDED: "MLFLOW_TRACKING_PASSWORD,MLFLOW_TRACKING_USERNAME"}


def test_a_worker_without_the_credentials_the_driver_uses_fails_naming_what_to_set_on_the_nodes(no_credentials):
    # What a worker on a node without the cluster's secret sees: the names, not the values.
    no_credentials.setenv(CREDENTIALS_NEEDED, "MLFLOW_TRACKING_PASSWORD,MLFLOW_TRACKING_USERNAME")
    no_credentials.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    context = SimpleNamespace(get_world_rank=lambda: 1, get_world_size=lambda: 2, get_local_rank=lambda: 0,
                              get_node_rank=lambda: 1)
    no_credentials.setattr(loop.ray.train, "get_context", lambda: context)
    no_credentials.setattr(loop, "train_rank", lambda *args: pytest.fail("trained without credentials"))
    with pytest.raises(TrackingError) as refused:
        loop.train_worker(SimpleNamespace())
    message = str(refused.value)
    assert message.startswith(f"Ray Train worker 1 on {socket.gethostname()} has no MLFLOW_TRACKING_PASSWORD, ")
    assert "on every node of the Ray cluster" in message and "infra/" in message
    no_credentials.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-password")
    trained = []
    no_credentials.setattr(loop, "train_rank", lambda *args: trained.append(args))
    loop.train_worker(SimpleNamespace(train=SimpleNamespace(system_metrics_every=0, gpu=False), tracking_uri="",
                                       mlflow_run_id=""))
    assert trained


def test_a_job_driver_without_them_fails_before_it_touches_the_store(no_credentials, tmp_path):
    no_credentials.setenv(CREDENTIALS_NEEDED, "MLFLOW_TRACKING_TOKEN")
    with pytest.raises(TrackingError, match=r"this process \(on .*\) has no MLFLOW_TRACKING_TOKEN, which the MLflow"):
        configure(TrackingParams(uri=f"sqlite:///{tmp_path}/mlflow.db"))
    assert not (tmp_path / "mlflow.db").exists()
