"""Denoising diffusion probabilistic model (Ho et al. 2020) for CelebA 64×64, with DDIM sampling.

    genflow train ddpm                                        the tiny preset (CPU, the embedded pipeline)
    genflow train ddpm --gpu --workers 1 -S models.ddpm.preset=reference \
        -S train.batch_size=128 -S train.lr=2e-4 -S train.grad_clip=1 -S train.lr_schedule=constant \
        -S train.weight_decay=0 -S train.max_steps=500000      the DDIM paper's CelebA-64 recipe
    genflow sample celeba64-ddpm@staging --n 64 --out grid.png --sampler ddim --steps 50 --eta 0

The network is an ε-prediction U-Net in the layout of Ho et al.'s diffusion_tf model (the one the
DDIM paper trains on CelebA 64): sinusoidal timestep embedding, residual blocks with GroupNorm and
dropout, single-head self-attention at the configured resolutions, skip connections from every
down block. Its size comes from a `preset` (`tiny` or `reference`); any architecture field given
beside the preset overrides the preset's value:

    -S models.ddpm.preset=reference -S models.ddpm.dropout=0.0

Training minimises L_simple (Ho et al. 2020, Algorithm 1); an exponential moving average of the
weights is updated after every optimizer step and is what `sample` and `evaluate` use (the
released model). Noise schedule: linear β (Ho et al.) or cosine (Nichol & Dhariwal 2021), held in
non-persistent buffers derived from the config: never trained, never averaged, never saved.

Sampling: `ddpm`, ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2, σ_t² = β_t),
or `ddim` over S of the T steps with stochasticity η (Song et al. 2021, Eq. 12 and 16); η = 1 is
the ancestral sampler with the posterior variance on the strided schedule, η = 0 is deterministic.
`sample_bf16` runs the U-Net under bf16 autocast on a GPU (the update of x_t stays in float32); off
by default: on an H200 it sped DDIM-50 sampling of the reference preset by only 1.07x (TF32
convolutions are already fast) and moved a pixel by up to 119 of 255 (benchmarks/gpu.py).

GroupNorm, per-image timesteps and a loss that is a mean of per-image terms: DDP over N ranks
computes what one rank computes on the combined batch.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from genflow.config import StrictModel
from genflow.models.protocol import Batch, GenerativeModel

IMAGE_SIZE = 64
IMAGE_CHANNELS = 3
PIXELS = IMAGE_CHANNELS * IMAGE_SIZE * IMAGE_SIZE

# Architecture values per preset. `reference`: the DDIM paper's CelebA-64 model (Song et al.
# 2021, App. D.1; the model of Ho et al. 2020 with channel multipliers 1,2,2,2,4), ~79 M params.
# `tiny`: the same layout, 0.75 M params, about 1 s per step of 32 images on one CPU core.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "channels": 16,
        "channel_multipliers": (1, 2, 2, 4),
        "attention_resolutions": (16,),
        "blocks_per_resolution": 1,
        "dropout": 0.0,
        "norm_groups": 8,
        "ema_decay": 0.995,
    },
    "reference": {
        "channels": 128,
        "channel_multipliers": (1, 2, 2, 2, 4),
        "attention_resolutions": (16,),
        "blocks_per_resolution": 2,
        "dropout": 0.1,
        "norm_groups": 32,
        "ema_decay": 0.9999,
    },
}


class DDPMConfig(StrictModel):
    preset: Literal["tiny", "reference"] = Field("tiny", description="architecture defaults; fields given beside it win")
    # Architecture (None: the preset's value; filled in when the config is read).
    channels: PositiveInt | None = Field(None, description="channels of the first U-Net level")
    channel_multipliers: tuple[PositiveInt, ...] | None = Field(
        None, min_length=1, max_length=6, description="channels per level, × channels; each level after the first halves the side"
    )
    attention_resolutions: tuple[PositiveInt, ...] | None = Field(None, description="sides (pixels) at which blocks self-attend")
    blocks_per_resolution: PositiveInt | None = None
    dropout: float | None = Field(None, ge=0, lt=1)
    norm_groups: PositiveInt | None = Field(None, description="GroupNorm groups; must divide every level's channels")
    ema_decay: float | None = Field(None, ge=0, lt=1, description="EMA of the weights: ema ← d·ema + (1−d)·θ per step")
    ema_warmup: bool = Field(True, description="decay min(d, (1+k)/(10+k)) after step k: a short run's EMA forgets the init")
    # Noise schedule.
    schedule: Literal["linear", "cosine"] = "linear"
    timesteps: int = Field(1000, ge=2, description="T, the diffusion steps")
    beta_start: float = Field(1e-4, gt=0, lt=1, description="linear schedule: β_1")
    beta_end: float = Field(0.02, gt=0, lt=1, description="linear schedule: β_T")
    # Sampling defaults (the keyword arguments of `sample` override them).
    sampler: Literal["ddpm", "ddim"] = "ddim"
    steps: PositiveInt = Field(50, description="ddim: S, the denoising steps (ddpm always runs all T)")
    eta: float = Field(0.0, ge=0, description="ddim: η, 0 deterministic, 1 ancestral")
    sample_bf16: bool = Field(False, description="U-Net under bf16 autocast when sampling on a GPU (1.07x on an H200; off)")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "tiny")
        if preset not in PRESETS:
            return data  # the Literal check names the valid presets
        return {**data, **{key: value for key, value in PRESETS[preset].items() if data.get(key) is None}}

    @model_validator(mode="after")
    def _consistent(self) -> "DDPMConfig":
        widths = [self.channels * m for m in self.channel_multipliers]
        bad = sorted({w for w in widths if w % self.norm_groups})
        if bad:
            raise ValueError(f"models.ddpm.norm_groups: {self.norm_groups} groups must divide every level's channels; {bad} do not")
        sides = [IMAGE_SIZE >> level for level in range(len(self.channel_multipliers))]
        stray = [r for r in self.attention_resolutions if r not in sides]
        if stray:
            raise ValueError(f"models.ddpm.attention_resolutions: {stray} are not sides of this U-Net's levels {sides}")
        if self.steps > self.timesteps:
            raise ValueError(f"models.ddpm.steps: {self.steps} DDIM steps exceed T = {self.timesteps}")
        if self.schedule == "linear" and self.beta_start > self.beta_end:
            raise ValueError(f"models.ddpm.beta_start {self.beta_start} is above beta_end {self.beta_end}")
        return self


# --- the noise schedule and the Gaussian algebra of the forward process ----------------------------


def linear_betas(timesteps: int, start: float, end: float) -> torch.Tensor:
    # Ho et al. 2020, Sec. 4: β_t rising linearly from β_1 = 1e-4 to β_T = 0.02.
    return torch.linspace(start, end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021, Eq. 17: ᾱ_t = f(t)/f(0), f(t) = cos²(π/2 · (t/T + s)/(1 + s)),
    # β_t = 1 − ᾱ_t/ᾱ_{t−1} clipped to 0.999 (their Sec. 3.2) against the singularity at t = T.
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


class NoiseSchedule(nn.Module):
    """β_1..β_T and what follows from them. Index k holds the paper's t = k + 1; `alpha_bar_prev`
    holds ᾱ_{t−1} with ᾱ_0 = 1. Float64, and every coefficient is formed in float64 before it
    meets float32 images: 1 − ᾱ_t is 1e-4 at t = 1 and would keep 3 digits in float32.
    Buffers are non-persistent: derived from the config, they are neither saved nor loaded, and
    the EMA (over parameters) never touches them."""

    def __init__(self, betas: torch.Tensor):
        super().__init__()
        betas = betas.double()
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        derived = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            # Ho et al. 2020, Eq. 7: β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t (0 at t = 1).
            "posterior_variance": (1 - alpha_bar_prev) / (1 - alpha_bar) * betas,
            # Eq. 7: μ̃_t = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t.
            "posterior_x0_coef": alpha_bar_prev.sqrt() * betas / (1 - alpha_bar),
            "posterior_xt_coef": alphas.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar),
        }
        for name, value in derived.items():
            self.register_buffer(name, value, persistent=False)

    @property
    def timesteps(self) -> int:
        return len(self.betas)

    @staticmethod
    def _at(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """values[t] (float64) shaped to broadcast over images [B, C, H, W]."""
        return values[t].view(-1, 1, 1, 1)

    @staticmethod
    def _scale(coefficient: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return coefficient.to(x.dtype) * x

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        # Ho et al. 2020, Eq. 4: q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), reparameterised.
        alpha_bar = self._at(self.alpha_bar, t)
        return self._scale(alpha_bar.sqrt(), x0) + self._scale((1 - alpha_bar).sqrt(), noise)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t−1} | x_t, x_0) (Ho et al. 2020, Eq. 6–7)."""
        mean = self._scale(self._at(self.posterior_x0_coef, t), x0) + self._scale(self._at(self.posterior_xt_coef, t), xt)
        return mean, self._at(self.posterior_variance, t).to(x0.dtype)

    def predict_x0(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        # Eq. 4 solved for x_0: x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t (DDIM, Song et al. 2021, Eq. 9).
        alpha_bar = self._at(self.alpha_bar, t)
        return self._scale(alpha_bar.rsqrt(), xt) - self._scale((1 / alpha_bar - 1).sqrt(), eps)

    def ddpm_mean(self, xt: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        # Ho et al. 2020, Eq. 11: μ_θ(x_t, t) = 1/√α_t · (x_t − β_t / √(1 − ᾱ_t) · ε_θ(x_t, t)).
        beta, alpha, alpha_bar = self._at(self.betas, t), self._at(self.alphas, t), self._at(self.alpha_bar, t)
        return self._scale(alpha.rsqrt(), xt) - self._scale(beta / ((1 - alpha_bar) * alpha).sqrt(), eps)

    def ddim_step(self, xt: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, eps: torch.Tensor,
                  eta: float, noise: torch.Tensor | None) -> torch.Tensor:
        """x_{t_prev} from x_t (Song et al. 2021, Eq. 12); t_prev = −1 means ᾱ = 1, the clean image."""
        alpha_bar = self._at(self.alpha_bar, t)
        alpha_bar_prev = torch.where(t_prev >= 0, self.alpha_bar[t_prev.clamp(min=0)], 1.0).view(-1, 1, 1, 1)
        x0 = self.predict_x0(xt, t, eps)
        sigma = eta * ddim_sigma(alpha_bar, alpha_bar_prev)
        # Eq. 12: x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z.
        out = self._scale(alpha_bar_prev.sqrt(), x0) + self._scale((1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt(), eps)
        return out + self._scale(sigma, noise) if noise is not None and eta > 0 else out


def ddim_sigma(alpha_bar: torch.Tensor, alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    # Song et al. 2021, Eq. 16 at η = 1: σ = √((1 − ᾱ_{t−1}) / (1 − ᾱ_t)) · √(1 − ᾱ_t / ᾱ_{t−1}).
    return ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()


def ddim_timesteps(timesteps: int, steps: int) -> list[int]:
    """The S indices (0-based, increasing) that DDIM visits: evenly spread over 0..T−1 from 0,
    the "uniform" skip of Song et al. 2021, App. C.2; S = T visits every step."""
    return [(i * timesteps) // steps for i in range(steps)]


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Σ_pixels log P(x) per image [B], x in [−1, 1] on the 8-bit grid, under N(mean, e^{2·log_scale})
    integrated over each pixel's bin (Ho et al. 2020, Sec. 3.3, Eq. 13): bins of width 2/255 centred
    on the pixel values, the outermost extended to ±∞. In float64 and log space throughout: a bin
    in the Gaussian's tail holds ~1e-7 of its mass, below what a float32 Φ resolves."""
    half_bin = 1.0 / 255
    inv_scale = torch.exp(-log_scale.double())
    centred = (x.double() - mean.double())
    upper, lower = (centred + half_bin) * inv_scale, (centred - half_bin) * inv_scale
    # log(Φ(upper) − Φ(lower)), taken on the side of 0 where both Φ are small (Φ(−z) = 1 − Φ(z)).
    reflect = lower > 0
    high, low = torch.where(reflect, -lower, upper), torch.where(reflect, -upper, lower)
    log_high, log_low = torch.special.log_ndtr(high), torch.special.log_ndtr(low)
    inner = log_high + torch.log(-torch.expm1(log_low - log_high))
    log_prob = torch.where(x < -0.999, torch.special.log_ndtr(upper),           # (−∞, x + 1/255]
                           torch.where(x > 0.999, torch.special.log_ndtr(-lower), inner))  # [x − 1/255, ∞)
    return log_prob.flatten(1).sum(dim=1).to(x.dtype)


def gaussian_kl(mean1: torch.Tensor, var1: torch.Tensor, mean2: torch.Tensor, var2: torch.Tensor) -> torch.Tensor:
    """Σ_pixels KL(N(mean1, var1) || N(mean2, var2)) per image [B], in nats."""
    kl = 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)
    return kl.expand_as(torch.broadcast_tensors(mean1, mean2)[0]).flatten(1).sum(dim=1)


# --- the ε-prediction U-Net --------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017, Sec. 3.5, as Ho et al. use it)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    angles = t.float()[:, None] * frequencies[None]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(embedding, (0, dim % 2))


class ResidualBlock(nn.Module):
    """GroupNorm → SiLU → conv, + the timestep's projection, GroupNorm → SiLU → dropout → conv; skip."""

    def __init__(self, c_in: int, c_out: int, embedding_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(embedding_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(embedding))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the pixels of a feature map, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(dim=1)  # [B, HW, C] each
        attended = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(attended.transpose(1, 2).reshape(b, c, h, w))


class Level(nn.Module):
    """One resolution's residual blocks, each followed by attention where the level attends."""

    def __init__(self, ins: list[int], c_out: int, embedding_dim: int, dropout: float, groups: int, attend: bool):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(c_in, c_out, embedding_dim, dropout, groups) for c_in in ins)
        self.attentions = nn.ModuleList(SelfAttention(c_out, groups) if attend else nn.Identity() for _ in ins)


class UNet(nn.Module):
    """ε_θ(x_t, t): the U-Net of Ho et al. 2020 (App. B), sized by the config."""

    def __init__(self, config: DDPMConfig):
        super().__init__()
        base, groups, dropout = config.channels, config.norm_groups, config.dropout
        embedding_dim = 4 * base
        self.base = base
        self.time = nn.Sequential(nn.Linear(base, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
        self.stem = nn.Conv2d(IMAGE_CHANNELS, base, 3, padding=1)

        widths = [base * m for m in config.channel_multipliers]
        attends = [(IMAGE_SIZE >> level) in config.attention_resolutions for level in range(len(widths))]
        blocks = config.blocks_per_resolution

        # Down: each level's blocks, then (but at the last level) a stride-2 conv. Every block's
        # and downsampler's output is kept for a skip connection, the stem's too.
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_widths, width = [base], base
        for level, (c_out, attend) in enumerate(zip(widths, attends)):
            self.down.append(Level([width] + [c_out] * (blocks - 1), c_out, embedding_dim, dropout, groups, attend))
            width = c_out
            skip_widths += [width] * blocks
            last = level == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(width, width, 3, stride=2, padding=1))
            if not last:
                skip_widths.append(width)

        self.middle = nn.ModuleList([
            ResidualBlock(width, width, embedding_dim, dropout, groups),
            SelfAttention(width, groups),
            ResidualBlock(width, width, embedding_dim, dropout, groups),
        ])

        # Up: blocks + 1 per level, each taking one skip; then (but at the top) nearest ×2 + conv.
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(len(widths))):
            c_out = widths[level]
            ins = []
            for _ in range(blocks + 1):
                ins.append(width + skip_widths.pop())
                width = c_out
            self.up.append(Level(ins, c_out, embedding_dim, dropout, groups, attends[level]))
            self.upsample.append(nn.Conv2d(width, width, 3, padding=1) if level else nn.Identity())

        self.head = nn.Sequential(nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, IMAGE_CHANNELS, 3, padding=1))
        # Zero-initialised output (Ho et al.'s diffusion_tf, init_scale 0): an untrained model
        # predicts ε̂ = 0, so its L_simple is exactly E‖ε‖²/D = 1, a clean baseline.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        embedding = self.time(timestep_embedding(t, self.base))
        h = self.stem(x)
        skips = [h]
        for level, downsample in zip(self.down, self.downsample):
            for block, attention in zip(level.blocks, level.attentions):
                h = attention(block(h, embedding))
                skips.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)
                skips.append(h)
        h = self.middle[2](self.middle[1](self.middle[0](h, embedding)), embedding)
        for level, upsample in zip(self.up, self.upsample):
            for block, attention in zip(level.blocks, level.attentions):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), embedding))
            if not isinstance(upsample, nn.Identity):
                h = upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.head(h)


