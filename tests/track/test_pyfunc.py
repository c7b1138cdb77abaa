"""The logged pyfunc: its signature lets through every column `predict` reads; sampler options pass
through to families that take them, and are a clear error for families that do not."""

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from genflow.models.ddpm import DDPM, DDPMConfig
from genflow.models.saved import save_model
from genflow.models.vae import VAE, VAEConfig
from genflow.track.pyfunc import GenerativeSampler, log_sampler, sampler_options, signature
from tests.models.tiny import TINY_CONFIGS


class RecordingModel:
    """Stands in for a conditional family: records the condition `sample` receives."""

    def __init__(self):
        self.conds = []

    def sample(self, n, cond=None, generator=None):
        self.conds.append(cond)
        return torch.zeros(n, 3, 64, 64, dtype=torch.uint8)


@pytest.mark.slow
def test_pyfunc_signature_keeps_the_optional_attrs_column(tmp_path, monkeypatch):
    # Issue 8 #12: MLflow drops input columns the signature does not name, so `attrs` never
    # reached predict and a conditional model could not be conditioned through the pyfunc.
    # set_tracking_uri exports MLFLOW_TRACKING_URI, which genflow's params then obey: scoped to
    # this test, or every later test's commands would talk to this store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
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


def sampler_for(model) -> GenerativeSampler:
    wrapper = GenerativeSampler()
    wrapper.model = model.eval()
    return wrapper


def test_predict_passes_sampler_options_and_fills_absent_ones_with_the_defaults():
    torch.manual_seed(0)
    model = DDPM(DDPMConfig(**TINY_CONFIGS["ddpm"]))
    with torch.no_grad():
        model.ema.head[-1].weight.normal_(0, 0.05)  # ε̂ depends on the input, so samplers differ
    wrapper = sampler_for(model)
    # Two requests in one frame: one chooses ddim with η = 1, one leaves the options empty (NaN/None).
    frame = pd.DataFrame({"n": [2, 2], "seed": [0, 0], "sampler": ["ddim", None], "steps": [4, np.nan], "eta": [1.0, np.nan]})
    images = wrapper.predict(None, frame)
    chosen = model.sample(2, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=4, eta=1.0)
    default = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(images[:2], chosen.numpy()) and np.array_equal(images[2:], default.numpy())
    assert not np.array_equal(images[:2], images[2:])
    with pytest.raises(ValueError, match="ddpm sampler runs all T"):
        wrapper.predict(None, pd.DataFrame({"n": [1], "seed": [0], "sampler": ["ddpm"], "steps": [4]}))


def test_sampler_options_for_a_family_without_them_are_a_clear_error():
    vae = VAE(VAEConfig(**TINY_CONFIGS["vae"]))
    assert sampler_options(vae, sampler=None, steps=float("nan")) == {}
    with pytest.raises(ValueError, match="VAE samples without sampler, steps: it takes no sampler options"):
        sampler_options(vae, sampler="ddim", steps=50)
    with pytest.raises(ValueError, match="samples without eta"):
        sampler_for(vae).predict(None, pd.DataFrame({"n": [1], "seed": [0], "eta": [0.0]}))


def test_signature_lists_the_optional_sampler_columns():
    inputs = {spec.name: spec for spec in signature(64).inputs.inputs}
    assert [inputs[name].required for name in ("n", "seed", "sampler", "steps", "eta")] == [True, True, False, False, False]
