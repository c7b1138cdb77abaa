"""The logged pyfunc: its signature lets through every column `predict` reads."""

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from genflow.models.saved import save_model
from genflow.models.vae import VAE, VAEConfig
from genflow.track.pyfunc import log_sampler
from tests.models.tiny import TINY_CONFIGS

pytestmark = pytest.mark.slow


class RecordingModel:
    """Stands in for a conditional family: records the condition `sample` receives."""

    def __init__(self):
        self.conds = []

    def sample(self, n, cond=None, generator=None):
        self.conds.append(cond)
        return torch.zeros(n, 3, 64, 64, dtype=torch.uint8)


def test_pyfunc_signature_keeps_the_optional_attrs_column(tmp_path):
    # Issue 8 #12: MLflow drops input columns the signature does not name, so `attrs` never
    # reached predict and a conditional model could not be conditioned through the pyfunc.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("pyfunc", artifact_location=(tmp_path / "artifacts").as_uri())
    save_model(tmp_path / "model.pt", "vae", VAE(VAEConfig(**TINY_CONFIGS["vae"])))
    with mlflow.start_run(experiment_id=experiment):
        info = log_sampler(tmp_path / "model.pt", 64)
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    assert loaded.predict(pd.DataFrame({"n": [2], "seed": [0]})).shape == (2, 3, 64, 64)  # attrs is optional

    recorder = RecordingModel()
    loaded.unwrap_python_model().model = recorder
    attrs = [float(i % 2) for i in range(40)]
    loaded.predict(pd.DataFrame({"n": [3], "seed": [0], "attrs": [attrs]}))
    (cond,) = recorder.conds
    assert cond is not None and cond.shape == (3, 40)
    assert np.array_equal(cond[0].numpy(), np.array(attrs, dtype=np.float32))
