"""ddpm: the diffusion algebra against independent computations, the samplers, the EMA, the bound."""

import math

import pytest
import torch
from pydantic import ValidationError

from genflow.config import ParamsError, load_params
from genflow.models.ddpm import (
    DDPM,
    PRESETS,
    DDPMConfig,
    NoiseSchedule,
    cosine_betas,
    ddim_sigma,
    ddim_timesteps,
    discretized_gaussian_log_likelihood,
    linear_betas,
)
from genflow.models.protocol import Batch
from genflow.models.saved import load_model, save_model

# Small enough for CPU tests; attention fires at the second level ("32" is its side on 64px input).
SMALL = {"channels": 8, "channel_multipliers": (1, 2), "attention_resolutions": (32,), "norm_groups": 4,
         "timesteps": 20, "steps": 5}


def small_ddpm(**overrides) -> DDPM:
    torch.manual_seed(0)
    return DDPM(DDPMConfig(**{**SMALL, **overrides}))


def randomize_output(model: DDPM) -> None:
    """Give the zero-initialised output conv weights (of both U-Nets), so ε̂ depends on the input."""
    with torch.no_grad():
        for net in (model.unet, model.ema):
            net.head[-1].weight.normal_(0, 0.05)


def pixel_grid_images(n: int, side: int = 8, seed: int = 0) -> torch.Tensor:
    """Images on the 8-bit grid in [−1, 1], as the loader makes them."""
    levels = torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(seed))
    return levels.float() * (2 / 255) - 1


SCHEDULES = {
    "linear": linear_betas(1000, 1e-4, 0.02),
    "cosine": cosine_betas(1000),
}


# --- the forward process and its posterior ---------------------------------------------------------


