"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders").

    genflow train pixelcnn -S models.pixelcnn.likelihood=softmax

An exact autoregressive likelihood over the 8-bit sub-pixels, in raster order and R → G → B
within a pixel:  log p(x) = Σ_i Σ_c log p(x_{i,c} | x_{<i}, x_{i,<c}).

The network (Sec. 2.2 of the paper): a vertical stack whose (k/2+1)×k convolutions see the rows
above, shifted down by one row before it feeds the horizontal stack, and a horizontal stack whose
1×(k/2+1) convolutions see the pixels to the left; together they cover everything above (also
above-right: no blind spot) and to the left. Gates tanh(W_f ∗ x) ⊙ σ(W_g ∗ x) (Eq. 2), residual
connections in the horizontal stack, and masked convolutions: the first layer's mask A hides the
current sub-pixel, later layers' mask B lets each colour see itself (van den Oord et al. 2016b,
"Pixel Recurrent Neural Networks", Sec. 3.4).

Two likelihoods, `likelihood`:
    softmax            a 256-way categorical per sub-pixel; the feature channels are split into
                       R, G, B groups so that G's logits see the current pixel's R, B's see R and G.
    logistic_mixture   PixelCNN++ (Salimans et al. 2017): the network conditions on whole previous
                       pixels only; each pixel is a mixture of K discretised logistics shared by its
                       three channels (Sec. 2.1), and G's and B's means depend linearly on the
                       current pixel's R (and G) (Sec. 2.2).

Both are probabilities of the 256 levels themselves, so bits/dim = −log₂ p(x) / (3·H·W) exactly,
with no dequantisation term. The loader's pixels are exactly k/255 of the image range and
`pixel_levels` recovers the integers k (and refuses anything else, e.g. dequantised pixels).
The likelihoods are computed in float32 also under bf16 autocast: a discretised logistic is a
difference of two nearby CDF values, which bf16's 8-bit mantissa cannot resolve.

Sampling runs one sub-pixel at a time. The cache (`sample(..., cache=True)`, after Ramachandran
et al. 2017, "Fast Generation for Convolutional Autoregressive Models") keeps, per layer, the
vertical stack's recent rows and the horizontal stack's current row, so that each step computes
the network at one pixel instead of over the whole image: benchmarks/sampling_ar_ebm.py measures it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from genflow.config import StrictModel
from genflow.models.protocol import Batch, GenerativeModel

IMAGE_CHANNELS = 3
LEVELS = 256
# Half the width of one 8-bit bin on the network's [-1, 1] scale (PixelCNN++ Sec. 2.1).
HALF_BIN = 1.0 / 255.0


class PixelCNNConfig(StrictModel):
    hidden_channels: PositiveInt = Field(24, description="channels of each stack; a multiple of 3 for softmax")
    layers: PositiveInt = Field(4, description="gated layers, the first one (mask A) included")
    first_kernel: int = Field(7, ge=3, description="odd width of the first layer's kernels")
    kernel: int = Field(3, ge=3, description="odd width of the later layers' kernels")
    head_channels: PositiveInt = Field(48, description="the 1×1 output head's hidden channels; a multiple of 3 for softmax")
    likelihood: Literal["softmax", "logistic_mixture"] = "logistic_mixture"
    mixture_components: PositiveInt = Field(5, description="K logistics per pixel (logistic_mixture)")

    @model_validator(mode="after")
    def _consistent(self) -> "PixelCNNConfig":
        for name in ("first_kernel", "kernel"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} must be odd (a centred kernel), got {getattr(self, name)}")
        if self.likelihood == "softmax":
            for name in ("hidden_channels", "head_channels"):
                if getattr(self, name) % IMAGE_CHANNELS:
                    raise ValueError(
                        f"{name} must be a multiple of 3 for likelihood softmax (one group per colour), "
                        f"got {getattr(self, name)}"
                    )
        return self


# --- the 8-bit targets ----------------------------------------------------------------------------


def pixel_levels(images: torch.Tensor, image_range: tuple[float, float]) -> torch.Tensor:
    """Images whose pixels are k/255 of `image_range` -> the integers k, int64 in [0, 255].

    The loader computes low + k·((high − low)/255) in float32, within 1e-6 of the grid: rounding
    recovers k exactly. Anything further off (dequantised or resized pixels) is refused.
    """
    low, high = image_range
    scaled = (images.float() - low) * (255.0 / (high - low))
    levels = scaled.round()
    off_grid = (scaled - levels).abs().amax().item() if scaled.numel() else 0.0
    if off_grid > 1e-3 or (levels.numel() and (levels.amin() < 0 or levels.amax() > 255)):
        raise ValueError(
            f"pixelcnn needs 8-bit pixels k/255 in {image_range} (as the shard loader makes them); got values "
            f"{off_grid:.3g} off the grid or outside the range: do not dequantise, resize or augment its input"
        )
    return levels.long()


