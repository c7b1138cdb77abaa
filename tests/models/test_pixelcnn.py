import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.distributions import AffineTransform, SigmoidTransform, TransformedDistribution, Uniform

from genflow.config import Params, TrainParams
from genflow.models.families import get_family
from genflow.models.pixelcnn import (
    PixelCNN,
    PixelCNNConfig,
    discretized_logistic_log_prob,
    levels_to_unit,
    mixture_log_prob,
    mixture_parameters,
    pixel_levels,
)
from genflow.models.protocol import Batch
from genflow.models.saved import load_model, save_model

LIKELIHOODS = ["softmax", "logistic_mixture"]
# first_kernel 5: the first layer reaches 2 pixels left and 2 right on the 3 rows above.
TINY = {"hidden_channels": 12, "layers": 3, "first_kernel": 5, "head_channels": 12, "mixture_components": 3}


def tiny_pixelcnn(likelihood: str = "softmax", **overrides) -> PixelCNN:
    torch.manual_seed(0)
    return PixelCNN(PixelCNNConfig(**{**TINY, "likelihood": likelihood, **overrides}))


def loader_pixels(levels: torch.Tensor, image_range=(0.0, 1.0)) -> torch.Tensor:
    """Integer levels -> floats exactly as genflow.data.loader.ShardLoader computes them."""
    low, high = image_range
    pixels = np.multiply(levels.to(torch.uint8).numpy(), np.float32((high - low) / 255.0), dtype=np.float32)
    if low:
        pixels += np.float32(low)
    return torch.from_numpy(pixels)


