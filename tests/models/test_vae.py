import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.distributions import Bernoulli, Normal, kl_divergence

from genflow.config import Params, ParamsError, TrainParams, load_params
from genflow.models.families import get_family
from genflow.models.protocol import Batch
from genflow.models.vae import (
    PIXELS,
    VAE,
    VAEConfig,
    bernoulli_log_likelihood,
    discretized_gaussian_log_likelihood,
    gaussian_kl,
    reparameterize,
)
from genflow.models.schedules import KLSchedule

TINY = {"hidden_channels": (8, 16, 32, 32), "latent_dim": 8}


def tiny_vae(**overrides) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(**{**TINY, **overrides}))


def blocky_images(n: int, seed: int = 1) -> torch.Tensor:
    """Images with structure to learn (4×4 blocks of random colour), in [0, 1]."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=64, mode="nearest")


def batch_of(images: torch.Tensor) -> Batch:
    return Batch(images, torch.zeros(images.shape[0], 40))


# --- the math against torch.distributions --------------------------------------------------------


def test_kl_matches_torch_distributions_and_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 8), torch.randn(4, 8)
    q = Normal(mu, torch.exp(0.5 * logvar))
    prior = Normal(torch.zeros(4, 8), torch.ones(4, 8))
    closed_form = gaussian_kl(mu, logvar)

    torch.testing.assert_close(closed_form, kl_divergence(q, prior).sum(-1))

    # KL = E_q[log q(z) − log p(z)]: an unbiased MC estimate; allow 5 standard errors.
    n = 100_000
    z = q.sample((n,))
    log_ratio = (q.log_prob(z) - prior.log_prob(z)).sum(-1)  # [n, 4]
    estimate, standard_error = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(n)
    assert ((estimate - closed_form).abs() < 5 * standard_error).all(), (estimate, closed_form, standard_error)


def test_kl_is_zero_for_the_prior_itself():
    assert gaussian_kl(torch.zeros(2, 8), torch.zeros(2, 8)).tolist() == [0.0, 0.0]


def test_reparameterized_samples_follow_the_posterior():
    torch.manual_seed(0)
    n = 100_000
    mu, logvar = torch.tensor([[0.5, -2.0, 3.0]]), torch.tensor([[-3.0, 0.0, 2.0]])
    z = reparameterize(mu.expand(n, -1), logvar.expand(n, -1))
    std = torch.exp(0.5 * logvar[0])
    assert ((z.mean(0) - mu[0]).abs() < 5 * std / math.sqrt(n)).all()
    torch.testing.assert_close(z.std(0), std, rtol=0.02, atol=0)


def eight_bit(*shape, seed=0) -> torch.Tensor:
    """Pixels as the loader gives them: k / 255."""
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).double() / 255


def test_discretized_gaussian_is_the_normal_mass_of_each_pixel_bin():
    # Independent computation: the trapezoid rule over each bin of the normal density.
    x = eight_bit(2, 3, 4, 4)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0  # the open edge bins
    offsets = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).double()
    for sigma in (0.1, 0.01, 0.001):
        mean = x + 3 * sigma * offsets  # within a few σ: masses the trapezoid can represent
        normal = Normal(mean, sigma)
        h = 0.5 / 255
        grid = torch.linspace(0, 1, 4001, dtype=torch.float64)
        points = (x - h).unsqueeze(-1) + 2 * h * grid
        density = normal.log_prob(points.movedim(-1, 0)).exp().movedim(0, -1)
        mass = torch.trapezoid(density, dx=2 * h / 4000, dim=-1)
        # The edge bins add the tail beyond them (the normal cdf, computed for those two only).
        mass[0, 0, 0, 0] += normal.cdf(torch.tensor(-h, dtype=torch.float64))[0, 0, 0, 0]
        mass[0, 0, 0, 1] += 1 - normal.cdf(torch.tensor(1 + h, dtype=torch.float64))[0, 0, 0, 1]
        computed = discretized_gaussian_log_likelihood(x, mean, sigma)
        torch.testing.assert_close(computed.double(), mass.log().sum((1, 2, 3)), rtol=1e-4, atol=1e-3, msg=f"sigma {sigma}")


def test_gaussian_bits_per_dim_is_never_negative_at_small_sigma():
    # Issue 8 #10: with the continuous density, sigma = 0.001 reported -0.64 bits/dim.
    model = tiny_vae(gaussian_sigma=0.001)
    images = eight_bit(2, 3, 64, 64).float()
    with torch.no_grad():
        mu, _ = model.encode(images)
        perfect = model.log_likelihood(images, torch.logit(images.double().clamp(1e-6, 1 - 1e-6)).float())
    assert (perfect <= 0).all()  # log of a probability, even for a perfect decoder mean
    assert model.evaluate(batch_of(images))["bits_per_dim"].item() > 0


def test_bernoulli_log_likelihood_matches_bernoulli_log_prob_and_bce():
    torch.manual_seed(0)
    logits = 3 * torch.randn(3, 3, 8, 8)
    binary = torch.randint(0, 2, (3, 3, 8, 8)).float()
    expected = Bernoulli(logits=logits).log_prob(binary).sum((1, 2, 3))
    torch.testing.assert_close(bernoulli_log_likelihood(binary, logits), expected)

    # Continuous targets in [0, 1]: x log p + (1 − x) log(1 − p), the standard BCE.
    x = torch.rand(3, 3, 8, 8)
    by_hand = (x * F.logsigmoid(logits) + (1 - x) * F.logsigmoid(-logits)).sum((1, 2, 3))
    torch.testing.assert_close(bernoulli_log_likelihood(x, logits), by_hand)


# --- ELBO, bits/dim and the loss on known encoder/decoder outputs --------------------------------

# Posterior N(1, 4) in each of 8 latents: KL = 8 · ½(μ² + σ² − 1 − log σ²).
KNOWN_KL = 8 * 0.5 * (1 + 4 - 1 - math.log(4))
# Decoder mean 0.6 everywhere, data the 8-bit level 128/255 everywhere.
KNOWN_X, KNOWN_MEAN = 128 / 255, 0.6


@pytest.fixture
def known_vae(monkeypatch):
    """A tiny VAE whose encoder and decoder return the known outputs above, whatever z is."""

    def make(**overrides) -> VAE:
        model = tiny_vae(**overrides)
        monkeypatch.setattr(
            model, "encode", lambda images: (torch.ones(len(images), 8), torch.full((len(images), 8), math.log(4)))
        )
        logit = math.log(KNOWN_MEAN / (1 - KNOWN_MEAN))
        monkeypatch.setattr(model, "decode", lambda z: torch.full((len(z), 3, 64, 64), logit))
        return model

    return make


def known_batch() -> Batch:
    return batch_of(torch.full((2, 3, 64, 64), KNOWN_X))


def normal_cdf(t: float) -> float:
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


def test_gaussian_elbo_and_bits_per_dim_by_hand(known_vae):
    sigma = 0.1
    model = known_vae(decoder="gaussian", gaussian_sigma=sigma)
    h = 0.5 / 255
    per_pixel = math.log(normal_cdf((KNOWN_X + h - KNOWN_MEAN) / sigma) - normal_cdf((KNOWN_X - h - KNOWN_MEAN) / sigma))
    elbo = PIXELS * per_pixel - KNOWN_KL
    bits_per_dim = -elbo / (PIXELS * math.log(2))
    mse = (KNOWN_X - KNOWN_MEAN) ** 2

    metrics = model.evaluate(known_batch())
    assert metrics["elbo_nats"].item() == pytest.approx(elbo, rel=1e-5)
    assert metrics["bits_per_dim"].item() == pytest.approx(bits_per_dim, rel=1e-5)
    assert metrics["kl"].item() == pytest.approx(KNOWN_KL, rel=1e-5)
    assert metrics["reconstruction_psnr"].item() == pytest.approx(-10 * math.log10(mse), rel=1e-4)

    out = model.training_step(known_batch(), step=0)
    assert out["reconstruction"].item() == pytest.approx(mse, rel=1e-4)
    assert out["loss"].item() == pytest.approx(mse + 0.00025 * KNOWN_KL, rel=1e-4)
    assert out["elbo_nats"].item() == pytest.approx(elbo, rel=1e-5)
    assert out["bits_per_dim"].item() == pytest.approx(bits_per_dim, rel=1e-5)


def test_bernoulli_measures_are_named_bce_not_bits_per_dim(known_vae):
    # Issue 8 #2: the BCE's bits are no likelihood of 8-bit pixels and must not pass for one.
    model = known_vae(decoder="bernoulli", kl={"weight": 1.0})
    bce = -(KNOWN_X * math.log(KNOWN_MEAN) + (1 - KNOWN_X) * math.log(1 - KNOWN_MEAN))
    elbo = -PIXELS * bce - KNOWN_KL

    metrics = model.evaluate(known_batch())
    assert "bits_per_dim" not in metrics and "elbo_nats" not in metrics
    assert metrics["bce_elbo_nats"].item() == pytest.approx(elbo, rel=1e-5)
    assert metrics["bce_bits_per_dim"].item() == pytest.approx(-elbo / (PIXELS * math.log(2)), rel=1e-5)

    out = model.training_step(known_batch(), step=0)
    assert out["reconstruction"].item() == pytest.approx(bce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(bce + KNOWN_KL, rel=1e-5)


@pytest.mark.parametrize("step, capacity", [(0, 0.0), (50, 10.0), (100, 20.0)])
def test_capacity_loss_is_gamma_times_abs_kl_minus_c(known_vae, step, capacity):
    model = known_vae(kl={"kind": "capacity", "gamma": 1000.0, "capacity_max": 20.0, "capacity_steps": 100})
    out = model.training_step(known_batch(), step)
    # KNOWN_KL ≈ 10.45: above C at steps 0 and 50, below it at 100.
    mse = (KNOWN_X - KNOWN_MEAN) ** 2
    assert out["loss"].item() == pytest.approx(mse + 1000.0 * abs(KNOWN_KL - capacity), rel=1e-4)
    assert out["kl_weight"].item() == 1000.0
    assert out["kl_capacity"].item() == pytest.approx(capacity)


def test_scheduled_weight_reaches_the_loss(known_vae):
    model = known_vae(kl={"kind": "linear", "weight": 0.5, "warmup_steps": 10})
    for step, weight in [(0, 0.0), (5, 0.25), (10, 0.5)]:
        out = model.training_step(known_batch(), step)
        assert out["kl_weight"].item() == pytest.approx(weight)
        assert out["loss"].item() == pytest.approx((KNOWN_X - KNOWN_MEAN) ** 2 + weight * KNOWN_KL, rel=1e-4)


@pytest.mark.parametrize("decoder", ["gaussian", "bernoulli"])
def test_elbo_agrees_with_monte_carlo_and_lies_below_iwae(decoder):
    """The model's ELBO (closed-form KL) = E_q[log p(x, z) − log q(z|x)] by torch.distributions;
    and the IWAE bound (Burda et al. 2016, Theorem 1) sits above it: ELBO ≤ L_K ≤ log p(x)."""
    model = tiny_vae(decoder=decoder)
    k = 512
    images = blocky_images(1).expand(k, -1, -1, -1)
    torch.manual_seed(1)
    images = (images * 255).round() / 255  # 8-bit levels, as the loader gives them
    name = "elbo_nats" if decoder == "gaussian" else "bce_elbo_nats"
    model_elbo = model.evaluate(batch_of(images))[name].item()  # mean of k single-sample ELBOs

    with torch.no_grad():
        mu, logvar = model.encode(images)
        q = Normal(mu, torch.exp(0.5 * logvar))
        z = q.sample()
        logits = model.decode(z)
        if decoder == "gaussian":  # the mass of each pixel's bin, open at 0 and 1
            # Φ(b) − Φ(a) over the bin, written as Φ(−a) − Φ(−b) above the mean, where it keeps its digits.
            mean, x, h = torch.sigmoid(logits).double(), images.double(), 0.5 / 255
            a = torch.where(x < h, -math.inf, (x - h - mean) / 0.1)
            b = torch.where(x > 1 - h, math.inf, (x + h - mean) / 0.1)
            def cdf(t):  # Φ by erfc, which keeps the lower tail's digits
                return 0.5 * torch.erfc(-t / math.sqrt(2))

            mass = torch.where(x > mean, cdf(-a) - cdf(-b), cdf(b) - cdf(a))
            log_px_z = mass.log().sum((1, 2, 3)).float()
        else:
            log_px_z = -F.binary_cross_entropy_with_logits(logits, images, reduction="none").sum((1, 2, 3))
        log_w = log_px_z + Normal(0.0, 1.0).log_prob(z).sum(1) - q.log_prob(z).sum(1)

    mc_elbo, standard_error = log_w.mean().item(), log_w.std().item() / math.sqrt(k)
    assert abs(model_elbo - mc_elbo) < 5 * math.sqrt(2) * standard_error + 1e-3 * abs(mc_elbo)
    iwae = (torch.logsumexp(log_w, 0) - math.log(k)).item()
    assert iwae >= model_elbo - 5 * standard_error


# --- the protocol surface ------------------------------------------------------------------------


def test_family_table_maps_to_this_model():
    assert get_family("vae") is VAE
    assert VAE.config_class is VAEConfig
    assert VAE.primary_metric == "reconstruction_psnr" and not VAE.primary_metric_lower_is_better
    assert VAE.image_range == (0.0, 1.0)
    assert not VAE.conditional


@pytest.mark.parametrize("kind, decoder, extra", [("constant", "gaussian", {"elbo_nats", "bits_per_dim"}),
                                                  ("capacity", "bernoulli", {"kl_capacity", "bce_elbo_nats", "bce_bits_per_dim"})])
def test_training_step_returns_scalar_float_metrics(kind, decoder, extra):
    model = tiny_vae(kl={"kind": kind}, decoder=decoder)
    out = model(batch_of(blocky_images(2)), 0)  # forward is training_step, as DDP calls it
    assert set(out) == {"loss", "reconstruction", "kl", "kl_weight"} | extra
    for name, value in out.items():
        assert value.ndim == 0 and value.dtype == torch.float32 and torch.isfinite(value), name
        assert value.requires_grad == (name == "loss"), name


def test_evaluate_returns_scalar_metrics():
    metrics = tiny_vae().evaluate(batch_of(blocky_images(2)))
    assert set(metrics) == {"elbo_nats", "bits_per_dim", "reconstruction_psnr", "kl"}
    assert set(tiny_vae(decoder="bernoulli").evaluate(batch_of(blocky_images(2)))) == {
        "bce_elbo_nats", "bce_bits_per_dim", "reconstruction_psnr", "kl"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in metrics.values())


def test_sample_shape_dtype_and_reproducibility():
    model = tiny_vae()
    first = model.sample(5, generator=torch.Generator().manual_seed(3))
    again = model.sample(5, generator=torch.Generator().manual_seed(3))
    other = model.sample(5, generator=torch.Generator().manual_seed(4))
    assert first.shape == (5, 3, 64, 64) and first.dtype == torch.uint8
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_sample_rejects_attributes():
    with pytest.raises(ValueError, match="unconditional"):
        tiny_vae().sample(2, cond=torch.zeros(2, 40))


def test_reconstruct_is_deterministic_uint8():
    model = tiny_vae()
    images = blocky_images(3)
    recon = model.reconstruct(images)
    assert recon.shape == (3, 3, 64, 64) and recon.dtype == torch.uint8
    assert torch.equal(recon, model.reconstruct(images))


def test_default_config_builds_and_runs():
    model = VAE(VAEConfig())
    out = model.training_step(batch_of(blocky_images(2)), 0)
    assert torch.isfinite(out["loss"])
    assert model.sample(1).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("kind", ["constant", "linear", "cyclical", "capacity"])
def test_two_ranks_averaged_gradient_equals_one_rank_on_the_combined_batch(kind, monkeypatch):
    """Issue 8 #1: DDP averages the ranks' gradients, so the objective must be a mean of per-image
    terms. The capacity term was γ·|batch-mean KL − C|: 2 ranks of 4 images moved otherwise than
    1 rank of 8. The halves are chosen so that one lies below C and one above it."""
    monkeypatch.setattr("genflow.models.vae.reparameterize", lambda mu, logvar: mu)  # z = μ: no noise to match
    images = blocky_images(8)
    probe = tiny_vae()
    with torch.no_grad():
        kl = gaussian_kl(*probe.encode(images))
    order = kl.argsort()
    images = images[order]  # the first half has the smaller KLs
    capacity = kl.median().item()
    schedule = {"kind": kind, "weight": 0.5, "warmup_steps": 10, "cycle_steps": 10, "ratio": 0.5,
                "gamma": 0.25, "capacity_max": capacity, "capacity_steps": 5}
    step = 7  # mid-warm-up, mid-cycle, past the capacity ramp (C = capacity_max)

    def gradient(batch_images):
        model = tiny_vae(kl=schedule)
        model.training_step(batch_of(batch_images), step)["loss"].backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    one_rank = gradient(images)
    two_ranks = (gradient(images[:4]) + gradient(images[4:])) / 2
    torch.testing.assert_close(two_ranks, one_rank, rtol=1e-4, atol=1e-6)


def test_capacity_default_is_the_recipes_effective_scale():
    # AntixK/PyTorch-VAE multiplies |KL − C| by gamma = 1000 and kld_weight = 0.00025.
    assert KLSchedule().gamma == pytest.approx(1000 * 0.00025)


def test_images_are_processed_independently_of_the_batch():
    """No batch statistics (GroupNorm): what DDP over N workers needs to match one worker."""
    model = tiny_vae()
    images = blocky_images(4)
    mu, logvar = model.encode(images)
    mu_0, logvar_0 = model.encode(images[:1])
    torch.testing.assert_close(mu[:1], mu_0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logvar[:1], logvar_0, atol=1e-5, rtol=1e-5)


def test_channels_last_gives_the_same_outputs():
    model = tiny_vae()
    images = blocky_images(2)
    mu, _ = model.encode(images)
    logits = model.decode(mu)
    model = model.to(memory_format=torch.channels_last)
    mu_cl, _ = model.encode(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(mu_cl, mu, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.decode(mu_cl), logits, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_keeps_losses_in_float32():
    model = tiny_vae()
    batch = batch_of(blocky_images(2))
    torch.manual_seed(0)
    reference = model.training_step(batch, 0)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.training_step(batch, 0)
        metrics = model.evaluate(batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in [*out.values(), *metrics.values()])
    assert out["loss"].item() == pytest.approx(reference["loss"].item(), rel=0.05)


def test_wrong_image_size_is_a_clear_error():
    with pytest.raises(ValueError, match="data.size"):
        tiny_vae().training_step(batch_of(torch.rand(2, 3, 32, 32)), 0)


@pytest.mark.parametrize("decoder", ["gaussian", "bernoulli"])
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(decoder):
    model = tiny_vae(decoder=decoder)
    images = blocky_images(4)
    optimizer = model.optimizers(TrainParams(lr=3e-3))["main"]
    losses = []
    for step in range(25):
        loss = model(batch_of(images), step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # The reconstruction term's floor: 0 for MSE, the targets' own entropy for BCE.
    floor = 0.0 if decoder == "gaussian" else F.binary_cross_entropy(images, images).item()
    first, last = sum(losses[:3]) / 3 - floor, sum(losses[-3:]) / 3 - floor
    assert last < 0.7 * first, losses


# --- config --------------------------------------------------------------------------------------


def test_config_defaults_come_through_params():
    assert Params().family_config("vae") == VAEConfig()
    assert VAEConfig(hidden_channels=[8, 16]).hidden_channels == (8, 16)  # YAML lists are fine


@pytest.mark.parametrize(
    "params, field",
    [
        ({"latent": 8}, "latent"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"decoder": "laplace"}, "decoder"),
        ({"gaussian_sigma": 0.0}, "gaussian_sigma"),
        ({"hidden_channels": ()}, "hidden_channels"),
        ({"hidden_channels": (8,) * 7}, "hidden_channels"),
        ({"hidden_channels": (8, 0)}, "hidden_channels"),
        ({"hidden_channels": (12, 16)}, "norm_groups"),
        ({"norm_groups": 0}, "norm_groups"),
        ({"kl": {"kind": "cosine"}}, "kind"),
        ({"kl": {"warmup": 5}}, "warmup"),
    ],
)
def test_config_rejects_bad_keys_and_values(params, field):
    with pytest.raises(ValidationError, match=field):
        VAEConfig(**params)


def test_bad_schedule_override_names_the_dotted_key(tmp_path):
    with pytest.raises(ParamsError, match=r"models\.vae\.kl\.warmup_steps"):
        load_params(tmp_path / "params.yaml", ["models.vae.kl.kind=linear", "models.vae.kl.warmup_steps=0"])