def levels_to_unit(levels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer levels -> the network's input scale [-1, 1] (PixelCNN++'s convention)."""
    return levels.to(dtype) * (2.0 / 255.0) - 1.0


# --- the discretised logistic mixture (Salimans et al. 2017, Sec. 2.1-2.2) -----------------------


def discretized_logistic_log_prob(levels: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(level) under a logistic(mean, e^log_scale) on [-1, 1], discretised into 256 bins.

    PixelCNN++ Sec. 2.1, Eq. 2: P(x) = σ((x + 1/255 − μ)/s) − σ((x − 1/255 − μ)/s), with the
    edge bins taking the tails: P(0) = σ((x₀ + 1/255 − μ)/s), P(255) = 1 − σ((x₂₅₅ − 1/255 − μ)/s).
    The interior difference is computed exactly and stably as
        σ(a) − σ(b) = σ(a) · σ(−b) · (1 − e^{b−a})   (a > b),
    which needs none of PixelCNN++'s approximations for tiny probabilities.
    """
    x = levels_to_unit(levels, mean.dtype)
    inverse_scale = torch.exp(-log_scale)
    upper = inverse_scale * (x - mean + HALF_BIN)  # a
    lower = inverse_scale * (x - mean - HALF_BIN)  # b
    interior = F.logsigmoid(upper) + F.logsigmoid(-lower) + torch.log(-torch.expm1(lower - upper))
    return torch.where(levels == 0, F.logsigmoid(upper), torch.where(levels == LEVELS - 1, F.logsigmoid(-lower), interior))


def mixture_parameters(raw: torch.Tensor, unit: torch.Tensor, components: int):
    """The head's raw output [B, 10K, ...] and the pixel values [B, 3, ...] on [-1, 1] ->
    (weight logits [B, K, ...], means [B, 3, K, ...], log-scales [B, 3, K, ...]).

    PixelCNN++ Sec. 2.2: μ_R = μ_R, μ_G = μ_G + α·x_R, μ_B = μ_B + β·x_R + γ·x_G, with the
    coefficients tanh-bounded; each channel's mean depends only on the channels before it.
    """
    k = components
    logits, means, log_scales, coefficients = raw.split([k, 3 * k, 3 * k, 3 * k], dim=1)
    shape = (raw.shape[0], IMAGE_CHANNELS, k, *raw.shape[2:])
    means, coefficients = means.reshape(shape), torch.tanh(coefficients.reshape(shape))
    # PixelCNN++'s floor on the log-scale: a bin is ~1/127 wide, s below e^-7 adds nothing.
    log_scales = log_scales.reshape(shape).clamp(min=-7.0)
    red, green = unit[:, 0:1], unit[:, 1:2]
    coupled = torch.broadcast_tensors(
        means[:, 0],
        means[:, 1] + coefficients[:, 0] * red,
        means[:, 2] + coefficients[:, 1] * red + coefficients[:, 2] * green,
    )
    means = torch.stack(coupled, dim=1)
    return logits, means, log_scales


def mixture_log_prob(parameters: torch.Tensor, levels: torch.Tensor, components: int) -> torch.Tensor:
    """log p(pixel) [B, ...] from the sub-pixel parameters [B, 3, 3K, ...] (weight logits, coupled
    means, log-scales) and the levels [B, 3, ...]: log Σ_k π_k Π_c P(x_c | μ_ck, s_ck) (Sec. 2.1-2.2)."""
    logits, means, log_scales = parameters.split(components, dim=2)
    per_channel = discretized_logistic_log_prob(levels.unsqueeze(2), means, log_scales)  # [B, 3, K, ...]
    return torch.logsumexp(F.log_softmax(logits[:, 0], dim=1) + per_channel.sum(dim=1), dim=1)


# --- masked and gated convolutions ----------------------------------------------------------------


def colour_groups(channels: int, groups: int) -> torch.Tensor:
    """Which colour each feature channel belongs to: contiguous blocks (R first)."""
    return torch.arange(channels) * groups // channels


