"""Multi-scale normalising flow (Glow, Kingma & Dhariwal 2018) for CelebA 64×64, exact likelihood.

    genflow train flow -S models.flow.steps_per_level=8 -S models.flow.masks=checkerboard

An invertible map x -> (z_1, ..., z_L) with a tractable Jacobian, trained by maximum likelihood:
    log p(x) = Σ_l log N(z_l; μ_l, σ_l) + log |det ∂z/∂x|                (Dinh et al. 2017, Eq. 3)

Architecture (Kingma & Dhariwal 2018, Fig. 2; Dinh et al. 2017, Sec. 3.6): `levels` levels, each
    squeeze (space-to-depth: [C, H, W] -> [4C, H/2, W/2])
    `steps_per_level` × step = actnorm -> invertible 1×1 conv (LU form) -> affine coupling
    factor-out: half the channels leave as z_l (not at the last level)
The coupling's scale is bounded, s = sigmoid(h + 2) ∈ (0, 1), as Glow's code does, so that no step
can blow a value up. Coupling masks (`masks`):
    channel       Glow: the coupling net reads one half of the channels and transforms the other
                  (halves alternate; the 1×1 convs mix channels between steps anyway).
    checkerboard  RealNVP-style masks (after Dinh et al. 2017, Sec. 3.4-3.6): in each level the first
                  half of the steps use spatial checkerboard masks (alternating parity), the rest
                  channel masks (alternating halves). Unlike RealNVP, whose checkerboard couplings
                  run before the squeeze, these run after it: a checkerboard of 2×2 pixel blocks.
                  Exact and invertible all the same; not RealNVP's architecture, so its 3.02 bits/dim
                  is a reference point, not a reproduction.
Priors: each factored-out z_l ~ N(μ(h), σ(h)), learned, conditioned on the half h that stays (Glow's
"split prior", a zero-initialised conv, so N(0, I) at the start); the last level's z ~ N(0, I),
standard. Sampling draws z_l = μ + T·σ·ε, T the temperature (Glow, Sec. 5.1: T = 0.7 looks best).

Likelihood convention (Theis et al. 2016, Sec. 3.1; Dinh et al. 2017, Sec. 4.1; Glow's code). The loader
gives exactly k/255 for 8-bit pixels k; the model recovers k exactly and dequantises uniformly:
    y = (k + u) / 256,  u ~ U[0, 1)^D,   D = 3·64·64,   the flow models x = y − ½ (Jacobian 1)
A density p on [0, 1)^D gives the discrete data P(k) = ∫_{bin k} p(y) dy ≥ exp(E_u[log p(y)]) / 256^D
(Jensen), so the reported figure, an upper bound on the 8-bit data's −log2 P(k) / D, is
    bits/dim = −(log p(y) − D log 256) / (D log 2)
with one draw of u per image (an unbiased estimate of the bound). That is the number RealNVP (3.02 on
CelebA 64×64, 8-bit) and Glow report; Glow's CelebA figure (1.03) is for 5-bit CelebA-HQ 256×256, the
same convention with 32 levels, so not the same data. A density uniform on [0, 1)^D scores exactly 8.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from genflow.config import StrictModel
from genflow.models.protocol import Batch, GenerativeModel

IMAGE_SIZE = 64
IMAGE_CHANNELS = 3
PIXELS = IMAGE_CHANNELS * IMAGE_SIZE * IMAGE_SIZE  # D, the dimensions that bits/dim divides by
LEVELS_8BIT = 256


class FlowConfig(StrictModel):
    levels: int = Field(3, ge=1, le=6, description="scales; each squeezes the side by 2 (64 / 2^levels ≥ 1)")
    steps_per_level: int = Field(4, ge=1, description="actnorm -> 1×1 conv -> coupling steps per level")
    hidden_channels: int = Field(32, ge=1, description="width of each coupling's conv net")
    masks: Literal["channel", "checkerboard"] = Field("channel", description="Glow's channel masks, or RealNVP-style checkerboard then channel masks")
    temperature: float = Field(0.7, gt=0, description="sampling temperature T: z = μ + T·σ·ε")

    @model_validator(mode="after")
    def _checkerboard_needs_pixels(self) -> "FlowConfig":
        # A checkerboard on a 1×1 map leaves one parity empty: that coupling would transform nothing.
        if self.masks == "checkerboard" and IMAGE_SIZE >> self.levels < 2:
            raise ValueError(f"masks: checkerboard needs a last level of at least 2×2 pixels; "
                             f"levels={self.levels} leaves {IMAGE_SIZE >> self.levels}×{IMAGE_SIZE >> self.levels}: use levels ≤ 5")
        return self


# --- 8-bit pixels, dequantisation and bits/dim ---------------------------------------------------


def pixel_levels(images: torch.Tensor, image_range: tuple[float, float]) -> torch.Tensor:
    """Loader floats low + k·(high − low)/255 -> the integer pixels k (int64), exactly.

    Refuses images that are not on that grid (not 8-bit data from the loader), since the
    likelihood of anything else would not be a likelihood of 8-bit pixels.
    """
    low, high = image_range
    scaled = (images.double() - low) * (255.0 / (high - low))
    levels = scaled.round()
    # One check, one host sync per batch (float32 k/255 is within 1e-4 levels of k).
    if ((scaled - levels).abs() > 1e-3).logical_or_(levels < 0).logical_or_(levels > 255).any():
        off_grid = (scaled - levels).abs().max().item()
        raise ValueError(f"flow expects 8-bit pixels k/255 mapped to {image_range} (as the loader gives them); "
                         f"got values off that grid (by up to {off_grid:.3g} levels) or outside it: "
                         "pass the loader's images unchanged")
    return levels.long()


def dequantize(levels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer pixels k -> y = (k + u) / 256, u ~ U[0, 1): float32 in [0, 1), inside k's bin."""
    noise = torch.rand(levels.shape, generator=generator, device=levels.device)
    y = (levels.float() + noise) / LEVELS_8BIT
    # k + u rounds up to k + 1 in float32 when u is within 2^-24·k of 1: keep y inside k's bin.
    top = torch.nextafter((levels.float() + 1) / LEVELS_8BIT, torch.zeros((), device=levels.device))
    return torch.minimum(y, top)