@pytest.mark.parametrize("kind", SCHEDULES)
def test_q_sample_matches_the_forward_process_iterated(kind):
    betas = SCHEDULES[kind]
    schedule = NoiseSchedule(betas).double()
    # Iterate q(x_t | x_{t−1}) = N(√(1 − β_t) x_{t−1}, β_t) exactly on the Gaussian's parameters
    # (Ho et al. 2020, Eq. 2): mean m_t = √(1−β_t) m_{t−1}, variance v_t = (1−β_t) v_{t−1} + β_t.
    x0 = torch.linspace(-1, 1, 5, dtype=torch.float64).view(5, 1, 1, 1)
    mean, variance = x0.clone(), torch.zeros(())
    for t, beta in enumerate(betas.tolist()):
        mean, variance = math.sqrt(1 - beta) * mean, (1 - beta) * variance + beta
        if t in (0, 1, 9, 499, 998, 999):
            index = torch.full((5,), t)
            closed_mean = schedule.q_sample(x0, index, torch.zeros_like(x0))
            closed_std = schedule.q_sample(torch.zeros_like(x0), index, torch.ones_like(x0))
            torch.testing.assert_close(closed_mean, mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(closed_std, torch.full_like(x0, variance).sqrt(), rtol=1e-5, atol=1e-6)


def test_q_sample_matches_monte_carlo_of_the_chain():
    betas = linear_betas(50, 1e-3, 0.2)
    schedule = NoiseSchedule(betas)
    generator = torch.Generator().manual_seed(0)
    n, x0 = 200_000, 0.7
    x = torch.full((n,), x0)
    for beta in betas.tolist():  # sample the chain step by step (Ho et al. 2020, Eq. 2)
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn(n, generator=generator)
    closed = schedule.q_sample(torch.full((1, 1, 1, 1), x0), torch.tensor([49]), torch.zeros(1, 1, 1, 1)).item()
    closed_var = (1 - schedule.alpha_bar[49]).item()
    assert abs(x.mean().item() - closed) < 5 * math.sqrt(closed_var / n)
    assert abs(x.var().item() - closed_var) < 5 * closed_var * math.sqrt(2 / n)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_posterior_matches_bayes_rule(kind):
    betas = SCHEDULES[kind]
    schedule = NoiseSchedule(betas).double()
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 3, 2, 2, generator=generator, dtype=torch.float64)
    xt = torch.randn(6, 3, 2, 2, generator=generator, dtype=torch.float64)
    t = torch.tensor([1, 2, 50, 400, 900, 999])
    mean, variance = schedule.q_posterior(x0, xt, t)

    # Bayes with Gaussians: prior q(x_{t−1} | x_0) = N(√ᾱ_{t−1} x_0, 1 − ᾱ_{t−1}), likelihood
    # q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t): precisions add, means weight by precision.
    alpha_bar = torch.cumprod(1 - betas, 0)
    for row, step in enumerate(t.tolist()):
        prior_mean, prior_var = alpha_bar[step - 1].sqrt() * x0[row], 1 - alpha_bar[step - 1]
        beta = betas[step]
        precision = 1 / prior_var + (1 - beta) / beta
        expected_mean = (prior_mean / prior_var + (1 - beta).sqrt() * xt[row] / beta) / precision
        torch.testing.assert_close(mean[row], expected_mean, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(variance[row].squeeze(), 1 / precision, rtol=1e-4, atol=1e-9)
    # At t = 1 (index 0) the posterior is x_0 itself: Eq. 7 with ᾱ_0 = 1.
    at_one_mean, at_one_var = schedule.q_posterior(x0, xt, torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(at_one_mean, x0)
    assert (at_one_var == 0).all()


def test_cosine_schedule_follows_nichol_dhariwal_eq17():
    timesteps, s = 1000, 0.008
    alpha_bar = torch.cumprod(1 - cosine_betas(timesteps), 0)
    t = torch.arange(1, timesteps + 1, dtype=torch.float64)
    f = lambda u: torch.cos((u / timesteps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = f(t) / f(torch.zeros((), dtype=torch.float64))
    # β is clipped at 0.999 only at the very end (t → T); elsewhere ᾱ_t is Eq. 17 exactly.
    torch.testing.assert_close(alpha_bar[:-1], expected[:-1], rtol=1e-9, atol=1e-12)
    assert cosine_betas(timesteps).max() <= 0.999


# --- the samplers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SCHEDULES)
def test_ddim_with_eta_one_and_every_step_has_the_ddpm_posterior_variance(kind):
    schedule = NoiseSchedule(SCHEDULES[kind]).double()
    visited = ddim_timesteps(1000, 1000)
    assert visited == list(range(1000))
    t = torch.arange(1, 1000)
    sigma = ddim_sigma(schedule.alpha_bar[t], schedule.alpha_bar[t - 1])
    torch.testing.assert_close(sigma**2, schedule.posterior_variance[t], rtol=1e-6, atol=1e-12)

    # And one η = 1 step is a draw of q(x_{t−1} | x_t, x̂_0): μ̃(x̂_0, x_t) + √β̃_t z (Eq. 6–7).
    generator = torch.Generator().manual_seed(2)
    xt, eps, z = (torch.randn(4, 3, 2, 2, generator=generator, dtype=torch.float64) for _ in range(3))
    index = torch.tensor([1, 10, 500, 999])
    stepped = schedule.ddim_step(xt, index, index - 1, eps, eta=1.0, noise=z)
    mean, variance = schedule.q_posterior(schedule.predict_x0(xt, index, eps), xt, index)
    torch.testing.assert_close(stepped, mean + variance.sqrt() * z, rtol=1e-6, atol=1e-6)


def test_ddim_with_eta_zero_is_deterministic_given_the_initial_noise():
    model = small_ddpm()
    randomize_output(model)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # denoise takes any size
    runs = [model.denoise(x_T.clone(), torch.Generator().manual_seed(seed), sampler="ddim", steps=5, eta=0.0)
            for seed in (1, 2)]
    assert torch.equal(runs[0], runs[1])
    # η > 0 does draw noise on the way, so other generators give other images.
    noisy = [model.denoise(x_T.clone(), torch.Generator().manual_seed(seed), sampler="ddim", steps=5, eta=1.0)
             for seed in (1, 2)]
    assert not torch.equal(noisy[0], noisy[1])

    same = [model.sample(2, generator=torch.Generator().manual_seed(7), sampler="ddim", eta=0.0) for _ in range(2)]
    other = model.sample(2, generator=torch.Generator().manual_seed(8), sampler="ddim", eta=0.0)
    assert same[0].dtype == torch.uint8 and same[0].shape == (2, 3, 64, 64)
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], other)


def test_ddpm_sampler_follows_algorithm_2():
    model = small_ddpm(timesteps=4, steps=4)
    randomize_output(model)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = model.denoise(x_T.clone(), torch.Generator().manual_seed(5), sampler="ddpm")

    # Algorithm 2 by hand, with the same noise draws: x_{t−1} = (x_t − β_t/√(1−ᾱ_t) ε̂)/√α_t + √β_t z.
    betas = linear_betas(4, 1e-4, 0.02)
    alphas, alpha_bar = 1 - betas, torch.cumprod(1 - betas, 0)
    generator, x = torch.Generator().manual_seed(5), x_T.clone()
    for t in reversed(range(4)):
        eps = model.ema(x, torch.full((2,), t)).float()
        x = (x - betas[t] / (1 - alpha_bar[t]).sqrt() * eps) / alphas[t].sqrt()
        if t > 0:
            x = x + betas[t].sqrt() * torch.randn(x.shape, generator=generator)
    torch.testing.assert_close(out, x.float(), rtol=1e-4, atol=1e-5)


def test_sampler_choices_are_checked():
    model = small_ddpm()
    assert model.sampling_choices(None, None, None) == ("ddim", 5, 0.0)
    assert model.sampling_choices("ddpm", None, None) == ("ddpm", 20, 1.0)
    with pytest.raises(ValueError, match="ddpm sampler runs all T = 20 steps"):
        model.sample(1, sampler="ddpm", steps=5)
    with pytest.raises(ValueError, match="takes neither steps nor eta"):
        model.sample(1, sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        model.sample(1, sampler="euler")
    with pytest.raises(ValueError, match="between 1 and T = 20"):
        model.sample(1, steps=21)
    with pytest.raises(ValueError, match="unconditional"):
        model.sample(1, cond=torch.zeros(1, 40))


# --- training: the EMA and the buffers -------------------------------------------------------------


@pytest.mark.parametrize("warmup, step, decay", [(False, 1, 0.9), (False, 10_000, 0.9), (True, 5, 6 / 15), (True, 10_000, 0.9)])
def test_ema_update_matches_its_formula(warmup, step, decay):
    model = small_ddpm(ema_decay=0.9, ema_warmup=warmup)
    online = [torch.randn_like(p) for p in model.unet.parameters()]
    averaged = [torch.randn_like(p) for p in model.ema.parameters()]
    with torch.no_grad():
        for p, value in zip(model.unet.parameters(), online):
            p.copy_(value)
        for p, value in zip(model.ema.parameters(), averaged):
            p.copy_(value)
    model.after_step(step)
    # ema ← d·ema + (1 − d)·θ, d = min(0.9, (1 + k)/(10 + k)) with warm-up
    for p, before, theta in zip(model.ema.parameters(), averaged, online):
        torch.testing.assert_close(p, decay * before + (1 - decay) * theta)


def test_training_moves_only_the_unet_and_the_ema_never_the_schedule():
    model = small_ddpm(ema_decay=0.5)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.unet.parameters()}
    assert not any(p.requires_grad for p in model.ema.parameters())
    buffers = {name: b.clone() for name, b in model.schedule.named_buffers()}
    ema_before = [p.clone() for p in model.ema.parameters()]
    batch = Batch(pixel_grid_images(2, side=32), torch.zeros(2, 40))
    model.train()
    assert not model.ema.training  # the EMA U-Net never drops out
    for step in range(2):
        output = model.training_step(batch, step)
        optimizer.zero_grad()
        output["loss"].backward()
        assert all(p.grad is None for p in model.ema.parameters())
        optimizer.step()
        model.after_step(step + 1)
    for name, value in model.schedule.named_buffers():
        assert torch.equal(value, buffers[name]), name
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, model.ema.parameters()))
    # The released model carries the EMA, not the derived schedule.
    keys = model.state_dict().keys()
    assert any(k.startswith("ema.") for k in keys) and not any(k.startswith("schedule.") for k in keys)


