"""GANs for CelebA 64×64: `dcgan` (Radford et al. 2016) and `cgan`, conditioned on the 40 attributes.

    genflow train dcgan -S models.dcgan.generator_lr=1e-4
    genflow train cgan
    genflow sample celeba64-cgan@staging --attr Smiling=1 --attr Eyeglasses=1 --n 16 --out grid.png

DCGAN, as the paper builds it for 64×64: the generator maps z ~ N(0, I) through transposed
convolutions (4×4 → 8 → 16 → 32 → 64, ReLU, tanh out) and the discriminator the image through
strided convolutions (LeakyReLU 0.2) to one logit; weights drawn from N(0, 0.02); Adam with
β1 = 0.5 (the paper: lr 2e-4 for both; see below). The learning rates and betas are the family's own params
(`generator_lr`, `discriminator_lr`, `betas`): train.lr is not used by the GANs; train's weight
decay, LR schedule and clipping apply to both optimizers.

Deviations from the paper. No BatchNorm: its statistics are per batch, so a batch split over N
DDP ranks would train another objective than one rank on the whole batch. The generator has no
normalisation by default (`generator_norm: group` puts GroupNorm in its place; on the embedded
sample it collapsed every sample to one face within 300 steps); the discriminator spectral
normalisation (Miyato et al. 2018; `discriminator_norm: spectral`), which rescales the weights,
not the activations, so it is the same on every rank (`none`: the paper's D without its BatchNorm,
which collapsed to one colour blob within 400 steps). And G's learning rate is 1e-3, five times
D's 2e-4 (two time-scales, as Heusel et al. 2017 allow): at the paper's 2e-4 the generator fell
behind (D's belief in fakes went to 0.001 within 300 steps). Measured with benchmarks/learning.py.

Objective: the non-saturating GAN (Goodfellow et al. 2014, Sec. 3). From one forward,

    loss/discriminator = −log σ(D(x)) − log(1 − σ(D(G(z))))     on detached fakes: it cannot move G
    loss/generator     = −log σ(D(G(z)))

each a mean over images, each back-propagated into its own optimizer's parameters (the protocol).
Both players step on the same forward, i.e. simultaneous updates rather than the paper's
alternation (D, then G against the updated D): one forward per step instead of two.

An exponential moving average of the generator's weights (decay `ema_decay`, warmed up as
TensorFlow's ExponentialMovingAverage with num_updates: min(decay, (1 + t)/(10 + t))) is updated
after every step; `sample` uses it. It is a frozen copy of the generator (requires_grad False,
so DDP ignores it), part of the state dict: checkpoints and the released model carry it.

cgan conditions both players on the attributes y ∈ {0, 1}^40: the generator takes z concatenated
with a learned linear embedding of y; the discriminator is a projection discriminator (Miyato &
Koyama 2018, Eq. 3): D(x, y) = ψ(φ(x)) + yᵀ V φ(x), with the multi-hot y in place of the paper's
one-hot class. Fakes are drawn with the real batch's attributes, so their attribute combinations
follow the training data's.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, ValidationInfo, field_validator
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from genflow.config import StrictModel, TrainParams
from genflow.data.celeba import ATTRIBUTE_NAMES
from genflow.models.protocol import Batch, GenerativeModel, adamw

IMAGE_CHANNELS = 3
ATTRIBUTES = len(ATTRIBUTE_NAMES)


class DCGANConfig(StrictModel):
    latent_dim: int = Field(100, ge=1, description="size of the generator's noise z")
    # The paper's 64×64 generator starts from 4×4×1024, i.e. 128 here; 32 keeps a CPU run to minutes.
    generator_channels: PositiveInt = Field(32, description="channels of the generator's last hidden layer (×8, ×4, ×2 below it)")
    discriminator_channels: PositiveInt = Field(32, description="channels of the discriminator's first layer (×2, ×4, ×8 above it)")
    generator_norm: Literal["none", "group"] = Field(
        "none", description="none, or GroupNorm in G (measured: it collapsed the samples to one face within 300 steps)")
    discriminator_norm: Literal["spectral", "none"] = Field(
        "spectral", description="spectral: spectral normalisation of D's weights (Miyato et al. 2018); none: the paper's D without BatchNorm")
    norm_groups: int = Field(8, ge=1, validate_default=True, description="GroupNorm groups; must divide generator_channels")
    generator_lr: float = Field(1e-3, gt=0, description="the paper's 2e-4 left G behind D within 300 steps (measured)")
    discriminator_lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = Field((0.5, 0.999), description="Adam's (β1, β2)")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="decay of the generator's weight average that `sample` uses")

    @field_validator("norm_groups")
    @classmethod
    def _groups_divide_channels(cls, groups: int, info: ValidationInfo) -> int:
        channels = info.data.get("generator_channels")
        if info.data.get("generator_norm") == "group" and channels is not None and channels % groups:
            raise ValueError(f"{groups} groups must divide generator_channels {channels}")
        return groups

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"Adam's betas must lie in [0, 1), got {list(betas)}")
        return betas


class CGANConfig(DCGANConfig):
    attribute_embedding_dim: int = Field(32, ge=1, description="size of the attribute embedding concatenated to z")


# --- the objective -------------------------------------------------------------------------------


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """−log σ(D(x)) − log(1 − σ(D(G(z)))), mean over images: D's side of Goodfellow et al. 2014,
    Eq. 1, as a loss. −log σ(a) = softplus(−a) and −log(1 − σ(a)) = softplus(a), without overflow."""
    return (F.softplus(-real_logits) + F.softplus(fake_logits)).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """−log σ(D(G(z))), mean over images: the non-saturating generator loss (Goodfellow et al. 2014,
    Sec. 3: maximise log D(G(z)) rather than minimise log(1 − D(G(z))), which saturates early on)."""
    return F.softplus(-fake_logits).mean()


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA's decay after `step` updates: min(decay, (1 + t)/(10 + t)), TensorFlow's
    ExponentialMovingAverage warm-up, so that a short run's average is not mostly the initial weights."""
    return min(decay, (1 + step) / (10 + step))


