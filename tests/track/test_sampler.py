"""The registered model's PythonModel: sampler options pass through to families that take them, and
are a clear error for families that do not."""

import numpy as np
import pandas as pd
import pytest
import torch

from genflow.models.ddpm import DDPM, DDPMConfig
from genflow.models.vae import VAE, VAEConfig
from genflow.track.sampler import GenerativeSampler, sampler_options
from tests.models.tiny import TINY_CONFIGS


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
