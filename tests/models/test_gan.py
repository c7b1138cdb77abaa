"""dcgan and cgan: the losses against Goodfellow et al.'s formulas, each loss moving only its own
player, the generator EMA, conditioning on attributes, and the Fréchet distance used to measure them."""

import numpy as np
import pytest
import scipy.linalg
import torch

from genflow.config import ParamsError, TrainParams, load_params
from genflow.data.celeba import ATTRIBUTE_NAMES
from genflow.models.gan import (
    CGAN,
    DCGAN,
    CGANConfig,
    DCGANConfig,
    discriminator_loss,
    ema_decay_at,
    frechet_distance,
    generator_loss,
)
from genflow.models.protocol import Batch
from tests.models.direct import protocol_step
from tests.models.tiny import TINY_CONFIGS


def tiny(family: str, **overrides):
    torch.manual_seed(0)
    model_class, config_class = {"dcgan": (DCGAN, DCGANConfig), "cgan": (CGAN, CGANConfig)}[family]
    return model_class(config_class(**{**TINY_CONFIGS[family], **overrides}))


def batch(n: int = 4, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 64, 64, generator=generator) * 2 - 1
    return Batch(images, torch.randint(0, 2, (n, len(ATTRIBUTE_NAMES)), generator=generator).float())


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(module.parameters(), before))


# --- the objective -------------------------------------------------------------------------------


def test_losses_match_goodfellow_et_al_formulas():
    generator = torch.Generator().manual_seed(0)
    real, fake = 3 * torch.randn(64, generator=generator), 3 * torch.randn(64, generator=generator)
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    # Eq. 1 for D, as a loss: −log D(x) − log(1 − D(G(z))); Sec. 3 for G: −log D(G(z)).
    torch.testing.assert_close(discriminator_loss(real, fake), (-torch.log(d_real) - torch.log(1 - d_fake)).mean())
    torch.testing.assert_close(generator_loss(fake), (-torch.log(d_fake)).mean())
    # Stable where the naive form overflows.
    assert torch.isfinite(discriminator_loss(torch.tensor([-200.0]), torch.tensor([200.0])))


@pytest.mark.parametrize("family", ["dcgan", "cgan"])
def test_training_step_losses_are_the_formulas_on_the_models_own_outputs(family, monkeypatch):
    # Eval mode: spectral normalisation's power iteration would otherwise advance at every forward.
    model = tiny(family).eval()
    data = batch()
    z = torch.randn(4, model.config.latent_dim, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(model, "noise", lambda n, device, generator=None: z)
    outputs = model.training_step(data, 0)
    attrs = data.attrs if model.conditional else None
    # Independently: D's probabilities on the reals and on G's images for the same noise.
    d_real = torch.sigmoid(model.discriminator(data.images, attrs))
    d_fake = torch.sigmoid(model.discriminator(model.generator(z, attrs), attrs))
    torch.testing.assert_close(outputs["loss/discriminator"], (-torch.log(d_real) - torch.log(1 - d_fake)).mean())
    torch.testing.assert_close(outputs["loss/generator"], (-torch.log(d_fake)).mean())


@pytest.mark.parametrize("family", ["dcgan", "cgan"])
def test_each_loss_moves_only_its_own_player(family):
    model = tiny(family)
    outputs = model.training_step(batch(), 0)
    # D's loss sees detached fakes: even a plain backward gives G no gradient.
    outputs["loss/discriminator"].backward(retain_graph=True)
    assert all(p.grad is None for p in model.generator.parameters())
    assert all(p.grad is not None for p in model.discriminator.parameters())

    model = tiny(family)
    optimizers = model.optimizers(TrainParams())
    assert set(optimizers) == {"generator", "discriminator"}
    for player, other in (("discriminator", "generator"), ("generator", "discriminator")):
        before = {name: snapshot(getattr(model, name)) for name in ("generator", "discriminator")}
        protocol_step(model, {player: optimizers[player]}, batch(), 0)
        assert changed(getattr(model, player), before[player])
        assert not changed(getattr(model, other), before[other]), f"loss/{player} moved the {other}"


def test_paper_optimizer_and_initialisation():
    model = tiny("dcgan", generator_channels=8, discriminator_channels=8, norm_groups=4, discriminator_norm="none")
    optimizers = model.optimizers(TrainParams(lr=1.0))  # train.lr is not the GANs'
    assert optimizers["discriminator"].param_groups[0]["lr"] == 2e-4  # the paper's
    assert optimizers["generator"].param_groups[0]["lr"] == 1e-3  # 5x: measured (the module docstring)
    for optimizer in optimizers.values():
        assert optimizer.param_groups[0]["betas"] == (0.5, 0.999)
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))])
    assert weights.mean().abs() < 1e-3 and weights.std().item() == pytest.approx(0.02, rel=0.05)
    # With spectral normalisation, the weights it normalises are drawn the same way.
    spectral = tiny("dcgan", discriminator_channels=8, discriminator_norm="spectral").discriminator
    originals = torch.cat([m.parametrizations.weight.original.flatten() for m in spectral.features if isinstance(m, torch.nn.Conv2d)])
    assert originals.std().item() == pytest.approx(0.02, rel=0.05)


