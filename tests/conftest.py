"""Shared fixtures: tiny params on temporary stores, and one local Ray per test session."""

from __future__ import annotations

import os

import pytest

from genflow.config import load_params

# Ray Train's fixed costs, which every Ray Train run of the suite pays (set before Ray starts; the
# processes tests start, `dvc repro`'s stages and the submit tests' Ray head, inherit them):
# - its controller polls the workers every 2 s by default, so a run's end, a worker's crash and
#   a report each wait up to one interval to be seen; 0.2 s keeps each a fraction of a second.
#   (genflow's Ctrl+C grace, two intervals, follows: genflow/train/interrupt.py.)
# - a preemption watcher (one more Ray process per worker-group start, on 2 shared cores) stands
#   by for a cluster's node drains, which a one-machine test never has.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

TINY_VAE = [
    "models.vae.hidden_channels=[8,16,32,32]",
    "models.vae.latent_dim=8",
    "models.vae.norm_groups=4",
]


@pytest.fixture
def tiny_params(tmp_path):
    """Params for a tiny VAE, with the MLflow store and Ray storage in tmp_path."""

    def make(*overrides: str):
        base = [
            *TINY_VAE,
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"train.storage_path={tmp_path}/ray",
            f"data.shards={tmp_path}/shards",
            "train.batch_size=8",
            "train.log_every=1",
            "train.max_failures=0",
        ]
        return load_params(tmp_path / "no-params.yaml", base + list(overrides))

    return make


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: starting Ray costs seconds each time."""
    import ray

    from genflow.config import RayParams
    from genflow.train.trainer import ensure_ray

    ensure_ray(RayParams())
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _tracking_uri_stays_with_its_test():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which genflow's params then obey: a test
    that sets it (by hand or through code) would move every later test's runs to its store."""
    from mlflow.tracking._tracking_service import utils

    before_uri, before_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if utils._tracking_uri != before_uri:
        utils.set_tracking_uri(before_uri)  # None unsets the variable too
    if before_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before_env


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server (moto's server mode) on loopback for the whole session: its URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A new bucket on the session's S3 server, and the standard AWS variables of this process
    pointing at it (as a user sets them for an S3-compatible store): "s3://BUCKET"."""
    import uuid

    import boto3

    from genflow.storage import STORAGE_ENV_VARS

    for name in STORAGE_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "genflow-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "genflow-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"genflow-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"