# --- the family ----------------------------------------------------------------------------------------


class DDPM(GenerativeModel):
    config_class = DDPMConfig
    image_range = (-1.0, 1.0)
    primary_metric = "fd_effnet"

    def __init__(self, config: DDPMConfig):
        super().__init__(config)
        betas = linear_betas(config.timesteps, config.beta_start, config.beta_end) if config.schedule == "linear" \
            else cosine_betas(config.timesteps)
        self.schedule = NoiseSchedule(betas)
        self.unet = UNet(config)
        # The averaged weights: saved with the model, never trained, always in eval mode (no dropout).
        self.ema = copy.deepcopy(self.unet).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "DDPM":
        super().train(mode)
        self.ema.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.unet.parameters())

    # --- training ---

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        x0 = batch.images.float()
        # Ho et al. 2020, Algorithm 1: t ~ U{1..T}, ε ~ N(0, I),
        # ∇_θ ‖ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t)‖² (as a mean over pixels and images).
        t = torch.randint(0, self.schedule.timesteps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        eps = self.unet(self.schedule.q_sample(x0, t, noise), t).float()
        loss = F.mse_loss(eps, noise)
        return {"loss": loss, "l_simple": loss.detach()}

    def ema_decay_at(self, step: int) -> float:
        """The decay after `step` optimizer steps. With warm-up, min(d, (1 + k)/(10 + k)), the
        num_updates rule of TensorFlow's ExponentialMovingAverage: at 0.9999 a plain EMA would
        still hold 97% of the initial weights after 300 steps; this one reaches d at k = (10d − 1)/(1 − d)."""
        decay = self.config.ema_decay
        return min(decay, (1 + step) / (10 + step)) if self.config.ema_warmup else decay

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA of the U-Net's parameters: ema ← d·ema + (1 − d)·θ (schedule buffers untouched);
        a pure function of `step`, so a resumed run averages as an uninterrupted one."""
        ema, online = list(self.ema.parameters()), list(self.unet.parameters())
        torch._foreach_lerp_(ema, online, 1.0 - self.ema_decay_at(step))

    # --- evaluation ---

    def l_simple(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """‖ε − ε_θ(x_t, t)‖² / D per image [B] of the EMA model (Ho et al. 2020, Eq. 14)."""
        eps = self.ema(self.schedule.q_sample(x0, t, noise), t).float()
        return (eps - noise).square().flatten(1).mean(dim=1)

    def vlb_term(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One term of the variational bound per image [B], in nats, at 0-based index t (paper t+1)
        with x_t = q_sample(x0, t, noise), for the EMA model with p_θ's variance σ_t² = β_t:
        t ≥ 1: L_{t} = KL(q(x_t | x_{t+1}, x_0) || p_θ(x_t | x_{t+1}))  [paper: L_{t−1}, Eq. 5]
        t = 0: L_0 = −log p_θ(x_0 | x_1), the discretised decoder (Sec. 3.3, Eq. 13)."""
        xt = self.schedule.q_sample(x0, t, noise)
        model_mean = self.schedule.ddpm_mean(xt, t, self.ema(xt, t).float())
        variance = NoiseSchedule._at(self.schedule.betas, t).float()
        true_mean, true_variance = self.schedule.q_posterior(x0, xt, t)
        decoder_nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * variance.log())
        # q's posterior variance is 0 at t = 0; clamped there, where the KL is not used.
        kl = gaussian_kl(true_mean, true_variance.clamp(min=1e-20), model_mean, variance)
        return torch.where(t == 0, decoder_nll, kl)

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per image [B], in nats (Ho et al. 2020, Eq. 5)."""
        alpha_bar = self.schedule.alpha_bar[-1].float()
        return gaussian_kl(alpha_bar.sqrt() * x0, (1 - alpha_bar).expand_as(x0), torch.zeros_like(x0), torch.ones_like(x0))

    def vlb_estimate(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """An unbiased estimate of the negative variational bound −log p(x_0) ≤ L per image [B],
        in nats: L = L_T + Σ_{t=2..T} L_{t−1} + L_0 (Ho et al. 2020, Eq. 5). L_T is exact; the sum
        is estimated from one timestep t ~ U{2..T} per image as (T − 1)·L_{t−1}, whose expectation
        over t is the sum; each L_{t−1} and L_0 from one draw of x_t ~ q(x_t | x_0). Unbiased, not
        low-variance: average it over many images."""
        b, timesteps = len(x0), self.schedule.timesteps
        t = torch.randint(1, timesteps, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        middle = (timesteps - 1) * self.vlb_term(x0, t, noise)
        decoder = self.vlb_term(x0, torch.zeros_like(t), torch.randn(x0.shape, device=x0.device, generator=generator))
        return self.prior_kl(x0) + middle + decoder

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Held-out L_simple and the variational bound estimate of the EMA model, drawn from the
        global RNG. The callers seed it per batch (the loop's validation from (seed, batch index),
        `genflow evaluate` from evaluate.seed), so two checkpoints are scored with the same draws
        (common random numbers) while the timesteps differ from batch to batch: averaged over
        batches, both estimates converge to their expectations. A generator reseeded on every call
        would freeze the timesteps, and the average would keep that one draw's error."""
        x0 = batch.images.float()
        t = torch.randint(0, self.schedule.timesteps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        bound = self.vlb_estimate(x0)
        return {
            "l_simple": self.l_simple(x0, t, noise).mean(),
            # −log p(x) ≤ L per image; / (D ln 2): bits per 8-bit sub-pixel, an upper bound on the NLL.
            "vlb_bits_per_dim_estimate": (bound / (x0[0].numel() * math.log(2))).mean(),
        }

    # --- sampling ---

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | None = None, generator: torch.Generator | None = None, *,
               sampler: str | None = None, steps: int | None = None, eta: float | None = None) -> torch.Tensor:
        """n images from the EMA model, uint8 [n, 3, 64, 64]. `sampler`, `steps` and `eta` default
        to the config's; `steps` and `eta` apply to ddim only (ddpm runs Algorithm 2 over all T)."""
        self.check_unconditional(cond)
        device = self.device()
        noise_device = generator.device if generator is not None else device
        x = torch.randn(n, IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=generator, device=noise_device).to(device)
        return self.to_uint8(self.denoise(x, generator, sampler=sampler, steps=steps, eta=eta))

    def sampling_choices(self, sampler: str | None, steps: int | None, eta: float | None) -> tuple[str, int, float]:
        """The sampler, S and η a call asks for, defaults filled in; a clear error for a bad choice."""
        sampler = sampler or self.config.sampler
        timesteps = self.schedule.timesteps
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"ddpm: unknown sampler {sampler!r}; choose ddpm or ddim")
        if sampler == "ddpm":
            if steps not in (None, timesteps) or eta is not None:
                raise ValueError(f"ddpm: the ddpm sampler runs all T = {timesteps} steps (Algorithm 2) and takes neither steps nor eta; "
                                 "for fewer steps use --sampler ddim --steps S (--eta 1 is ancestral)")
            return sampler, timesteps, 1.0
        steps = self.config.steps if steps is None else int(steps)
        eta = self.config.eta if eta is None else float(eta)
        if not 1 <= steps <= timesteps:
            raise ValueError(f"ddpm: ddim steps must be between 1 and T = {timesteps}, got {steps}")
        if eta < 0 or not math.isfinite(eta):
            raise ValueError(f"ddpm: eta must be a finite number ≥ 0, got {eta}")
        return sampler, steps, eta

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, generator: torch.Generator | None = None, *, sampler: str | None = None,
                steps: int | None = None, eta: float | None = None) -> torch.Tensor:
        """Run the reverse process from x_T = `x` down to x_0, in model range (float32)."""
        sampler, steps, eta = self.sampling_choices(sampler, steps, eta)
        device, n = x.device, len(x)
        bf16 = device.type == "cuda" and self.config.sample_bf16

        def eps_at(t: int) -> tuple[torch.Tensor, torch.Tensor]:
            t_batch = torch.full((n,), t, device=device, dtype=torch.long)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                return t_batch, self.ema(x, t_batch).float()

        def normal() -> torch.Tensor:
            noise_device = generator.device if generator is not None else device
            return torch.randn(x.shape, generator=generator, device=noise_device).to(device)

        x = x.float()
        if sampler == "ddpm":
            for t in reversed(range(self.schedule.timesteps)):
                t_batch, eps = eps_at(t)
                # Ho et al. 2020, Algorithm 2: x_{t−1} = μ_θ(x_t, t) + σ_t z, σ_t² = β_t, z = 0 at t = 1.
                x = self.schedule.ddpm_mean(x, t_batch, eps)
                if t > 0:
                    x = x + self.schedule.betas[t].sqrt().float() * normal()
            return x
        visited = ddim_timesteps(self.schedule.timesteps, steps)
        for t, t_prev in zip(reversed(visited), reversed([-1] + visited[:-1])):
            t_batch, eps = eps_at(t)
            x = self.schedule.ddim_step(x, t_batch, torch.full_like(t_batch, t_prev), eps, eta,
                                        normal() if eta > 0 else None)
        return x