def test_bad_gan_params_fail_naming_the_key(tmp_path):
    with pytest.raises(ParamsError, match=r"models\.dcgan\.betas"):
        load_params(tmp_path / "none.yaml", ["models.dcgan.betas=[0.5,1.0]"])
    with pytest.raises(ParamsError, match=r"models\.dcgan\.norm_groups"):
        load_params(tmp_path / "none.yaml", ["models.dcgan.generator_norm=group", "models.dcgan.generator_channels=12",
                                             "models.dcgan.norm_groups=8"])


# --- the generator's moving average --------------------------------------------------------------


def test_ema_update_follows_its_formula_and_sampling_uses_it():
    model = tiny("dcgan", ema_decay=0.99)
    for p in model.generator.parameters():
        p.data.normal_()
    before = snapshot(model.generator_ema)
    live = snapshot(model.generator)
    for step in (1, 1000):
        decay = min(0.99, (1 + step) / (10 + step))
        assert ema_decay_at(0.99, step) == decay
        previous = snapshot(model.generator_ema)
        model.after_step(step)
        for average, old, theta in zip(model.generator_ema.parameters(), previous, live):
            torch.testing.assert_close(average, decay * old + (1 - decay) * theta)
    assert changed(model.generator_ema, before)
    # Not trained, not optimised, but saved.
    assert not any(p.requires_grad for p in model.generator_ema.parameters())
    optimised = {id(p) for o in model.optimizers(TrainParams()).values() for g in o.param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in model.generator_ema.parameters()}
    assert any(key.startswith("generator_ema.") for key in model.state_dict())
    # sample() draws from the average: moving the live generator changes nothing.
    first = model.sample(2, generator=torch.Generator().manual_seed(0))
    for p in model.generator.parameters():
        p.data.zero_()
    assert torch.equal(first, model.sample(2, generator=torch.Generator().manual_seed(0)))


# --- sampling and conditioning -------------------------------------------------------------------


def test_cgan_samples_change_with_the_requested_attribute():
    # GroupNorm in the tiny generator: without it, its 4-channel output is grey to within one level.
    model = tiny("cgan", generator_norm="group")
    # A few training steps, so the answer is not only the initial embedding's.
    optimizers = model.optimizers(TrainParams())
    for step in range(3):
        protocol_step(model, optimizers, batch(seed=step), step)
    smiling = ATTRIBUTE_NAMES.index("Smiling")
    cond = batch(8, seed=9).attrs
    without, with_ = cond.clone(), cond.clone()
    without[:, smiling], with_[:, smiling] = 0, 1
    same_noise = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    images_without = model.sample(8, cond=without, generator=same_noise())
    images_with = model.sample(8, cond=with_, generator=same_noise())
    assert torch.equal(images_without, model.sample(8, cond=without, generator=same_noise()))
    differing = (images_without != images_with).flatten(1).any(1)
    assert differing.all(), "Smiling=0 and Smiling=1 gave the same image for the same noise"


def test_cgan_refuses_missing_or_malformed_conditions_and_dcgan_any():
    model = tiny("cgan")
    with pytest.raises(ValueError, match=r"cgan samples need cond.*float \[n, 40\]"):
        model.sample(2)
    with pytest.raises(ValueError, match="need cond"):
        model.sample(2, cond=torch.zeros(3, 40))
    with pytest.raises(ValueError, match="0 .absent. or 1"):
        model.sample(2, cond=torch.full((2, 40), 0.5))
    with pytest.raises(ValueError, match="unconditional"):
        tiny("dcgan").sample(2, cond=torch.zeros(2, 40))


# --- the Fréchet distance ------------------------------------------------------------------------


def test_frechet_distance_matches_the_scipy_formula_and_is_zero_on_itself():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    b = torch.randn(300, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, 6, generator=generator, dtype=torch.float64) + 1
    x, y = a.numpy(), b.numpy()
    mu_x, mu_y, cov_x, cov_y = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(cov_x @ cov_y).real
    expected = ((mu_x - mu_y) ** 2).sum() + np.trace(cov_x + cov_y - 2 * root)
    assert frechet_distance(a, b).item() == pytest.approx(expected, rel=1e-8)
    assert abs(frechet_distance(a, a).item()) < 1e-8