def pooled_pixels(images: torch.Tensor, side: int = 4) -> torch.Tensor:
    """Images -> their side×side average-pooled pixels as feature vectors [B, 3·side²]."""
    return F.adaptive_avg_pool2d(images.float(), side).flatten(1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fréchet distance between Gaussians fitted to the rows of a and b (Dowson & Landau 1982;
    the FID's formula, Heusel et al. 2017, Sec. 3): ‖μa − μb‖² + Tr(Σa + Σb − 2(Σa Σb)^½), in float64.
    Tr((Σa Σb)^½) = Σ √λ(Σa^½ Σb Σa^½), a symmetric PSD matrix, so eigh is enough."""
    a, b = a.double(), b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross


# --- the networks --------------------------------------------------------------------------------


class Generator(nn.Module):
    """z [B, latent] (and attributes [B, 40] when conditional) -> images in [-1, 1], [B, 3, 64, 64]."""

    def __init__(self, config: DCGANConfig, attribute_embedding_dim: int = 0):
        super().__init__()
        self.embed = nn.Linear(ATTRIBUTES, attribute_embedding_dim) if attribute_embedding_dim else None
        width = config.generator_channels
        widths = (8 * width, 4 * width, 2 * width, width)

        def norm(channels: int) -> nn.Module:
            return nn.GroupNorm(config.norm_groups, channels) if config.generator_norm == "group" else nn.Identity()

        layers = [nn.ConvTranspose2d(config.latent_dim + attribute_embedding_dim, widths[0], 4, 1, 0), norm(widths[0]), nn.ReLU()]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1), norm(c_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(width, IMAGE_CHANNELS, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z: torch.Tensor, attrs: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(attrs)], dim=1)
        return self.net(z[:, :, None, None])


class Discriminator(nn.Module):
    """Images [B, 3, 64, 64] (and attributes when conditional) -> logits [B], float32.

    Features φ(x): four strided convolutions to 8·channels × 4 × 4, flattened; ψ, a linear layer to
    one logit, is the paper's last 4×4 convolution. With attributes, the projection yᵀ V φ(x) is added.
    """

    def __init__(self, config: DCGANConfig, conditional: bool = False):
        super().__init__()
        width = config.discriminator_channels
        widths = (IMAGE_CHANNELS, width, 2 * width, 4 * width, 8 * width)
        def normalise(layer: nn.Module) -> nn.Module:
            # Initialised first: spectral_norm estimates the weight's top singular vectors from it.
            layer.apply(dcgan_init)
            return spectral_norm(layer) if config.discriminator_norm == "spectral" else layer

        layers = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [normalise(nn.Conv2d(c_in, c_out, 4, 2, 1)), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        features = 8 * width * 4 * 4
        self.head = normalise(nn.Linear(features, 1))
        self.projection = normalise(nn.Linear(ATTRIBUTES, features, bias=False)) if conditional else None

    def forward(self, images: torch.Tensor, attrs: torch.Tensor | None = None) -> torch.Tensor:
        phi = self.features(images)
        logits = self.head(phi).squeeze(1)
        if self.projection is not None:
            # Miyato & Koyama 2018, Eq. 3: D(x, y) = ψ(φ(x)) + yᵀ V φ(x).
            logits = logits + (self.projection(attrs) * phi).sum(dim=1)
        return logits.float()


def dcgan_init(module: nn.Module) -> None:
    """Radford et al. 2016, Sec. 4: weights from N(0, 0.02); norm scales from N(1, 0.02), as the
    authors' code does for its BatchNorm; biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# --- the families --------------------------------------------------------------------------------


class DCGAN(GenerativeModel):
    config_class = DCGANConfig
    image_range = (-1.0, 1.0)
    primary_metric = "fd_effnet"
    monitor = "loss/generator"

    def __init__(self, config: DCGANConfig):
        super().__init__(config)
        embedding = config.attribute_embedding_dim if self.conditional else 0
        self.generator = Generator(config, embedding)
        self.discriminator = Discriminator(config, conditional=self.conditional)
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)

    def optimizers(self, train: TrainParams) -> dict[str, torch.optim.Optimizer]:
        config = self.config
        return {
            "generator": adamw(self.generator.parameters(), train, lr=config.generator_lr, betas=config.betas),
            "discriminator": adamw(self.discriminator.parameters(), train, lr=config.discriminator_lr, betas=config.betas),
        }

    def condition(self, attrs: torch.Tensor) -> torch.Tensor | None:
        """What the players are conditioned on: nothing here; cgan: the attributes."""
        return None

    def noise(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        dtype = next(self.generator.parameters()).dtype  # the generator's precision (float64 in the DDP test)
        return torch.randn(n, self.config.latent_dim, device=device, dtype=dtype, generator=generator)

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        real = batch.images
        attrs = self.condition(batch.attrs)
        fake = self.generator(self.noise(len(real), real.device), attrs)
        # D treats each image on its own (spectral normalisation acts on its weights), so real and
        # detached fake go through it as one batch.
        pair_attrs = None if attrs is None else torch.cat([attrs, attrs])
        real_logits, detached_fake_logits = self.discriminator(torch.cat([real, fake.detach()]), pair_attrs).chunk(2)
        fake_logits = self.discriminator(fake, attrs)
        return {
            "loss/discriminator": discriminator_loss(real_logits, detached_fake_logits),
            "loss/generator": generator_loss(fake_logits),
            "d_real": torch.sigmoid(real_logits).mean().detach(),  # D's mean belief that reals are real
            "d_fake": torch.sigmoid(detached_fake_logits).mean().detach(),  # ... and that fakes are
        }

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        # θ_ema ← d·θ_ema + (1 − d)·θ; the live generator is the same on every rank after the step.
        weight = 1 - ema_decay_at(self.config.ema_decay, step)
        for average, live in zip(self.generator_ema.parameters(), self.generator.parameters()):
            average.lerp_(live, weight)

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        """fd_pooled_pixels_4x4: the Fréchet distance between this batch and as many samples on 4×4
        average-pooled pixels (48 features): a coarse check of colour and layout, biased upward
        at small batches; the standard sample-quality measures are computed by genflow/eval."""
        real = batch.images.float()
        attrs = self.condition(batch.attrs)
        fake = self.generator_ema(self.noise(len(real), real.device), attrs).float()
        return {"fd_pooled_pixels_4x4": frechet_distance(pooled_pixels(real), pooled_pixels(fake)).float()}

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images from the averaged generator, uint8 [n, 3, 64, 64]."""
        attrs = self.sampling_condition(n, cond)
        device = next(self.generator_ema.parameters()).device
        return self.to_uint8(self.generator_ema(self.noise(n, device, generator), attrs))

    def sampling_condition(self, n: int, cond: torch.Tensor | None) -> torch.Tensor | None:
        self.check_unconditional(cond)
        return None


class CGAN(DCGAN):
    config_class = CGANConfig
    conditional = True

    def condition(self, attrs: torch.Tensor) -> torch.Tensor:
        return attrs.to(next(self.generator.parameters()).dtype)  # the model's precision

    def sampling_condition(self, n: int, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None or cond.shape != (n, ATTRIBUTES):
            got = "none" if cond is None else list(cond.shape)
            raise ValueError(f"cgan samples need cond: the {ATTRIBUTES} CelebA attributes of each image, "
                             f"float [n, {ATTRIBUTES}] of 0/1 in genflow.data.celeba.ATTRIBUTE_NAMES order (n = {n}); got {got}")
        if not ((cond == 0) | (cond == 1)).all():
            raise ValueError("cgan's cond holds attributes as 0 (absent) or 1 (present); got other values")
        return cond.to(next(self.generator_ema.parameters()).device).float()