def test_untrained_model_scores_l_simple_one_and_the_model_file_round_trips(tmp_path):
    model = small_ddpm()
    batch = Batch(pixel_grid_images(4, side=64), torch.zeros(4, 40))
    metrics = model.evaluate(batch)
    # ε̂ ≡ 0 (zero-initialised head): L_simple = E‖ε‖²/D ≈ 1 (D·4 = 49,152 squares: ± 0.02 is 3.1 σ).
    assert abs(metrics["l_simple"].item() - 1) < 0.02
    assert math.isfinite(metrics["vlb_bits_per_dim_estimate"].item())
    randomize_output(model)
    save_model(tmp_path / "model.pt", "ddpm", model)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    seed = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(loaded.sample(2, generator=seed()), model.eval().sample(2, generator=seed()))


def test_evaluate_draws_its_timesteps_from_the_seeded_global_rng_not_a_frozen_generator():
    # Review finding: a generator reseeded inside `evaluate` scored every batch at the same
    # timesteps, so averaging over batches never removed that one draw's error. The callers seed
    # the global RNG per batch; the same seed must give the same scores, another seed others.
    model = small_ddpm()
    randomize_output(model)
    batch = Batch(pixel_grid_images(4, side=64), torch.zeros(4, 40))

    def scored(seed):
        torch.manual_seed(seed)
        return model.evaluate(batch)["vlb_bits_per_dim_estimate"].item()

    assert scored(1) == scored(1)
    assert scored(1) != scored(2)


