"""Variational autoencoder (Kingma & Welling 2014) for CelebA 64×64, convolutional.

    genflow train vae -S models.vae.decoder=bernoulli -S models.vae.kl.kind=cyclical

Encoder: 4×4 stride-2 convs (GroupNorm + LeakyReLU) down to a Gaussian q(z|x) = N(μ, diag σ²);
decoder: the mirror with transposed convs, from z ~ N(0, I) to per-pixel logits. Two likelihoods
p(x|z), both on pixels in [0, 1]:

    gaussian    N(sigmoid(logits), σ² I), σ fixed (`gaussian_sigma`); sigmoid, the recipe's tanh on [0, 1];
                trained as in the classic CelebA recipe (AntixK/PyTorch-VAE):
                loss = MSE over all pixels + w · KL (KL summed over latents, mean over images)
    bernoulli   Bernoulli(x; logits), i.e. binary cross-entropy on [0, 1] targets;
                loss = BCE averaged over all pixels + w · KL

The KL weight w follows `genflow.models.schedules.KLSchedule`. Whatever w is, `training_step` and
`evaluate` report the true (w = 1) ELBO per image, each measure named for what it is:

    gaussian    elbo_nats, bits_per_dim: the ELBO of the 8-bit image under the Gaussian discretised
                to the pixel bins (exact for every σ), so bits_per_dim bounds −log2 P(x) / D and
                compares with any other model of 8-bit pixels
    bernoulli   bce_elbo_nats, bce_bits_per_dim: the ELBO under the Bernoulli cross-entropy, which
                is no probability of 8-bit pixels: comparable only with other Bernoulli VAEs
    both        reconstruction_psnr (the decoder mean at the posterior mean): the primary metric,
                comparable across decoders

Objectives are means of per-image terms (GroupNorm, not BatchNorm; the capacity term per image):
DDP over N workers computes what one worker computes on the combined batch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, ValidationInfo, field_validator
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio

from genflow.config import StrictModel
from genflow.models.protocol import Batch, GenerativeModel
from genflow.models.schedules import KLSchedule

IMAGE_SIZE = 64
IMAGE_CHANNELS = 3
PIXELS = IMAGE_CHANNELS * IMAGE_SIZE * IMAGE_SIZE  # D, the dimensions that bits/dim divides by


class VAEConfig(StrictModel):
    # Each block halves the 64px side: at most log2(64) = 6 of them.
    hidden_channels: tuple[PositiveInt, ...] = Field(
        (32, 64, 128, 256), min_length=1, max_length=6, description="encoder channels per stride-2 block"
    )
    latent_dim: int = Field(128, ge=1)
    norm_groups: int = Field(
        8, ge=1, validate_default=True, description="GroupNorm groups; must divide every hidden channel count"
    )
    decoder: Literal["gaussian", "bernoulli"] = "gaussian"
    gaussian_sigma: float = Field(0.1, gt=0, description="σ of the Gaussian decoder, in [0, 1] pixel units; "
                                  "its reported ELBO is discretised to the pixel bins, so valid for any σ")
    kl: KLSchedule = KLSchedule()

    @field_validator("norm_groups")
    @classmethod
    def _groups_divide_channels(cls, groups: int, info: ValidationInfo) -> int:
        bad = [c for c in info.data.get("hidden_channels", ()) if c % groups]
        if bad:
            raise ValueError(f"{groups} groups must divide every hidden channel count; {bad} do not")
        return groups


# --- the math: per-image terms of the ELBO -------------------------------------------------------


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag exp(logvar)) || N(0, I)) per row, in nats: [B, latent] -> [B]."""
    # Kingma & Welling 2014, Appendix B: −KL = ½ Σ_j (1 + log σ_j² − μ_j² − σ_j²).
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=1)


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """Σ_pixels log P(x) per image, in nats, for 8-bit pixels x = k/255: [B, C, H, W] -> [B].

    P(x) is the mass of N(mean, σ²) over the pixel's bin [x − 1/510, x + 1/510], the bins of 0
    and 255 open to −∞ and +∞ (Ho et al. 2020, Eq. 13; the edge bins as in Salimans et al. 2017,
    PixelCNN++). A probability, so ≤ 1 whatever σ is: the continuous density at x would exceed 1
    when σ is small against the bin and give negative bits/dim.
    """
    x, mean = x.double(), mean.double()
    half_bin = 0.5 / 255
    lower = torch.where(x < half_bin, -math.inf, (x - half_bin - mean) / sigma)
    upper = torch.where(x > 1 - half_bin, math.inf, (x + half_bin - mean) / sigma)
    return _log_normal_mass(lower, upper).flatten(1).sum(dim=1).float()


def _log_normal_mass(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Φ(b) − Φ(a)) for a < b, accurate in both tails: the upper tail is mirrored onto the lower
    one (Φ(b) − Φ(a) = Φ(−a) − Φ(−b)), where log Φ keeps its precision."""
    mirror = (a + b) > 0
    a, b = torch.where(mirror, -b, a), torch.where(mirror, -a, b)
    log_b = torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))


def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ_pixels log Bernoulli(x; sigmoid(logits)) per image, in nats: [B, C, H, W] -> [B].

    The standard BCE with continuous targets in [0, 1], not the continuous Bernoulli
    (Loaiza-Ganem & Cunningham 2019): for non-binary x it is not a normalised density on [0, 1].
    """
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(dim=1)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    # Kingma & Welling 2014, Sec. 2.4: z = μ + σ ⊙ ε, ε ~ N(0, I).
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


# --- the network ---------------------------------------------------------------------------------


