import copy
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch.distributions import Normal

from genflow.models.families import get_family
from genflow.models.flow import (
    PIXELS,
    ActNorm,
    Flow,
    FlowConfig,
    InvertibleConv1x1,
    MultiScaleFlow,
    dequantize,
    discrete_bits_per_dim,
    pixel_levels,
)
from genflow.models.protocol import Batch
from genflow.models.saved import load_model, save_model
from tests.models.tiny import TINY_CONFIGS

MASKS = ["channel", "checkerboard"]


@pytest.fixture(autouse=True)
def one_thread():
    # These small convolutions run 10× slower on 2 threads when the cores are shared (OpenMP spin).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_flow(**overrides) -> Flow:
    torch.manual_seed(0)
    return Flow(FlowConfig(**{**TINY_CONFIGS["flow"], **overrides}))


def loader_images(n: int, seed: int = 1, image_range=(0.0, 1.0)) -> torch.Tensor:
    """8-bit images as the loader makes them: low + k · float32((high − low) / 255)."""
    levels = np.random.default_rng(seed).integers(0, 256, size=(n, 3, 64, 64), dtype=np.uint8)
    low, high = image_range
    pixels = np.multiply(levels, np.float32((high - low) / 255.0), dtype=np.float32) + np.float32(low)
    return torch.from_numpy(pixels)


def batch_of(images: torch.Tensor) -> Batch:
    return Batch(images, torch.zeros(images.shape[0], 40))