# --- the variational bound -------------------------------------------------------------------------


def test_discretized_decoder_matches_integrating_the_density():
    x = torch.tensor([-1.0, -1 + 2 / 255, 0.2 * 255 // 1 * 2 / 255 - 1, 1 - 2 / 255, 1.0]).view(1, 5, 1, 1)
    mean = torch.tensor([-0.98, -0.99, -0.5, 0.995, 0.97]).view(1, 5, 1, 1)
    scale = 0.02
    got = discretized_gaussian_log_likelihood(x, mean, torch.full_like(x, math.log(scale)))
    # Trapezoid rule over each bin of the Gaussian density (outer bins out to ±10σ past the mean).
    total = 0.0
    for value, mu in zip(x.flatten().tolist(), mean.flatten().tolist()):
        low = value - 1 / 255 if value > -0.999 else mu - 10 * scale
        high = value + 1 / 255 if value < 0.999 else mu + 10 * scale
        grid = torch.linspace(low, high, 200_001, dtype=torch.float64)
        density = torch.exp(-0.5 * ((grid - mu) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))
        total += math.log(torch.trapezoid(density, grid).item())
    assert got.item() == pytest.approx(total, rel=1e-4)


def test_vlb_estimate_is_unbiased_for_the_exact_bound():
    """With ε̂ ≡ 0 (the untrained model) every term of the bound has a closed form; the random-
    timestep estimate, averaged over many draws, must agree within its standard error."""
    timesteps = 5
    model = small_ddpm(timesteps=timesteps, steps=5, beta_start=0.01, beta_end=0.3)
    levels = torch.tensor([0, 1, 128, 254, 255]).float() * (2 / 255) - 1  # pixel values, edges too
    x0 = levels.view(5, 1, 1, 1).expand(5, 3, 8, 8)  # image i: every pixel at level i
    draws = 1000
    estimates = model.vlb_estimate(x0.repeat(draws, 1, 1, 1), torch.Generator().manual_seed(0)).view(draws, 5)
    estimate, standard_error = estimates.mean(0).double(), estimates.std(0).double() / math.sqrt(draws)

    # The exact bound per pixel, in float64 from the betas (Ho et al. 2020, Eq. 5):
    betas = linear_betas(timesteps, 0.01, 0.3)
    alphas, alpha_bar = 1 - betas, torch.cumprod(1 - betas, 0)
    v = levels.double()
    prior = 0.5 * (alpha_bar[-1] * v**2 + (1 - alpha_bar[-1]) - 1 - torch.log(1 - alpha_bar[-1]))
    middle = torch.zeros_like(v)
    for t in range(1, timesteps):  # E_{x_t} KL(q(x_{t−1}|x_t,x_0) || N(x_t/√α_t, β_t))
        c0 = alpha_bar[t - 1].sqrt() * betas[t] / (1 - alpha_bar[t])
        c1 = alphas[t].sqrt() * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t])
        posterior_var = (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]) * betas[t]
        k = c1 - 1 / alphas[t].sqrt()
        squared_gap = (c0 + k * alpha_bar[t].sqrt()) ** 2 * v**2 + k**2 * (1 - alpha_bar[t])
        middle += 0.5 * (torch.log(betas[t] / posterior_var) + (posterior_var + squared_gap) / betas[t] - 1)
    # E_{x_1} −log P(x_0 | N(x_1/√α_1, β_1)) over a grid of ε (x_1/√α_1 = x_0 + √(β_1/α_1) ε).
    eps = torch.linspace(-9, 9, 40_001, dtype=torch.float64)
    weights = torch.exp(-0.5 * eps**2) / math.sqrt(2 * math.pi)
    sigma = betas[0].sqrt()
    phi = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))  # noqa: E731
    decoder = torch.zeros_like(v)
    for i, value in enumerate(v.tolist()):
        mu = value + (betas[0] / alphas[0]).sqrt() * eps
        upper = phi((value + 1 / 255 - mu) / sigma) if value < 0.999 else torch.ones_like(mu)
        lower = phi((value - 1 / 255 - mu) / sigma) if value > -0.999 else torch.zeros_like(mu)
        # Where ε is 9σ out the mass underflows; its weight there is e^{-40}, so the clamp is harmless.
        decoder[i] = torch.trapezoid(-torch.log((upper - lower).clamp(min=1e-300)) * weights, eps)
    exact = (prior + middle + decoder) * 3 * 8 * 8

    assert (standard_error < 0.02 * exact).all(), "too few draws to test anything"
    assert ((estimate - exact).abs() < 4 * standard_error).all(), (estimate, exact, standard_error)


