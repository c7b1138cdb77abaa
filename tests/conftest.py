"""Shared fixtures: tiny params on temporary stores, and one local Ray per test session."""

from __future__ import annotations

import os

import pytest

from genflow.config import load_params

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