def _down(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(groups, c_out), nn.LeakyReLU(0.2)
    )


def _up(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(groups, c_out), nn.LeakyReLU(0.2)
    )


class VAE(GenerativeModel):
    config_class = VAEConfig
    image_range = (0.0, 1.0)
    # Comparable across decoders (the likelihood measures are not: see the module docstring).
    primary_metric = "reconstruction_psnr"
    primary_metric_lower_is_better = False

    def __init__(self, config: VAEConfig):
        super().__init__(config)
        channels, groups = config.hidden_channels, config.norm_groups
        self.bottom = (channels[-1], IMAGE_SIZE >> len(channels), IMAGE_SIZE >> len(channels))
        features = math.prod(self.bottom)

        ins = (IMAGE_CHANNELS,) + channels[:-1]
        self.encoder = nn.Sequential(*(_down(c_in, c_out, groups) for c_in, c_out in zip(ins, channels)))
        self.to_posterior = nn.Linear(features, 2 * config.latent_dim)  # -> (μ, log σ²)

        self.from_latent = nn.Linear(config.latent_dim, features)
        reversed_channels = channels[::-1]
        self.decoder = nn.Sequential(
            *(_up(c_in, c_out, groups) for c_in, c_out in zip(reversed_channels, reversed_channels[1:])),
            nn.ConvTranspose2d(channels[0], IMAGE_CHANNELS, 4, stride=2, padding=1),  # -> logits
        )

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, 64, 64] in [0, 1] -> the posterior's (μ, log σ²), float32 [B, latent]."""
        if images.shape[1:] != (IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"vae expects images [B, 3, 64, 64], got {list(images.shape)}; set data.size: 64")
        mu, logvar = self.to_posterior(self.encoder(images).flatten(1)).float().chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, latent] -> per-pixel logits, float32 [B, 3, 64, 64]; the mean is sigmoid(logits)."""
        return self.decoder(self.from_latent(z).view(-1, *self.bottom)).float()

    @torch.no_grad()
    def log_likelihood(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per image in nats, under the configured decoder (the reported ELBO's term)."""
        if self.config.decoder == "gaussian":
            return discretized_gaussian_log_likelihood(images, torch.sigmoid(logits), self.config.gaussian_sigma)
        return bernoulli_log_likelihood(images, logits)

    def likelihood_metrics(self, elbo_nats: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-image ELBO (nats) as the batch's ELBO and bits/dim, named for their likelihood."""
        # bits/dim = −ELBO / (D log 2): for the discretised Gaussian an upper bound on −log2 P(x) / D.
        prefix = "" if self.config.decoder == "gaussian" else "bce_"
        return {f"{prefix}elbo_nats": elbo_nats.mean(), f"{prefix}bits_per_dim": (-elbo_nats / (PIXELS * math.log(2))).mean()}

    def _elbo(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One posterior sample: (logits, log p(x|z) [B] detached, KL [B], μ) for images in float32."""
        mu, logvar = self.encode(images)
        logits = self.decode(reparameterize(mu, logvar))
        return logits, self.log_likelihood(images, logits), gaussian_kl(mu, logvar), mu

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        images = batch.images.float()
        logits, log_likelihood, kl_per_image, _ = self._elbo(images)
        kl = kl_per_image.mean()

        # The objective's reconstruction term is per pixel, as in the CelebA recipe.
        if self.config.decoder == "gaussian":
            reconstruction = F.mse_loss(torch.sigmoid(logits), images)
        else:
            reconstruction = F.binary_cross_entropy_with_logits(logits, images)

        term = self.config.kl.at(step)
        metrics = {}
        if self.config.kl.kind == "capacity":
            # Burgess et al. 2018, Eq. 8, controlled capacity increase: per data point,
            # reconstruction + γ · |KL(q(z|x) || p(z)) − C|, averaged over images (not γ·|mean KL − C|,
            # which would change with the number of DDP ranks the batch is split over).
            loss = reconstruction + term.weight * (kl_per_image - term.capacity).abs().mean()
            metrics["kl_capacity"] = images.new_tensor(term.capacity)
        else:
            # β-VAE form (Higgins et al. 2017, Eq. 4) with a scheduled β: reconstruction + β · KL.
            loss = reconstruction + term.weight * kl

        # Kingma & Welling 2014, Eq. 3: ELBO = E_q[log p(x|z)] − KL(q(z|x) || p(z)), one sample.
        elbo = log_likelihood - kl_per_image.detach()
        return {
            "loss": loss,
            "reconstruction": reconstruction.detach(),
            "kl": kl.detach(),
            "kl_weight": images.new_tensor(term.weight),
            **metrics,
            **self.likelihood_metrics(elbo),
        }

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        images = batch.images.float()
        _, log_likelihood, kl, mu = self._elbo(images)
        elbo = log_likelihood - kl
        # Reconstructions decode the posterior mean, as `reconstruct` does.
        means = torch.sigmoid(self.decode(mu))
        psnr = peak_signal_noise_ratio(means, images, data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")
        return {**self.likelihood_metrics(elbo), "reconstruction_psnr": psnr, "kl": kl.mean()}

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """n decoder means (not noisy draws of p(x|z)) for z ~ N(0, I), as uint8 [n, 3, 64, 64]."""
        if cond is not None:
            raise ValueError("vae is unconditional: sample it without attributes (cond=None)")
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=self.from_latent.weight.device)
        return self.to_uint8(torch.sigmoid(self.decode(z)))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the decoder mean at the posterior mean, as uint8 [B, 3, 64, 64]."""
        mu, _ = self.encode(images)
        return self.to_uint8(torch.sigmoid(self.decode(mu)))