# --- config ----------------------------------------------------------------------------------------


def test_presets_fill_what_is_not_given_and_overrides_win():
    reference = DDPMConfig(preset="reference")
    assert (reference.channels, reference.channel_multipliers, reference.blocks_per_resolution) == (128, (1, 2, 2, 2, 4), 2)
    assert (reference.attention_resolutions, reference.dropout, reference.ema_decay) == ((16,), 0.1, 0.9999)
    assert DDPMConfig(preset="reference", dropout=0.0).dropout == 0.0
    assert DDPMConfig().channels == PRESETS["tiny"]["channels"]
    # A saved config reads back as itself.
    assert DDPMConfig(**reference.model_dump(mode="json")) == reference
    # As a user selects it: -S models.ddpm.preset=reference, over the shipped params.yaml.
    params = load_params(overrides=["models.ddpm.preset=reference"])
    assert params.family_config("ddpm").channels == 128


def test_reference_preset_has_the_ddim_papers_parameter_count():
    with torch.device("meta"):
        model = DDPM(DDPMConfig(preset="reference"))
    count = sum(p.numel() for p in model.unet.parameters())
    assert 78e6 < count < 80e6, count  # Song et al. 2021 (DDIM), CelebA 64: 78.7 M


@pytest.mark.parametrize("bad, message", [
    ({"norm_groups": 3}, "must divide every level's channels"),
    ({"attention_resolutions": (12,)}, "not sides of this U-Net's levels"),
    ({"steps": 2000}, "exceed T"),
    ({"preset": "huge"}, "tiny"),
])
def test_bad_config_is_a_clear_error(bad, message):
    with pytest.raises(ValidationError, match=message):
        DDPMConfig(**bad)
    with pytest.raises(ParamsError, match="models.ddpm"):
        load_params(overrides=[f"models.ddpm.{key}={list(value) if isinstance(value, tuple) else value}" for key, value in bad.items()])