def blocky_levels(n: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    """Levels with structure to learn: 4×4 blocks of random colour."""
    coarse = torch.randint(0, 256, (n, 3, size // 4, size // 4), generator=torch.Generator().manual_seed(seed))
    return coarse.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)


def batch_of(levels: torch.Tensor) -> Batch:
    return Batch(loader_pixels(levels), torch.zeros(levels.shape[0], 40))


# --- the 8-bit targets ----------------------------------------------------------------------------


@pytest.mark.parametrize("image_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_integer_targets_are_recovered_exactly_from_the_loaders_floats(image_range):
    levels = torch.arange(256).reshape(1, 1, 16, 16).expand(2, 3, -1, -1)
    assert torch.equal(pixel_levels(loader_pixels(levels, image_range), image_range), levels)


@pytest.mark.parametrize(
    "images, why",
    [
        ((torch.arange(12.0).reshape(1, 3, 2, 2) + 0.3) / 255, "dequantised"),
        (torch.full((1, 3, 2, 2), 2.0), "above the range"),
        (torch.full((1, 3, 2, 2), -1.0 / 255), "below the range"),
    ],
)
def test_pixels_off_the_8_bit_grid_are_refused(images, why):
    with pytest.raises(ValueError, match="8-bit pixels k/255"):
        pixel_levels(images, (0.0, 1.0))


# --- the likelihoods against independent computations ---------------------------------------------


def logistic_cdf(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The logistic's CDF by torch.distributions: the sigmoid-inverse of a uniform, shifted and scaled."""
    logistic = TransformedDistribution(
        Uniform(torch.zeros_like(mean), torch.ones_like(mean)), [SigmoidTransform().inv, AffineTransform(mean, scale)]
    )
    return logistic.cdf(x.clamp(-1e6, 1e6))


@pytest.mark.parametrize("mean, log_scale", [(0.0, -2.0), (0.9, -5.0), (-1.5, 0.0), (3.0, -7.0), (0.2, 3.0), (-0.3, -7.0)])
def test_discretized_logistic_sums_to_one_and_matches_cdf_differences(mean, log_scale):
    levels = torch.arange(256)
    mean_t, log_scale_t = torch.full((256,), mean, dtype=torch.float64), torch.full((256,), log_scale, dtype=torch.float64)
    log_p = discretized_logistic_log_prob(levels, mean_t, log_scale_t)
    assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-9)

    # Salimans et al. 2017, Sec. 2.1: bins of ±1/255 around 2k/255 − 1; the edge bins reach ±∞.
    centres = levels.double() * 2 / 255 - 1
    upper = torch.where(levels == 255, torch.tensor(math.inf, dtype=torch.float64), centres + 1 / 255)
    lower = torch.where(levels == 0, torch.tensor(-math.inf, dtype=torch.float64), centres - 1 / 255)
    scale = log_scale_t.exp()
    expected = logistic_cdf(upper, mean_t, scale) - logistic_cdf(lower, mean_t, scale)
    visible = expected > 1e-12  # where the CDF difference itself is not swamped by rounding
    torch.testing.assert_close(log_p[visible].exp(), expected[visible], rtol=1e-6, atol=1e-12)


def test_whole_pixel_mixture_sums_to_one_over_the_256_cubed_colours():
    """The mixture with PixelCNN++'s coupled means is a distribution over the 256³ colours:
    summed over all (G, B), p(R, G, B) is R's own mixture marginal Σ_k π_k P_k(R), and that sums
    to 1 over R. (All 256³ at once is 16.7M evaluations: too slow for a unit test.)"""
    k = 2
    raw = torch.randn(1, 10 * k, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    raw[:, k : 4 * k] *= 0.5  # means inside the range, so that no mass sits in one edge bin only
    green_blue = torch.cartesian_prod(torch.arange(256), torch.arange(256)).T  # [2, 256²]

    def probability(levels: torch.Tensor) -> torch.Tensor:  # levels [1, 3, N] -> p [N]
        logits, means, log_scales = mixture_parameters(raw, levels_to_unit(levels, torch.float64), k)
        parameters = torch.cat([logits.unsqueeze(1).expand(-1, 3, -1, means.shape[-1]), means, log_scales.expand_as(means)], dim=2)
        return mixture_log_prob(parameters, levels, k).exp()[0]

    weights = torch.softmax(raw[0, :k, 0], 0)
    red_mean, red_log_scale = raw[0, k : 2 * k, 0], raw[0, 4 * k : 5 * k, 0].clamp(min=-7)
    red_marginal = (weights * discretized_logistic_log_prob(torch.arange(256)[:, None], red_mean, red_log_scale).exp()).sum(1)
    assert red_marginal.sum().item() == pytest.approx(1.0, abs=1e-12)
    for red in (0, 37, 128, 255):
        levels = torch.cat([torch.full((1, 256 * 256), red), green_blue]).unsqueeze(0)
        assert probability(levels).sum().item() == pytest.approx(red_marginal[red].item(), rel=1e-9)


def test_softmax_log_prob_is_the_cross_entropy_of_the_logits():
    model = tiny_pixelcnn("softmax")
    levels = blocky_levels(2, size=8)
    with torch.no_grad():
        logits = model.subpixel_parameters(levels_to_unit(levels))  # [B, 3, 256, H, W]
        expected = -F.cross_entropy(logits.transpose(1, 2), levels, reduction="none").sum((1, 2, 3))
        torch.testing.assert_close(model.log_prob(loader_pixels(levels)), expected)


def test_mixture_log_prob_matches_an_independent_per_pixel_sum():
    model = tiny_pixelcnn("logistic_mixture")
    levels = blocky_levels(1, size=4)
    k = model.config.mixture_components
    with torch.no_grad():
        raw = model.network(levels_to_unit(levels)).double()
    total = 0.0
    for i in range(4):
        for j in range(4):
            x = levels_to_unit(levels[0, :, i, j]).double()
            r = raw[0, :, i, j]
            weights = torch.softmax(r[:k], 0)
            means, log_scales, coefficients = r[k : 4 * k].view(3, k), r[4 * k : 7 * k].view(3, k).clamp(min=-7), torch.tanh(r[7 * k :].view(3, k))
            coupled = [means[0], means[1] + coefficients[0] * x[0], means[2] + coefficients[1] * x[0] + coefficients[2] * x[1]]
            p = torch.zeros((), dtype=torch.float64)
            for m in range(k):
                term = weights[m]
                for c in range(3):
                    upper = math.inf if levels[0, c, i, j] == 255 else x[c] + 1 / 255
                    lower = -math.inf if levels[0, c, i, j] == 0 else x[c] - 1 / 255
                    s = log_scales[c, m].exp()
                    term = term * (torch.sigmoid((upper - coupled[c][m]) / s) - torch.sigmoid((lower - coupled[c][m]) / s))
                p = p + term
            total += p.log().item()
    assert model.log_prob(loader_pixels(levels)).item() == pytest.approx(total, rel=1e-5)


def test_a_model_predicting_uniform_pixels_scores_exactly_8_bits_per_dim():
    model = tiny_pixelcnn("softmax")
    torch.nn.init.zeros_(model.head_out.weight)
    torch.nn.init.zeros_(model.head_out.bias)
    for levels in (blocky_levels(3, size=8), torch.zeros(1, 3, 4, 4, dtype=torch.long), torch.full((1, 3, 4, 4), 255)):
        metrics = model.evaluate(batch_of(levels))
        assert metrics["bits_per_dim"].item() == pytest.approx(8.0, rel=1e-6)
        assert metrics["nll_nats"].item() == pytest.approx(levels[0].numel() * math.log(256), rel=1e-6)


# --- causality: the order is raster, then R → G → B ------------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("i, j", [(4, 4), (0, 0), (0, 7), (7, 0), (5, 7)])
def test_each_subpixel_sees_exactly_the_subpixels_before_it(likelihood, i, j):
    # Ten channels per colour: with four, all of a colour's ReLUs can be off at one pixel, which
    # cuts a dependence the architecture has.
    model = tiny_pixelcnn(likelihood, hidden_channels=30, head_channels=30).double()
    size = 8
    unit = (torch.rand(1, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 - 1).requires_grad_()
    parameters = model.subpixel_parameters(unit)
    order = torch.arange(size * size * 3).view(size, size, 3).permute(2, 0, 1)  # [c, i, j] -> raster, then colour
    projection = torch.randn(parameters.shape[2], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for c in range(3):
        (gradient,) = torch.autograd.grad(parameters[0, c, :, i, j] @ projection, unit, retain_graph=True)
        position = order[c, i, j]
        # Exactly zero for the sub-pixel itself and everything after it.
        assert (gradient[0][order >= position] == 0).all(), f"sub-pixel ({i}, {j}, {c}) sees the future"
        # Non-zero for what its receptive field covers: earlier colours of its own pixel, the two
        # pixels to its left, and the 3 rows above from 2 left to 2 right (above-right: no blind spot).
        covered = torch.zeros(3, size, size, dtype=torch.bool)
        covered[:c, i, j] = True
        covered[:, i, max(j - 2, 0) : j] = True
        covered[:, max(i - 3, 0) : i, max(j - 2, 0) : j + 3] = True
        assert (gradient[0][covered] != 0).all(), f"sub-pixel ({i}, {j}, {c}) misses earlier inputs it should see"


def test_stacks_without_blind_spot_see_the_whole_past_when_deep_enough():
    """Every earlier sub-pixel within a 6-layer field contributes, also far up-right, which a
    single masked stack's blind spot would miss (van den Oord et al. 2016, Fig. 1)."""
    model = tiny_pixelcnn("softmax", layers=6, first_kernel=3).double()
    unit = (torch.rand(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 - 1).requires_grad_()
    (gradient,) = torch.autograd.grad(model.subpixel_parameters(unit)[0, 0, :, 5, 3].sum(), unit)
    # Rows above: the vertical stack grows one row up and one column each side per layer.
    assert (gradient[0][:, 0:5, 0:8] != 0).all()
    assert (gradient[0][:, 5, 0:3] != 0).all()


# --- sampling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_sampling_with_the_cache_equals_sampling_without(likelihood):
    # float64: both paths' logits agree to ~1e-16, so no inverse-CDF draw can land between them.
    model = tiny_pixelcnn(likelihood).double()
    cached = model.sample(3, generator=torch.Generator().manual_seed(5), size=6, cache=True)
    uncached = model.sample(3, generator=torch.Generator().manual_seed(5), size=6, cache=False)
    assert cached.shape == (3, 3, 6, 6) and cached.dtype == torch.uint8
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, model.sample(3, generator=torch.Generator().manual_seed(6), size=6))


def test_samples_follow_the_models_own_distribution():
    """A 1×1 image's first sub-pixel is drawn from softmax(logits): its empirical frequencies
    match the model's probabilities (chi-square against 256 categories)."""
    model = tiny_pixelcnn("softmax")
    with torch.no_grad():
        model.head_out.bias[:256] = torch.linspace(-3, 3, 256)  # a skewed distribution for R
        probabilities = torch.softmax(model.subpixel_parameters(torch.zeros(1, 3, 1, 1))[0, 0, :, 0, 0].double(), 0)
    samples = model.sample(20_000, generator=torch.Generator().manual_seed(0), size=1)[:, 0, 0, 0].long()
    counts = torch.bincount(samples, minlength=256).double()
    expected = 20_000 * probabilities
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 255 + 5 * math.sqrt(2 * 255)  # mean 255, sd √510


def test_sample_rejects_attributes():
    with pytest.raises(ValueError, match="unconditional"):
        tiny_pixelcnn().sample(2, cond=torch.zeros(2, 40), size=2)


# --- the protocol surface -------------------------------------------------------------------------


def test_family_table_maps_to_this_model():
    assert get_family("pixelcnn") is PixelCNN
    assert PixelCNN.primary_metric == "bits_per_dim" and PixelCNN.primary_metric_lower_is_better
    assert Params().family_config("pixelcnn") == PixelCNNConfig()


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_training_step_and_evaluate_agree_and_are_scalar_floats(likelihood):
    model = tiny_pixelcnn(likelihood)
    batch = batch_of(blocky_levels(2, size=8))
    out = model(batch, 0)
    assert set(out) == {"loss", "bits_per_dim"} and out["loss"].requires_grad
    metrics = model.evaluate(batch)
    assert set(metrics) == {"bits_per_dim", "nll_nats"}
    assert out["loss"].item() == pytest.approx(metrics["bits_per_dim"].item(), rel=1e-6)
    assert all(v.ndim == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in [*out.values(), *metrics.values()])


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_a_few_steps_lower_the_bits_per_dim(likelihood):
    model = tiny_pixelcnn(likelihood)
    batch = batch_of(blocky_levels(4, size=8))
    optimizer = model.optimizers(TrainParams(lr=1e-2))["main"]
    losses = []
    for step in range(40):
        loss = model(batch, step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_bf16_autocast_keeps_the_likelihood_in_float32():
    model = tiny_pixelcnn("logistic_mixture")
    batch = batch_of(blocky_levels(2, size=8))
    reference = model(batch, 0)["loss"].item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, 0)
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(reference, rel=0.05)


def test_channels_last_images_give_the_same_likelihood():
    model = tiny_pixelcnn("softmax")
    images = batch_of(blocky_levels(2, size=8)).images
    reference = model.log_prob(images)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model.log_prob(images.contiguous(memory_format=torch.channels_last)), reference)


def test_saved_model_round_trip_keeps_the_likelihood(tmp_path):
    model = tiny_pixelcnn("logistic_mixture")
    images = batch_of(blocky_levels(2, size=8)).images
    assert not any("mask" in key for key in model.state_dict())  # masks are rebuilt, not shipped
    save_model(tmp_path / "model.pt", "pixelcnn", model)
    loaded = load_model(tmp_path)
    torch.testing.assert_close(loaded.log_prob(images), model.log_prob(images))


@pytest.mark.parametrize(
    "params, field",
    [
        ({"likelihood": "gaussian"}, "likelihood"),
        ({"first_kernel": 4}, "first_kernel"),
        ({"kernel": 2}, "kernel"),
        ({"likelihood": "softmax", "hidden_channels": 16}, "hidden_channels"),
        ({"likelihood": "softmax", "head_channels": 32}, "head_channels"),
        ({"layers": 0}, "layers"),
        ({"mixture_components": 0}, "mixture_components"),
        ({"hidden": 8}, "hidden"),
    ],
)
def test_config_rejects_bad_keys_and_values(params, field):
    with pytest.raises(ValidationError, match=field):
        PixelCNNConfig(**params)