def discrete_bits_per_dim(log_density: torch.Tensor, dims: int) -> torch.Tensor:
    """log p(y) per image (nats; a density on [0, 1)^dims) -> bits per dim of the 8-bit data.

    The bins of 8-bit pixels are 1/256 wide: −log P(k) ≤ −log p(y) + dims·log 256 (Theis et al.
    2016, Sec. 3.1), in bits per dim: −(log p(y) − dims·log 256) / (dims·log 2).
    """
    return -(log_density.float() - dims * math.log(LEVELS_8BIT)) / (dims * math.log(2))


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Σ log N(z; mean, exp(log_std)²) per image, in nats: [B, ...] -> [B]."""
    return (-0.5 * ((z - mean) * torch.exp(-log_std)).square() - log_std - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


# --- the invertible layers: each maps x -> (y, log|det ∂y/∂x| per image) and back --------------------
#
# Numerics: under bf16 autocast only the coupling nets and the prior convs run in bf16; their
# outputs are cast back to the stream's dtype (float32). The stream x itself, the 1×1 conv (autocast
# disabled), the affine updates, the log-determinants and the Gaussian log-densities stay in float32:
# the likelihood sums 12,288 per-dimension terms through every layer (bf16 keeps 8 bits of mantissa),
# and the inverse must undo exactly the map whose log-determinant was counted. Measured on a trained
# model: bf16 nets move an image's bits/dim by ≤ 0.003; the whole flow in bf16 by up to 0.36.


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2] (Dinh et al. 2017, Sec. 3.6): a permutation, log-det 0."""
    return F.pixel_unshuffle(x, 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(x, 2)


class ActNorm(nn.Module):
    """y = (x + b) · exp(log s) per channel (Kingma & Dhariwal 2018, Sec. 3.1, Table 1).

    Data-dependent initialisation: the first forward after `pending = True` sets b and s so that
    the output on that batch has zero mean and unit variance per channel. `initialized` is a
    persistent buffer, so a resumed run or a loaded model never initialises again.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # uint8, not bool: DDP broadcasts buffers, and gloo has no bool broadcast.
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))
        self.pending = False

    @torch.no_grad()
    def initialize_from(self, x: torch.Tensor) -> None:
        if self.initialized:
            return
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending:
            self.initialize_from(x)
            self.pending = False
        log_scale = self.log_scale.to(x.dtype)
        # Table 1: log-det = h · w · Σ log|s|, the same for every image.
        log_det = x.shape[2] * x.shape[3] * log_scale.sum()
        return (x + self.bias.to(x.dtype)) * torch.exp(log_scale), log_det.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self.log_scale.to(y.dtype)) - self.bias.to(y.dtype)


class InvertibleConv1x1(nn.Module):
    """A 1×1 convolution with W = P L (U + diag(sign(s) · exp(log|s|))) (Kingma & Dhariwal 2018, Eq. 10).

    P is a fixed permutation, L unit lower-triangular, U strictly upper-triangular: log|det W| is
    Σ log|s|, O(C) instead of O(C³). Initialised from a random rotation, as Glow.
    """

    def __init__(self, channels: int):
        super().__init__()
        rotation, _ = torch.linalg.qr(torch.randn(channels, channels))
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign_s", torch.sign(diagonal))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diagonal.abs()))

    def weight(self) -> torch.Tensor:
        eye = torch.eye(self.log_s.shape[0], dtype=self.log_s.dtype, device=self.log_s.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper

    def log_det(self, x: torch.Tensor) -> torch.Tensor:
        # Eq. 10 / Table 1: log|det| of the conv = h · w · Σ log|s|.
        return (x.shape[2] * x.shape[3] * self.log_s.sum()).to(x.dtype).expand(x.shape[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # see "Numerics" above
            weight = self.weight().to(x.dtype)
            return F.conv2d(x, weight[:, :, None, None]), self.log_det(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(y.device.type, enabled=False):
            inverse = torch.linalg.inv(self.weight().double()).to(y.dtype)
            return F.conv2d(y, inverse[:, :, None, None])


def coupling_net(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    """Glow's NN(): 3×3 conv, ReLU, 1×1 conv, ReLU, zero-initialised 3×3 conv (Sec. 3.3), so that
    each coupling starts as a fixed scaling and the flow trains stably from the start."""
    last = nn.Conv2d(hidden, c_out, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), last)


def checkerboard(height: int, width: int, parity: int, like: torch.Tensor) -> torch.Tensor:
    """[1, 1, H, W]: 1 where (i + j + parity) is even, the pixels the coupling net reads."""
    i = torch.arange(height, device=like.device)[:, None]
    j = torch.arange(width, device=like.device)[None, :]
    return ((i + j + parity) % 2 == 0).to(like.dtype)[None, None]


class AffineCoupling(nn.Module):
    """y_b = (x_b + t(x_a)) · s(x_a), y_a = x_a, s = sigmoid(h + 2) (Kingma & Dhariwal 2018, Table 1;
    the shift-then-scale order and the bound are Glow's code). log-det = Σ log s over the b part.

    `mask` "channel": a = one half of the channels (`parity` picks which); "checkerboard": a = the
    pixels of one checkerboard parity, all channels (Dinh et al. 2017, Eq. 8-9 with masks b).
    """

    def __init__(self, channels: int, hidden: int, mask: Literal["channel", "checkerboard"], parity: int):
        super().__init__()
        self.mask, self.parity = mask, parity
        if mask == "channel":
            a_channels = channels // 2
            self.cut = a_channels if parity == 0 else channels - a_channels
            self.net = coupling_net(a_channels, hidden, 2 * (channels - a_channels))
        else:
            self.net = coupling_net(channels, hidden, 2 * channels)

    def _shift_scale(self, x_a: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw = self.net(x_a).to(dtype).chunk(2, dim=1)  # a bf16 net's output -> the stream's dtype
        return shift, torch.sigmoid(raw + 2.0)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b): parity 0 reads the first half of the channels, parity 1 the second."""
        first, second = x[:, : self.cut], x[:, self.cut :]
        return (first, second) if self.parity == 0 else (second, first)

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat((a, b) if self.parity == 0 else (b, a), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask == "channel":
            x_a, x_b = self._halves(x)
            shift, scale = self._shift_scale(x_a, x.dtype)
            return self._join(x_a, (x_b + shift) * scale), torch.log(scale).flatten(1).sum(1)
        m = checkerboard(x.shape[2], x.shape[3], self.parity, x)
        shift, scale = self._shift_scale(x * m, x.dtype)
        y = x * m + (1 - m) * ((x + shift) * scale)
        return y, ((1 - m) * torch.log(scale)).flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.mask == "channel":
            y_a, y_b = self._halves(y)
            shift, scale = self._shift_scale(y_a, y.dtype)
            return self._join(y_a, y_b / scale - shift)
        m = checkerboard(y.shape[2], y.shape[3], self.parity, y)
        shift, scale = self._shift_scale(y * m, y.dtype)
        return y * m + (1 - m) * (y / scale - shift)


class FlowStep(nn.Module):
    """One step of flow: actnorm -> invertible 1×1 conv -> affine coupling (Kingma & Dhariwal 2018, Fig. 2a)."""

    def __init__(self, channels: int, hidden: int, mask: Literal["channel", "checkerboard"], parity: int):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.conv = InvertibleConv1x1(channels)
        self.coupling = AffineCoupling(channels, hidden, mask, parity)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_det_norm = self.actnorm(x)
        x, log_det_conv = self.conv(x)
        x, log_det_coupling = self.coupling(x)
        return x, log_det_norm + log_det_conv + log_det_coupling

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.actnorm.inverse(self.conv.inverse(self.coupling.inverse(y)))


class SplitPrior(nn.Module):
    """Factor-out (Dinh et al. 2017, Sec. 3.6) with Glow's learned prior: the first `keep` channels
    go on, the rest leave as z ~ N(μ(h), exp(log σ(h))²), (μ, log σ) a zero-initialised 3×3 conv of
    the kept half h."""

    def __init__(self, channels: int):
        super().__init__()
        self.keep = channels // 2
        self.prior = nn.Conv2d(self.keep, 2 * (channels - self.keep), 3, padding=1)
        nn.init.zeros_(self.prior.weight)
        nn.init.zeros_(self.prior.bias)

    def prior_of(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.prior(kept).to(kept.dtype).chunk(2, dim=1)
        return mean, log_std


class MultiScaleFlow(nn.Module):
    """x [B, C, H, W] <-> (z_1, ..., z_L), H and W divisible by 2^levels (see the module docstring)."""

    def __init__(self, channels: int, levels: int, steps_per_level: int, hidden: int,
                 masks: Literal["channel", "checkerboard"]):
        super().__init__()
        self.levels = nn.ModuleList()
        self.splits = nn.ModuleList()
        for level in range(levels):
            channels *= 4  # squeeze
            steps = []
            for index in range(steps_per_level):
                checker = masks == "checkerboard" and index < steps_per_level - steps_per_level // 2
                steps.append(FlowStep(channels, hidden, "checkerboard" if checker else "channel", index % 2))
            self.levels.append(nn.ModuleList(steps))
            if level < levels - 1:
                self.splits.append(SplitPrior(channels))
                channels = self.splits[-1].keep

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """x -> (z per level, (μ, log σ) of its prior per level, log|det ∂z/∂x| per image)."""
        log_det = x.new_zeros(x.shape[0])
        zs, priors = [], []
        h = x
        for level, steps in enumerate(self.levels):
            h = squeeze(h)
            for step in steps:
                h, step_log_det = step(h)
                log_det = log_det + step_log_det
            if level < len(self.splits):
                split = self.splits[level]
                h, z = h[:, : split.keep], h[:, split.keep :]
                priors.append(split.prior_of(h))
            else:
                z = h
                priors.append((torch.zeros_like(z), torch.zeros_like(z)))  # the top prior: N(0, I)
            zs.append(z)
        return zs, priors, log_det

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per image, in nats: change of variables (Dinh et al. 2017, Eq. 3)."""
        zs, priors, log_det = self(x)
        return sum(gaussian_log_prob(z, mean, log_std) for z, (mean, log_std) in zip(zs, priors)) + log_det

    def reverse(self, top: torch.Tensor, draw: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """From the top level's z down to x; `draw(level, μ, log σ)` gives each factored-out z."""
        h = top
        for level in reversed(range(len(self.levels))):
            if level < len(self.splits):
                mean, log_std = self.splits[level].prior_of(h)
                h = torch.cat((h, draw(level, mean, log_std)), dim=1)
            for step in reversed(self.levels[level]):
                h = step.inverse(h)
            h = unsqueeze(h)
        return h

    def inverse(self, zs: list[torch.Tensor]) -> torch.Tensor:
        """(z_1, ..., z_L), as `forward` returns them -> x."""
        return self.reverse(zs[-1], lambda level, mean, log_std: zs[level])

    def actnorms(self) -> list[ActNorm]:
        return [m for m in self.modules() if isinstance(m, ActNorm)]


# --- the family -----------------------------------------------------------------------------------


class Flow(GenerativeModel):
    config_class = FlowConfig
    image_range = (0.0, 1.0)
    primary_metric = "bits_per_dim"

    def __init__(self, config: FlowConfig):
        super().__init__(config)
        self.flow = MultiScaleFlow(IMAGE_CHANNELS, config.levels, config.steps_per_level, config.hidden_channels, config.masks)
        self._initialized_seen = False

    def _levels_of(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1:] != (IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"flow expects images [B, 3, 64, 64], got {list(images.shape)}; set data.size: 64")
        return pixel_levels(images, self.image_range)

    def log_density(self, y: torch.Tensor) -> torch.Tensor:
        """log p(y) per image (nats) of dequantised pixels y in [0, 1)^D; the flow models y − ½."""
        return self.flow.log_prob(y - 0.5)

    def bits_per_dim(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Loader images -> bits/dim per image of their 8-bit pixels (one dequantisation draw)."""
        y = dequantize(self._levels_of(images), generator)
        return discrete_bits_per_dim(self.log_density(y), PIXELS)

    @torch.no_grad()
    def initialize(self, batch: Batch) -> None:
        """Actnorm's data-dependent initialisation: one forward of `batch`, each actnorm set from
        its own input. The dequantisation noise comes from a fixed seed, not the global RNG, so
        every rank (same batch, same starting weights) ends identical. Initialised actnorms (a
        loaded or resumed model) stay as they are."""
        actnorms = self.flow.actnorms()
        if all(a.initialized for a in actnorms):
            return
        for actnorm in actnorms:
            actnorm.pending = True
        try:
            images = batch.images.to(self.device())
            generator = torch.Generator(device=images.device).manual_seed(0)
            self.log_density(dequantize(self._levels_of(images), generator))
        finally:
            for actnorm in actnorms:
                actnorm.pending = False

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        # Checked until it holds (reading the flags on a GPU syncs with the host); nothing un-initialises.
        if not self._initialized_seen and not all(a.initialized for a in self.flow.actnorms()):
            raise RuntimeError("flow: actnorm is not initialised; call model.initialize(batch) before training "
                               "(the training loop does so on a fresh run)")
        self._initialized_seen = True
        bits = self.bits_per_dim(batch.images)
        # A mean of per-image terms: DDP over N ranks computes what one rank does on the whole batch.
        loss = bits.mean()
        return {"loss": loss, "bits_per_dim": loss.detach()}

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"bits_per_dim": self.bits_per_dim(batch.images).mean()}

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | None = None, generator: torch.Generator | None = None,
               temperature: float | None = None) -> torch.Tensor:
        """n images as uint8 [n, 3, 64, 64]; every z drawn at `temperature` (default: the config's)."""
        self.check_unconditional(cond)
        temperature = self.config.temperature if temperature is None else temperature
        if temperature <= 0:
            raise ValueError(f"flow: temperature must be positive, got {temperature}")
        device = self.device()
        side = IMAGE_SIZE >> len(self.flow.levels)
        top_channels = self.flow.levels[-1][0].actnorm.bias.shape[1]

        def normal(shape) -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=device)

        def draw(level: int, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
            return mean + temperature * torch.exp(log_std) * normal(mean.shape)

        y = self.flow.reverse(temperature * normal((n, top_channels, side, side)), draw) + 0.5
        # y's bin k = floor(256 y) is the pixel (values outside [0, 1) clamp to the end bins).
        return (y * LEVELS_8BIT).floor().clamp(0, 255).to(torch.uint8)
