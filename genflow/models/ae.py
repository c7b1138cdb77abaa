"""Autoencoders for CelebA 64×64: `ae` (plain), `dae` (denoising), `sae` (stacked, greedy layer-wise).

    genflow train ae
    genflow train dae -S models.dae.corruption=mask -S models.dae.level=0.3
    genflow train sae -S models.sae.layer_steps=[40,40,40,40,40]

One network for the three: stride-2 conv blocks (GroupNorm + LeakyReLU, the VAE's blocks) and a
linear layer down to a code, mirrored by the decoder, arranged as layer pairs (encoder layer k and
its mirror decoder layer k, bottom first) so that the stacked AE can train one pair at a time.
Pixels are in [0, 1]; the decoder's last layer gives logits and the image is their sigmoid. The
objective is the squared error, a mean over pixels: a mean of per-image terms, so DDP over N ranks
computes what one rank computes on the combined batch.

    ae    loss = ‖x − g(f(x))‖² / D
    dae   loss = ‖x − g(f(x̃))‖² / D, x̃ a corrupted copy of x (Vincent et al. 2010, Sec. 2.3-2.4):
          additive Gaussian noise of std `level`, or masking (each value set to 0 with probability
          `level`). Only the encoder's input is corrupted; the target is the clean image.
    sae   greedy layer-wise training (Bengio et al. 2007, Sec. 2; Vincent et al. 2010, Sec. 3.3):
          phase k trains pair k alone to reconstruct its input, the output of the frozen encoder
          layers below it, for `layer_steps[k]` steps; then every pair is fine-tuned end to end on
          the image (Hinton & Salakhutdinov 2006) until train.max_steps. The phase is a function of
          the step, so a resumed run continues in the phase it stopped in. Each phase has its own
          optimizer (`loss/layer1`, ..., `loss/finetune`), and the parameters a phase leaves out
          get no gradient: the class sets `find_unused_parameters`.

Sampling. A plain autoencoder has no prior: nothing says which codes decode to faces. `sample`
decodes codes drawn from a full-covariance Gaussian fitted to the codes of the training images
("ex-post density estimation", Ghosh et al. 2020, Sec. 4). The fit is an exponential moving
average of the codes' first and second moments over training batches (decay `code_stats_decay`,
debiased as Adam's moments are), so it follows the encoder as it trains. It is updated in
`after_step` from every rank's codes at once (one all-reduce of the moment sums): all ranks hold
the same buffers, as DDP's broadcast of rank 0's buffers at every forward expects, and N ranks fit
what one rank fits on the combined batch. The moments are buffers, so the released model samples.
Before any training step the fit is N(0, I).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, ValidationInfo, field_validator
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from genflow.config import StrictModel, TrainParams
from genflow.models.protocol import Batch, GenerativeModel, adamw
from genflow.models.vae import IMAGE_CHANNELS, IMAGE_SIZE, _down, _up


class AEConfig(StrictModel):
    # Each conv layer halves the 64px side: at most log2(64) = 6 of them.
    hidden_channels: tuple[PositiveInt, ...] = Field(
        (32, 64, 128, 256), min_length=1, max_length=6, description="encoder channels per stride-2 conv layer"
    )
    latent_dim: int = Field(128, ge=1, description="code size")
    norm_groups: int = Field(
        8, ge=1, validate_default=True, description="GroupNorm groups; must divide every hidden channel count"
    )
    code_stats_decay: float = Field(
        0.99, gt=0, lt=1, description="EMA decay of the code moments that `sample` draws from, per step"
    )

    @field_validator("norm_groups")
    @classmethod
    def _groups_divide_channels(cls, groups: int, info: ValidationInfo) -> int:
        bad = [c for c in info.data.get("hidden_channels", ()) if c % groups]
        if bad:
            raise ValueError(f"{groups} groups must divide every hidden channel count; {bad} do not")
        return groups


class DAEConfig(AEConfig):
    corruption: Literal["gaussian", "mask"] = "gaussian"
    level: float = Field(
        0.2, gt=0, le=1, description="gaussian: the noise std in [0, 1] pixel units; mask: the share of values zeroed"
    )


class SAEConfig(AEConfig):
    layer_steps: tuple[PositiveInt, ...] = Field(
        (30, 30, 30, 30, 30),
        description="steps of each greedy phase, bottom layer pair first, one per pair (len(hidden_channels) + 1); "
        "fine-tuning runs from their sum to train.max_steps",
    )

    @field_validator("layer_steps")
    @classmethod
    def _one_phase_per_pair_and_room_to_fine_tune(cls, steps: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        channels = info.data.get("hidden_channels")
        if channels is not None and len(steps) != len(channels) + 1:
            raise ValueError(f"one phase per layer pair: hidden_channels {list(channels)} make {len(channels) + 1} "
                             f"pairs (the conv layers and the code layer), got {len(steps)} phase lengths")
        # The training params come as validation context where the family is configured for a run.
        train = (info.context or {}).get("train")
        if train is not None and sum(steps) >= train.max_steps:
            raise ValueError(f"the greedy phases take {sum(steps)} steps, leaving none of train.max_steps "
                             f"{train.max_steps} to fine-tune: shorten them or raise train.max_steps")
        return steps


class CodeGaussian(nn.Module):
    """N(μ, Σ) fitted to codes: debiased exponential moving averages (Kingma & Ba 2015, Alg. 1) of
    the codes' first and second moments, μ = E[z] and Σ = E[zzᵀ] − μμᵀ. float64, as Σ is a
    difference of moments."""

    def __init__(self, dim: int, decay: float):
        super().__init__()
        self.decay = decay
        self.register_buffer("first_moment", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("second_moment", torch.zeros(dim, dim, dtype=torch.float64))
        # Σ_t (1 − decay)·decay^(T−t) = 1 − decay^T: what the averages are divided by (Adam's bias correction).
        self.register_buffer("total_weight", torch.zeros((), dtype=torch.float64))
        self.pending: torch.Tensor | None = None  # this step's [Σz, Σzzᵀ, n] on this rank, not yet folded in

    def observe(self, codes: torch.Tensor) -> None:
        z = codes.detach().double()
        self.pending = torch.cat([z.sum(0), (z.T @ z).flatten(), z.new_tensor([len(z)])])

    def update(self) -> None:
        """Fold the observed codes of every rank into the averages; every rank must call it."""
        if self.pending is None:
            return
        sums, self.pending = self.pending, None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        dim, count = len(self.first_moment), sums[-1]
        weight = 1 - self.decay
        self.first_moment.lerp_(sums[:dim] / count, weight)
        self.second_moment.lerp_(sums[dim:-1].view(dim, dim) / count, weight)
        self.total_weight.lerp_(torch.ones_like(self.total_weight), weight)

    def fitted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, Σ), float64; N(0, I) until codes were observed."""
        if self.total_weight == 0:
            return torch.zeros_like(self.first_moment), torch.eye(len(self.first_moment), dtype=torch.float64, device=self.first_moment.device)
        mean = self.first_moment / self.total_weight
        covariance = self.second_moment / self.total_weight - torch.outer(mean, mean)
        return mean, (covariance + covariance.T) / 2

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + A ε, ε ~ N(0, I), A = V Λ^½ from Σ = V Λ Vᵀ (so A Aᵀ = Σ; eigh, not Cholesky:
        Σ may be singular when the codes span fewer dimensions than the code size)."""
        mean, covariance = self.fitted()
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        scale = eigenvectors * eigenvalues.clamp(min=0).sqrt()
        noise = torch.randn(n, len(mean), generator=generator, device=mean.device, dtype=torch.float64)
        return mean + noise @ scale.T


class AE(GenerativeModel):
    """Convolutional autoencoder with squared-error reconstruction; see the module docstring."""

    config_class = AEConfig
    image_range = (0.0, 1.0)
    primary_metric = "reconstruction_psnr"
    primary_metric_lower_is_better = False

    def __init__(self, config: AEConfig):
        super().__init__(config)
        channels, groups = config.hidden_channels, config.norm_groups
        side = IMAGE_SIZE >> len(channels)
        bottom = (channels[-1], side, side)
        inputs = (IMAGE_CHANNELS,) + channels[:-1]
        # Pair k: encoders[k] maps what decoders[k] must give back. Bottom pair: image <-> logits.
        self.encoders = nn.ModuleList(
            [*(_down(c_in, c_out, groups) for c_in, c_out in zip(inputs, channels)),
             nn.Sequential(nn.Flatten(), nn.Linear(math.prod(bottom), config.latent_dim))]
        )
        self.decoders = nn.ModuleList(
            [nn.ConvTranspose2d(channels[0], IMAGE_CHANNELS, 4, stride=2, padding=1),
             *(_up(c_out, c_in, groups) for c_in, c_out in zip(inputs[1:], channels[1:])),
             nn.Sequential(nn.Linear(config.latent_dim, math.prod(bottom)), nn.Unflatten(1, bottom))]
        )
        self.code_fit = CodeGaussian(config.latent_dim, config.code_stats_decay)

    # --- the network ----------------------------------------------------------------------------

    def encode(self, images: torch.Tensor, pairs: int | None = None) -> torch.Tensor:
        """Images [B, 3, 64, 64] in [0, 1] -> codes, float32 [B, latent]; or, with `pairs`, the
        output of the first `pairs` encoder layers."""
        if images.shape[1:] != (IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"{type(self).__name__.lower()} expects images [B, 3, 64, 64], got {list(images.shape)}; set data.size: 64")
        hidden = images
        for layer in self.encoders[:pairs]:
            hidden = layer(hidden)
        return hidden.float()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, latent] -> images in [0, 1], float32 [B, 3, 64, 64]."""
        hidden = codes
        for layer in reversed(self.decoders):
            hidden = layer(hidden)
        return torch.sigmoid(hidden.float())

    def corrupt(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's training input: the images themselves (dae corrupts them)."""
        return images

    # --- the protocol ---------------------------------------------------------------------------

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        images = batch.images.float()
        inputs = self.corrupt(images)
        codes = self.encode(inputs)
        reconstructions = self.decode(codes)
        loss = F.mse_loss(reconstructions, images)  # the clean image is the target
        with torch.no_grad():
            self.code_fit.observe(codes if inputs is images else self.encode(images))
            psnr = _psnr(reconstructions, images)
        return {"loss": loss, "reconstruction_psnr": psnr}

    def after_step(self, step: int) -> None:
        self.code_fit.update()

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        images = batch.images.float()
        reconstructions = self.decode(self.encode(images))
        return {
            "reconstruction_psnr": _psnr(reconstructions, images),
            "reconstruction_ssim": structural_similarity_index_measure(reconstructions, images, data_range=1.0),
            "reconstruction_mse": F.mse_loss(reconstructions, images),
        }

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoded codes z ~ N(μ, Σ), the Gaussian fitted to the training codes, as uint8 [n, 3, 64, 64]."""
        self.check_unconditional(cond)
        codes = self.code_fit.sample(n, generator).float()
        return self.to_uint8(self.decode(codes))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> their reconstructions, uint8 [B, 3, 64, 64]."""
        return self.to_uint8(self.decode(self.encode(images)))


def _psnr(reconstructions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Mean over images of each image's PSNR in dB, pixels in [0, 1]."""
    return peak_signal_noise_ratio(reconstructions, images, data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")


class DAE(AE):
    """Denoising autoencoder: the encoder sees a corrupted image, the loss the clean one."""

    config_class = DAEConfig

    def corrupt(self, images: torch.Tensor) -> torch.Tensor:
        """A corrupted copy (never in place: the clean batch is the target). Vincent et al. 2010,
        Sec. 4.2: additive isotropic Gaussian noise x + σε, or masking noise (values set to 0)."""
        level = self.config.level
        if self.config.corruption == "gaussian":
            return images + level * torch.randn_like(images)
        keep = torch.rand_like(images) >= level
        return images * keep

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        metrics = super().evaluate(batch)
        images = batch.images.float()
        metrics["denoising_psnr"] = _psnr(self.decode(self.encode(self.corrupt(images))), images)
        return metrics


class SAE(AE):
    """Stacked autoencoder, trained greedily one layer pair at a time, then fine-tuned end to end."""

    config_class = SAEConfig
    monitor = "reconstruction_mse"  # the image's, through the whole stack, whatever the phase
    find_unused_parameters = True

    def phase(self, step: int) -> str:
        """`layerK` (train pair K, 1 = the bottom pair) or `finetune`: a function of the step alone."""
        boundary = 0
        for pair, steps in enumerate(self.config.layer_steps, start=1):
            boundary += steps
            if step < boundary:
                return f"layer{pair}"
        return "finetune"

    def optimizers(self, train: TrainParams) -> dict[str, torch.optim.Optimizer]:
        pairs = {f"layer{k}": adamw([*encoder.parameters(), *decoder.parameters()], train)
                 for k, (encoder, decoder) in enumerate(zip(self.encoders, self.decoders), start=1)}
        return {**pairs, "finetune": adamw(self.trainable_parameters(), train)}

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        phase = self.phase(step)
        if phase == "finetune":
            metrics = super().training_step(batch, step)
            return {"loss/finetune": metrics["loss"], "reconstruction_mse": metrics["loss"].detach(),
                    "reconstruction_psnr": metrics["reconstruction_psnr"]}
        images = batch.images.float()
        pair = int(phase.removeprefix("layer")) - 1
        with torch.no_grad():  # the frozen layers below: they get no gradient, whatever the loop does
            below = self.encode(images, pairs=pair)
        hidden = self.encoders[pair](below)
        rebuilt = self.decoders[pair](hidden).float()
        if pair == 0:
            rebuilt = torch.sigmoid(rebuilt)
        # Bengio et al. 2007: pair k reconstructs its own input, the representation below it.
        loss = F.mse_loss(rebuilt, below)
        with torch.no_grad():  # the whole stack on the image, for the monitor and the code fit
            codes = hidden.detach()
            for layer in self.encoders[pair + 1:]:
                codes = layer(codes)
            codes = codes.float()
            reconstructions = self.decode(codes)
            self.code_fit.observe(codes)
        return {f"loss/{phase}": loss, "reconstruction_mse": F.mse_loss(reconstructions, images),
                "reconstruction_psnr": _psnr(reconstructions, images)}