def gate_groups(channels: int, groups: int) -> torch.Tensor:
    """Colour groups of a pre-gate tensor [f, g]: tanh(f) ⊙ σ(g) pairs channel c with c + channels/2."""
    return colour_groups(channels // 2, groups).repeat(2)


def gate(pre: torch.Tensor) -> torch.Tensor:
    # van den Oord et al. 2016, Eq. 2: y = tanh(W_f ∗ x) ⊙ σ(W_g ∗ x).
    f, g = pre.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


def down_shift(rows: torch.Tensor) -> torch.Tensor:
    """Row i gets row i − 1 (zeros on top): the vertical stack then sees only rows above."""
    return F.pad(rows, (0, 0, 1, 0))[:, :, :-1]


class MaskedConv2d(nn.Conv2d):
    """A convolution whose kernel's last column of its last row is the current pixel (the caller
    pads so), where output colour group g sees input group g' only if g' < g (mask A) or g' ≤ g
    (mask B). Earlier positions are fully visible. No padding of its own."""

    def __init__(self, in_groups: torch.Tensor, out_groups: torch.Tensor, kernel: tuple[int, int], include_current: bool):
        super().__init__(len(in_groups), len(out_groups), kernel)
        mask = torch.ones_like(self.weight)
        visible = out_groups[:, None] >= in_groups[None] if include_current else out_groups[:, None] > in_groups[None]
        mask[:, :, -1, -1] = visible.to(mask.dtype)
        # Not persistent: a constant of the architecture, rebuilt from the config.
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias)