@torch.no_grad()
def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 2) -> None:
    """Move every parameter off its initial value (the zero-initialised nets make couplings trivial)."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


@torch.no_grad()
def initialized_multiscale(masks: str, x: torch.Tensor) -> MultiScaleFlow:
    torch.manual_seed(0)
    flow = MultiScaleFlow(3, levels=2, steps_per_level=2, hidden=8, masks=masks)
    for actnorm in flow.actnorms():
        actnorm.pending = True
    flow(x)
    perturb(flow)
    return flow


# --- invertibility and the change of variables ----------------------------------------------------


@pytest.mark.parametrize("masks", MASKS)
def test_flow_inverts_to_1e_4_in_float32(masks):
    model = tiny_flow(masks=masks)
    images = loader_images(4)
    model.initialize(batch_of(images))
    perturb(model)
    x = dequantize(pixel_levels(images, model.image_range)) - 0.5
    with torch.no_grad():
        zs, _, _ = model.flow(x)
        back = model.flow.inverse(zs)
    assert x.dtype == back.dtype == torch.float32
    assert (back - x).abs().max().item() < 1e-4


@pytest.mark.parametrize("masks", MASKS)
def test_log_det_and_log_prob_match_autograd_jacobian(masks):
    # 3×8×8 through two levels (8 -> 4 -> 2): both kinds of mask act on a real checkerboard.
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) - 0.5
    flow = initialized_multiscale(masks, torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(4)) - 0.5)
    flow = flow.double()

    def to_z(flat: torch.Tensor) -> torch.Tensor:
        zs, _, _ = flow(flat.view(1, 3, 8, 8))
        return torch.cat([z.flatten() for z in zs])

    jacobian = torch.autograd.functional.jacobian(to_z, x.flatten(), vectorize=True)
    assert jacobian.shape == (x.numel(), x.numel())
    sign, expected_log_det = torch.linalg.slogdet(jacobian)
    assert sign != 0
    zs, priors, log_det = flow(x)
    torch.testing.assert_close(log_det[0], expected_log_det, rtol=1e-9, atol=1e-9)

    # log p(x) = Σ log N(z; μ, σ) + log|det J|, the priors' densities from torch.distributions.
    prior = sum(Normal(mean, log_std.exp()).log_prob(z).sum() for z, (mean, log_std) in zip(zs, priors))
    torch.testing.assert_close(flow.log_prob(x)[0], prior + expected_log_det, rtol=1e-9, atol=1e-9)


def test_sampling_draws_each_z_from_the_prior_the_forward_pass_scores_it_under():
    # reverse() conditions each factored-out z on the kept half; forward() must see the same half.
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(4)) - 0.5
    flow = initialized_multiscale("channel", x)
    generator = torch.Generator().manual_seed(5)
    drawn = {}

    def draw(level, mean, log_std):
        z = mean + 0.8 * log_std.exp() * torch.randn(mean.shape, generator=generator)
        drawn[level] = (z, mean, log_std)
        return z

    with torch.no_grad():
        top = torch.randn(2, 24, 2, 2, generator=generator)  # 3 -> 12 (keep 6) -> 24 channels at 2×2
        zs, priors, _ = flow(flow.reverse(top, draw))
    torch.testing.assert_close(zs[-1], top, atol=1e-5, rtol=1e-5)
    for level, (z, mean, log_std) in drawn.items():
        torch.testing.assert_close(zs[level], z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(priors[level][0], mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(priors[level][1], log_std, atol=1e-5, rtol=1e-5)
    assert drawn[0][1].abs().max() > 1e-3  # the learned prior is not the trivial N(0, I) here


def test_lu_conv_log_det_matches_slogdet_and_the_conv_applies_w():
    torch.manual_seed(0)
    conv = InvertibleConv1x1(6)
    perturb(conv, scale=0.3)
    x = torch.randn(2, 6, 5, 7)
    y, log_det = conv(x)
    weight = conv.weight()
    _, log_abs_det = torch.linalg.slogdet(weight.double())
    torch.testing.assert_close(log_det, (5 * 7 * log_abs_det).float().expand(2))
    torch.testing.assert_close(y, torch.einsum("oc,bchw->bohw", weight, x))
    torch.testing.assert_close(conv.inverse(y), x, rtol=1e-5, atol=1e-5)


# --- the likelihood convention --------------------------------------------------------------------


class UniformFlow(Flow):
    """Predicts uniform pixels: the density 1 on [0, 1)^D."""

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros(y.shape[0])


def test_a_uniform_density_scores_exactly_8_bits_per_dim():
    model = UniformFlow(FlowConfig(**TINY_CONFIGS["flow"]))
    bits = model.bits_per_dim(loader_images(3))
    assert bits.tolist() == [8.0, 8.0, 8.0]
    assert model.evaluate(batch_of(loader_images(3)))["bits_per_dim"].item() == 8.0


def test_a_bin_constant_density_scores_the_exact_discrete_likelihood():
    # A density constant on each 1/256 bin, p(y) = 256 · P(k): the dequantisation bound is then
    # exact, so bits/dim must equal −Σ log2 P(k) / D of the 8-bit pixels, whatever u was drawn.
    probabilities = torch.softmax(torch.randn(256, generator=torch.Generator().manual_seed(5)), 0).double()

    class BinConstant(Flow):
        def log_density(self, y: torch.Tensor) -> torch.Tensor:
            bins = (y.double() * 256).floor().long()
            return torch.log(256 * probabilities[bins]).flatten(1).sum(1)

    images = loader_images(2, seed=6)
    levels = torch.from_numpy(np.round(images.numpy().astype(np.float64) * 255)).long()
    expected = -torch.log2(probabilities[levels]).flatten(1).sum(1) / PIXELS
    model = BinConstant(FlowConfig(**TINY_CONFIGS["flow"]))
    torch.testing.assert_close(model.bits_per_dim(images).double(), expected, rtol=1e-6, atol=1e-6)


def test_bits_per_dim_formula():
    log_density = torch.tensor([0.0, -PIXELS * math.log(2.0)])  # uniform; half as likely per dim
    assert discrete_bits_per_dim(log_density, PIXELS).tolist() == pytest.approx([8.0, 9.0], abs=1e-4)


@pytest.mark.parametrize("image_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_dequantization_recovers_the_integer_pixels_exactly(image_range):
    low, high = image_range
    levels = np.arange(256, dtype=np.uint8)
    floats = np.multiply(levels, np.float32((high - low) / 255.0), dtype=np.float32) + np.float32(low)
    recovered = pixel_levels(torch.from_numpy(floats), image_range)
    assert recovered.tolist() == list(range(256))
    y = dequantize(recovered.expand(1000, 256).contiguous(), torch.Generator().manual_seed(0))
    assert (y * 256 >= recovered).all() and (y * 256 < recovered + 1).all()


def test_images_off_the_8bit_grid_are_refused():
    model = tiny_flow()
    with pytest.raises(ValueError, match="8-bit pixels"):
        model.bits_per_dim(torch.full((1, 3, 64, 64), 0.5))
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        model.bits_per_dim(torch.zeros(1, 3, 32, 32))


# --- actnorm's data-dependent initialisation ------------------------------------------------------


def test_actnorm_initialisation_gives_zero_mean_unit_variance_per_channel():
    model = tiny_flow()
    images = loader_images(8)
    model.initialize(batch_of(images))

    # Replay the initialising pass (same batch, same fixed-seed noise) and look at every actnorm's output.
    outputs = []
    hooks = [a.register_forward_hook(lambda m, i, out: outputs.append(out[0])) for a in model.flow.actnorms()]
    with torch.no_grad():
        model.log_density(dequantize(pixel_levels(images, model.image_range), torch.Generator().manual_seed(0)))
    for hook in hooks:
        hook.remove()
    assert len(outputs) == len(model.flow.actnorms()) == 4
    for out in outputs:
        torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(out.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.var(dim=(0, 2, 3), unbiased=False), torch.ones(out.shape[1]), atol=1e-4, rtol=0)


def test_actnorm_module_initialises_from_its_input():
    actnorm = ActNorm(3)
    x = torch.randn(5, 3, 4, 4) * torch.tensor([2.0, 0.1, 7.0]).view(1, 3, 1, 1) + 3
    actnorm.pending = True
    y, log_det = actnorm(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(actnorm.inverse(y), x, atol=1e-5, rtol=0)
    assert not actnorm.pending and actnorm.initialized


def test_initialisation_is_identical_whatever_each_rank_s_rng():
    # DDP ranks share the gathered batch and the starting weights but not their RNG streams.
    model = tiny_flow()
    twin = copy.deepcopy(model)
    batch = batch_of(loader_images(4))
    torch.manual_seed(11)
    model.initialize(batch)
    torch.manual_seed(12)
    twin.initialize(batch)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


def test_initialisation_is_not_repeated_after_a_state_dict_round_trip(tmp_path):
    model = tiny_flow()
    model.initialize(batch_of(loader_images(4, seed=1)))
    assert all(a.initialized for a in model.flow.actnorms())

    fresh = tiny_flow()
    fresh.load_state_dict(model.state_dict())
    fresh.initialize(batch_of(loader_images(4, seed=2)))  # another batch: must change nothing
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name

    save_model(tmp_path / "model.pt", "flow", model)
    loaded = load_model(tmp_path)
    loaded.initialize(batch_of(loader_images(4, seed=3)))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_before_initialisation_is_refused():
    with pytest.raises(RuntimeError, match="initialize"):
        tiny_flow().training_step(batch_of(loader_images(2)), 0)


# --- training step, numerics, sampling, config -----------------------------------------------------


def test_training_step_is_a_mean_of_per_image_bits_and_has_gradients():
    model = tiny_flow()
    images = loader_images(4)
    model.initialize(batch_of(images))
    torch.manual_seed(0)
    out = model.training_step(batch_of(images), 0)
    torch.manual_seed(0)
    per_image = model.bits_per_dim(images)
    torch.testing.assert_close(out["loss"], per_image.mean())
    out["loss"].backward()
    nets = [m.coupling.net[-1].weight for steps in model.flow.levels for m in steps]
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in nets)


def test_likelihood_stays_float32_under_bf16_autocast():
    model = tiny_flow()
    images = loader_images(2)
    model.initialize(batch_of(images))
    perturb(model)
    y = dequantize(pixel_levels(images, model.image_range), torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.log_density(y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            zs, _, log_det = model.flow(y - 0.5)
            mixed = model.log_density(y)
    assert log_det.dtype == mixed.dtype == torch.float32 and all(z.dtype == torch.float32 for z in zs)
    # Only the coupling nets ran in bf16: the bits/dim move in the third decimal at most.
    bits = discrete_bits_per_dim(torch.stack([full, mixed]), PIXELS)
    assert (bits[0] - bits[1]).abs().max() < 5e-3


def test_sample_is_uint8_seeded_and_sharpens_with_temperature():
    model = tiny_flow()
    model.initialize(batch_of(loader_images(4)))
    perturb(model)
    first = model.sample(3, generator=torch.Generator().manual_seed(0))
    again = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert first.dtype == torch.uint8 and first.shape == (3, 3, 64, 64)
    assert torch.equal(first, again)
    # At temperature → 0 every draw is the prior means' image, whatever the noise.
    cold = [model.sample(2, generator=torch.Generator().manual_seed(s), temperature=1e-6).int() for s in (1, 2)]
    hot = [model.sample(2, generator=torch.Generator().manual_seed(s), temperature=1.0).int() for s in (1, 2)]
    assert (cold[0] - cold[1]).abs().max() <= 1
    assert (hot[0] - hot[1]).abs().float().mean() > 10
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(1, cond=torch.zeros(1, 40))


def test_config_refuses_a_checkerboard_without_pixels_and_is_registered():
    with pytest.raises(ValidationError, match="levels ≤ 5"):
        FlowConfig(masks="checkerboard", levels=6)
    FlowConfig(masks="channel", levels=6)
    assert get_family("flow") is Flow


def blocky_images(n: int, seed: int) -> torch.Tensor:
    """8-bit images with structure to learn (8×8 blocks of random colour), as the loader gives them."""
    coarse = torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse.float(), size=64, mode="nearest") / 255


@pytest.mark.parametrize("masks", MASKS)
def test_a_few_steps_of_training_lower_held_out_bits_per_dim(masks):
    model = tiny_flow(masks=masks)
    train, held_out = blocky_images(64, seed=7), blocky_images(16, seed=8)
    model.initialize(batch_of(train[:16]))
    torch.manual_seed(0)
    before = model.evaluate(batch_of(held_out))["bits_per_dim"].item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(30):
        index = torch.randint(0, len(train), (8,))
        loss = model.training_step(batch_of(train[index]), step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.manual_seed(0)
    after = model.evaluate(batch_of(held_out))["bits_per_dim"].item()
    assert after < before - 1.0, (before, after)
