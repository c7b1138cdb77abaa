"""Shared fixtures: tiny params on temporary stores, and one local Ray per test session."""

from __future__ import annotations

import os

import pytest

from genflow.config import load_params
from genflow.storage import STORE_SETTINGS

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
def ray_local(s3_endpoint):
    """One local Ray for the whole session: starting Ray costs seconds each time.

    Its processes have the session's S3 server and its credentials in their environment, as a
    Ray cluster's nodes have their own (genflow passes no credentials on: genflow/storage.py);
    this process gets them only while Ray starts, and each test that uses the store sets them
    itself (s3_bucket)."""
    import ray

    from genflow.config import RayParams
    from genflow.train.trainer import ensure_ray

    with pytest.MonkeyPatch.context() as starting:  # Ray's processes inherit the environment it starts in
        for name in S3_VARIABLES:
            starting.delenv(name, raising=False)
        for name, value in s3_node_env(s3_endpoint).items():
            starting.setenv(name, value)
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


# Every variable that says which S3 store or whose credentials (genflow/storage.py): the tests'
# own values replace a user's.
S3_VARIABLES = (*STORE_SETTINGS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
S3_SECRET = "genflow-test-secret"  # what no object in the store may hold (tests/tune/test_search.py)


def s3_node_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that reach the session's S3 server, as a user sets them for an
    S3-compatible store."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "genflow-test", "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch):
    """A new bucket on the session's S3 server, and the standard AWS variables of this process
    pointing at it (the same as ray_local's processes have): "s3://BUCKET"."""
    import uuid

    import boto3

    for name in S3_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_node_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    bucket = f"genflow-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


def objects_holding(location: str, secret: str) -> list[str]:
    """The objects under `location` (a URI) whose bytes hold `secret`."""
    from genflow import storage

    found = []
    for name, is_folder in storage.listdir(location):
        inside = storage.join(location, name)
        if is_folder:
            found += objects_holding(inside, secret)
        elif secret.encode() in storage.read_bytes(inside):
            found.append(inside)
    return found