class GatedLayer(nn.Module):
    """One gated layer: vertical conv, horizontal masked conv, the vertical → horizontal link."""

    def __init__(self, in_groups: torch.Tensor, channels: int, kernel: int, groups: int, first: bool):
        super().__init__()
        self.reach = kernel // 2
        self.first = first
        in_channels = len(in_groups)
        hidden = colour_groups(channels, groups)
        pre_gate = gate_groups(2 * channels, groups)
        self.vertical = nn.Conv2d(in_channels, 2 * channels, (self.reach + 1, kernel))
        self.horizontal = MaskedConv2d(in_groups, pre_gate, (1, self.reach + 1), include_current=not first)
        # The link carries rows strictly above: every colour may see all of it.
        self.link = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.residual = None if first else MaskedConv2d(hidden, hidden, (1, 1), include_current=True)

    def vertical_pre(self, vertical_rows: torch.Tensor) -> torch.Tensor:
        """Vertical inputs, already padded (reach rows on top, reach columns each side)."""
        return self.vertical(vertical_rows)

    def horizontal_out(self, horizontal_cols: torch.Tensor, above: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """Horizontal inputs left-padded by `reach`, the vertical pre-gates of the row above, and
        the horizontal input at the output positions (for the residual)."""
        pre = self.horizontal(horizontal_cols) + self.link(above)
        return gate(pre) if self.first else current + self.residual(gate(pre))

    def forward(self, vertical: torch.Tensor, horizontal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.reach
        vertical_pre = self.vertical_pre(F.pad(vertical, (r, r, r, 0)))
        horizontal = self.horizontal_out(F.pad(horizontal, (r, 0, 0, 0)), down_shift(vertical_pre), horizontal)
        return gate(vertical_pre), horizontal


# --- the model ------------------------------------------------------------------------------------


class PixelCNN(GenerativeModel):
    config_class = PixelCNNConfig
    image_range = (0.0, 1.0)
    primary_metric = "bits_per_dim"

    def __init__(self, config: PixelCNNConfig):
        super().__init__(config)
        softmax = config.likelihood == "softmax"
        # Softmax: one feature group per colour (channel order inside a pixel). Mixture: the
        # network sees whole previous pixels; the colours' order lives in the mixture's means.
        groups = IMAGE_CHANNELS if softmax else 1
        p = config.hidden_channels
        image_groups = colour_groups(IMAGE_CHANNELS, groups)
        self.layers = nn.ModuleList(
            GatedLayer(image_groups if i == 0 else colour_groups(p, groups), p, config.first_kernel if i == 0 else config.kernel, groups, first=i == 0)
            for i in range(config.layers)
        )
        outputs = IMAGE_CHANNELS * LEVELS if softmax else 10 * config.mixture_components
        head_groups = colour_groups(config.head_channels, groups)
        self.head_hidden = MaskedConv2d(colour_groups(p, groups), head_groups, (1, 1), include_current=True)
        self.head_out = MaskedConv2d(head_groups, colour_groups(outputs, groups), (1, 1), include_current=True)

    # --- the network ---

    def head(self, features: torch.Tensor) -> torch.Tensor:
        out = self.head_out(F.relu(self.head_hidden(F.relu(features))))
        return out.to(torch.promote_types(out.dtype, torch.float32))  # float32 under bf16 autocast

    def network(self, unit: torch.Tensor) -> torch.Tensor:
        """Pixels on [-1, 1] [B, 3, H, W] -> the head's raw output, float32: softmax logits
        [B, 3·256, H, W] (R's, G's, B's), or the mixture's [B, 10K, H, W]."""
        vertical = horizontal = unit
        for layer in self.layers:
            vertical, horizontal = layer(vertical, horizontal)
        return self.head(horizontal)

    def subpixel_parameters(self, unit: torch.Tensor) -> torch.Tensor:
        """Pixels on [-1, 1] [B, 3, H, W] -> what each sub-pixel's distribution is computed from,
        given the sub-pixels before it (teacher forcing), float32 [B, 3, F, H, W]: its 256 logits
        (softmax), or the pixel's K weight logits, the colour's K means (coupled to the pixel's
        earlier colours) and K log-scales (mixture). Differentiable in `unit`: the causality test
        differentiates exactly what the likelihood uses."""
        raw = self.network(unit)
        b, _, h, w = raw.shape
        if self.config.likelihood == "softmax":
            return raw.reshape(b, IMAGE_CHANNELS, LEVELS, h, w)
        logits, means, log_scales = mixture_parameters(raw, unit.float(), self.config.mixture_components)
        return torch.cat([logits.unsqueeze(1).expand(-1, IMAGE_CHANNELS, -1, -1, -1), means, log_scales], dim=2)

    def log_prob(self, images: torch.Tensor) -> torch.Tensor:
        """log p(x) per image in nats [B], exact (a probability of the 8-bit levels)."""
        levels = pixel_levels(images, self.image_range)
        parameters = self.subpixel_parameters(levels_to_unit(levels).to(self.head_out.weight.dtype))
        # float32 also under autocast: see the module docstring.
        with torch.autocast(parameters.device.type, enabled=False):
            if self.config.likelihood == "softmax":
                log_probs = F.log_softmax(parameters, dim=2).gather(2, levels.unsqueeze(2)).squeeze(2)
            else:
                log_probs = mixture_log_prob(parameters, levels, self.config.mixture_components)
            return log_probs.flatten(1).sum(1)

    @staticmethod
    def bits_per_dim(log_prob: torch.Tensor, dims: int) -> torch.Tensor:
        # bits/dim = −log₂ p(x) / D, D = 3·H·W sub-pixels.
        return -log_prob / (dims * math.log(2))

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        images = batch.images
        bits = self.bits_per_dim(self.log_prob(images), images[0].numel())
        loss = bits.mean()  # a mean of per-image terms: DDP over N ranks = 1 rank on their union
        return {"loss": loss, "bits_per_dim": loss.detach()}

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        log_prob = self.log_prob(batch.images)
        return {"bits_per_dim": self.bits_per_dim(log_prob, batch.images[0].numel()).mean(), "nll_nats": -log_prob.mean()}

    # --- sampling ---

    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        *,
        size: int = 64,
        cache: bool = True,
    ) -> torch.Tensor:
        """n images [n, 3, size, size] uint8, drawn sub-pixel by sub-pixel (R, G, B in raster order).

        `cache=True` computes each step at one pixel from cached stack rows; `cache=False` runs the
        whole network for every step. Both consume the generator identically (all uniforms are
        drawn first), so for the same generator they give the same images, up to float rounding.
        """
        self.check_unconditional(cond)
        device = self.head_out.weight.device
        # Per pixel: one uniform per colour (inverse-CDF draws), one for the mixture component.
        uniforms = torch.rand(n, IMAGE_CHANNELS + 1, size, size, generator=generator, device=generator.device if generator else device)
        uniforms = uniforms.to(device, torch.float64)
        levels = torch.zeros(n, IMAGE_CHANNELS, size, size, dtype=torch.long, device=device)
        step = self._cached_steps(levels) if cache else self._full_steps(levels)
        next(step)
        for i in range(size):
            for j in range(size):
                if self.config.likelihood == "softmax":
                    for c in range(IMAGE_CHANNELS):
                        logits = step.send((i, j))[:, c * LEVELS : (c + 1) * LEVELS]
                        levels[:, c, i, j] = categorical_from_uniform(logits, uniforms[:, c, i, j])
                else:
                    self._sample_mixture_pixel(step.send((i, j)), levels, uniforms, i, j)
            step.send(("row done", i))
        step.close()
        return levels.to(torch.uint8)

    def _sample_mixture_pixel(self, raw: torch.Tensor, levels: torch.Tensor, uniforms: torch.Tensor, i: int, j: int) -> None:
        """Ancestral sampling of one pixel: the component (shared by the colours), then R, G, B,
        each mean coupled to the colours already drawn (PixelCNN++ Sec. 2.2)."""
        k = self.config.mixture_components
        component = None
        for c in range(IMAGE_CHANNELS):
            logits, means, log_scales = mixture_parameters(raw, levels_to_unit(levels[:, :, i, j]), k)
            if component is None:
                component = categorical_from_uniform(logits, uniforms[:, IMAGE_CHANNELS, i, j])
            mean = means[:, c].gather(1, component[:, None]).squeeze(1)
            scale = log_scales[:, c].gather(1, component[:, None]).squeeze(1).exp()
            # A logistic draw by its inverse CDF, binned as the likelihood bins it: the nearest
            # level, the tails going to 0 and 255 (Sec. 2.1's edge cases).
            value = mean.double() + scale.double() * torch.logit(uniforms[:, c, i, j])
            levels[:, c, i, j] = ((value.clamp(-1, 1) + 1) * 127.5).round().long()

    def _full_steps(self, levels: torch.Tensor):
        """A generator: sent (i, j), yields the head's raw output at pixel (i, j) from the whole
        network on the current image. No cache."""
        request = yield
        while True:
            if request[0] == "row done":
                request = yield None
                continue
            i, j = request
            unit = levels_to_unit(levels).to(self.head_out.weight.dtype)
            request = yield self.network(unit)[:, :, i, j]

    def _cached_steps(self, levels: torch.Tensor):
        """A generator: sent (i, j), yields the head's raw output at pixel (i, j), computing each
        layer at that pixel only; sent ("row done", i), advances the vertical stacks by row i.

        Kept per layer: the vertical inputs of the last reach + 1 rows (padded as the full network
        pads them), the vertical pre-gates of the row above (the link's input), and the horizontal
        inputs of the current row, left-padded by reach.
        """
        n, _, _, width = levels.shape
        dtype, device = self.head_out.weight.dtype, levels.device
        windows, above, rows = [], [], []
        for layer in self.layers:
            r, channels = layer.reach, layer.vertical.in_channels
            windows.append(torch.zeros(n, channels, r + 1, width + 2 * r, dtype=dtype, device=device))
            above.append(torch.zeros(n, layer.link.in_channels, 1, width, dtype=dtype, device=device))
            rows.append(torch.zeros(n, channels, 1, width + r, dtype=dtype, device=device))
        request = yield
        while True:
            if request[0] == "row done":
                i = request[1]
                vertical = levels_to_unit(levels[:, :, i : i + 1]).to(dtype)
                for index, (layer, window) in enumerate(zip(self.layers, windows)):
                    r = layer.reach
                    window[:, :, :-1] = window[:, :, 1:].clone()
                    window[:, :, -1:, r : r + width] = vertical
                    pre = layer.vertical_pre(window)
                    above[index] = pre
                    vertical = gate(pre)
                for row in rows:
                    row.zero_()
                request = yield None
                continue
            i, j = request
            # The image row is re-read from the levels: the pixels to the left were drawn after
            # their own step read them. The hidden rows need no refresh: a pixel's features at
            # its last step depend only on what was drawn before it (masks A, then B).
            first = self.layers[0].reach
            start = max(0, j - first)
            rows[0][:, :, :, first + start : first + j + 1] = levels_to_unit(levels[:, :, i : i + 1, start : j + 1]).to(dtype)
            current = rows[0][:, :, :, first + j : first + j + 1]
            for index, (layer, row, link) in enumerate(zip(self.layers, rows, above)):
                r = layer.reach
                if index:
                    row[:, :, :, r + j : r + j + 1] = current
                current = layer.horizontal_out(row[:, :, :, j : j + r + 1], link[:, :, :, j : j + 1], current)
            request = yield self.head(current)[:, :, 0, 0]


def categorical_from_uniform(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """A draw from softmax(logits) [B, K] by inverse CDF at the given uniforms [B]: the first k
    with CDF(k) > u. Deterministic in (logits, u), so cached and uncached sampling agree."""
    cdf = torch.softmax(logits.double(), dim=1).cumsum(dim=1)
    return torch.searchsorted(cdf, uniform[:, None].double().contiguous(), right=True).squeeze(1).clamp(max=logits.shape[1] - 1)
