"""Energy-based model trained by contrastive divergence with short-run Langevin dynamics and a
replay buffer (Du & Mordatch 2019, "Implicit Generation and Generalization in Energy-Based Models").

    genflow train ebm -S models.ebm.langevin_steps=60 -S models.ebm.step_size=10

A convolutional network E_θ(x) -> one scalar per image defines p_θ(x) ∝ exp(−E_θ(x)). Each
training step (Du & Mordatch 2019, Algorithm 1):

    x̃⁰ ~ the replay buffer B, or uniform noise with probability `reinit_rate` (5% in the paper)
    x̃ᵏ = clip(x̃ᵏ⁻¹ − λ · clip(∇ₓE_θ(x̃ᵏ⁻¹), ±g) + σ · ω),  ω ~ N(0, I),  k = 1..K     (SGLD, Eq. 2,
         with the step λ and the noise σ decoupled as in the paper's experiments, each gradient
         element clipped to ±g, and the samples kept in the image range)
    L = mean[E_θ(x⁺) − E_θ(sg(x̃ᴷ))] + α · mean[E_θ(x⁺)² + E_θ(sg(x̃ᴷ))²]                    (Eq. 3 plus
         the energy-magnitude regulariser of Sec. 3.3)
    the chains' ends go back into B where they were drawn from.

The buffer is this rank's own training state: a plain attribute (DDP broadcasts module buffers
from rank 0, which would make every rank's chains the same), saved in checkpoints through
`training_state()` and restored by `load_training_state()`, never in `state_dict` or the released
model. It is held in float16: half the memory and checkpoint size, and its rounding (~5e-4 on
[-1, 1]) is far below the Langevin noise σ.

The chains differentiate the energy with respect to the samples only (`torch.autograd.grad` with
the samples as the only inputs): the parameters' gradients are untouched, and under DDP the
chains call this module's own `energy`, never the DDP-wrapped forward, so no gradient
synchronisation fires for them. `sample` runs fresh chains from uniform noise for
`sample_steps` steps (not the buffer: a released model has none); since training chains continue
from the buffer, fresh ones need many more steps than `langevin_steps` to reach the data's modes.

Images are on [-1, 1] (`image_range`): the chains start from uniform noise on the same box and are
clipped to it, symmetric around 0, where the network's inputs are centred.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, PositiveInt
from torch import nn

from genflow.config import StrictModel
from genflow.models.protocol import Batch, GenerativeModel

IMAGE_CHANNELS = 3


class EBMConfig(StrictModel):
    hidden_channels: tuple[PositiveInt, ...] = Field(
        (32, 64, 64), min_length=1, max_length=6, description="channels per stride-2 block of the energy network"
    )
    regularization: float = Field(0.1, ge=0, description="α of the energy-magnitude regulariser α(E⁺² + E⁻²)")
    langevin_steps: PositiveInt = Field(20, description="K, the SGLD steps per training step (from the buffer)")
    step_size: float = Field(10.0, gt=0, description="λ, the SGLD gradient step")
    noise: float = Field(0.005, ge=0, description="σ, the SGLD noise's standard deviation")
    gradient_clip: float = Field(0.03, gt=0, description="each element of ∇ₓE is clipped to ±this in a Langevin step")
    buffer_size: PositiveInt = Field(1000, description="replay buffer images (per rank)")
    reinit_rate: float = Field(0.05, ge=0, le=1, description="probability that a chain starts from noise, not the buffer")
    # Fresh chains need far more steps than the training chains, which continue from the buffer:
    # measured after 600 CPU steps on the sample, 60 steps from noise still look like noise,
    # 300 give face-coloured blobs, 1000 sharper ones.
    sample_steps: PositiveInt = Field(300, description="SGLD steps of `sample`'s fresh chains from noise")


class EBM(GenerativeModel):
    config_class = EBMConfig
    image_range = (-1.0, 1.0)
    primary_metric = "fd_effnet"
    monitor = "loss"

    def __init__(self, config: EBMConfig):
        super().__init__(config)
        layers: list[nn.Module] = []
        in_channels = IMAGE_CHANNELS
        for out_channels in config.hidden_channels:
            # Swish (SiLU): a smooth energy, so that its input gradient, which drives the chains,
            # is smooth too. No normalisation: each image's energy depends on that image alone.
            layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.SiLU()]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.to_energy = nn.Linear(in_channels, 1)
        # The replay buffer: [buffer_size, 3, H, W] float16 once the first batch gives H and W.
        self.replay_buffer: torch.Tensor | None = None

    def energy(self, images: torch.Tensor) -> torch.Tensor:
        """E_θ(x) per image, float32 [B]; low for images the model finds likely."""
        return self.to_energy(self.features(images).mean(dim=(2, 3))).float().squeeze(1)

    # --- Langevin dynamics ---

    def langevin(self, start: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """K SGLD steps from `start` (module docstring); returns the detached chain ends.

        Gradients are taken with respect to the samples only, also inside a no_grad caller.
        """
        config = self.config
        low, high = self.image_range
        x = start.detach().clone()
        with torch.enable_grad():
            for _ in range(steps):
                x.requires_grad_(True)
                (gradient,) = torch.autograd.grad(self.energy(x).sum(), x)
                noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device).to(x.device, x.dtype)
                # Du & Mordatch 2019, Eq. 2: x ← x − λ ∇ₓE(x) + ω, ω ~ N(0, σ²); clipped gradient, kept in range.
                x = (x.detach() - config.step_size * gradient.clamp(-config.gradient_clip, config.gradient_clip) + config.noise * noise).clamp(low, high)
        return x.detach()

    def uniform_noise(self, n: int, shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        low, high = self.image_range
        noise = torch.rand(n, *shape, generator=generator, device=generator.device if generator else device)
        return (low + (high - low) * noise).to(device)

    def chain_starts(self, n: int, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Algorithm 1's initialisation for n chains: (starts [n, 3, H, W] float32, the buffer rows
        they were drawn from [n], which started from fresh noise instead [n] bool). Draws from
        the global RNG, which the loop seeds per rank: each rank keeps different chains."""
        if self.replay_buffer is None:
            self.replay_buffer = self.uniform_noise(self.config.buffer_size, shape, device).half()
        elif self.replay_buffer.shape[1:] != shape:
            raise ValueError(
                f"ebm replay buffer holds images {list(self.replay_buffer.shape[1:])}, the batch is {list(shape)}: "
                "set data.size back, or start a fresh run"
            )
        rows = torch.randint(0, len(self.replay_buffer), (n,), device=device)
        fresh = torch.rand(n, device=device) < self.config.reinit_rate
        starts = torch.where(fresh[:, None, None, None], self.uniform_noise(n, shape, device), self.replay_buffer[rows].float())
        return starts, rows, fresh

    # --- training ---

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        real = batch.images
        starts, rows, _ = self.chain_starts(len(real), tuple(real.shape[1:]), real.device)
        # The chains run in the batch's dtype (the buffer holds float16; float32 is the default).
        samples = self.langevin(starts.to(real.dtype), self.config.langevin_steps)
        self.replay_buffer[rows] = samples.to(self.replay_buffer.dtype)

        energies = self.energy(torch.cat([real, samples.to(real.dtype)]))
        real_energy, sample_energy = energies.split(len(real))
        contrastive = (real_energy - sample_energy).mean()
        magnitude = (real_energy.square() + sample_energy.square()).mean()
        loss = contrastive + self.config.regularization * magnitude  # means of per-image terms
        return {
            "loss": loss,
            "contrastive_divergence": contrastive.detach(),
            "energy_real": real_energy.detach().mean(),
            "energy_sample": sample_energy.detach().mean(),
        }

    def training_state(self) -> dict[str, Any]:
        return {} if self.replay_buffer is None else {"replay_buffer": self.replay_buffer.detach().cpu().clone()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        unknown = set(state) - {"replay_buffer"}
        if unknown:
            raise ValueError(f"ebm training state has unknown keys {sorted(unknown)}; expected only 'replay_buffer'")
        buffer = state.get("replay_buffer")
        if buffer is None:
            self.replay_buffer = None
            return
        if buffer.ndim != 4 or buffer.shape[1] != IMAGE_CHANNELS or len(buffer) != self.config.buffer_size:
            raise ValueError(
                f"ebm replay buffer of shape {list(buffer.shape)} does not fit models.ebm.buffer_size="
                f"{self.config.buffer_size} images [3, H, W]; resume with the params it was saved with"
            )
        self.replay_buffer = buffer.to(self.to_energy.weight.device, torch.float16)

    # --- evaluation and sampling ---

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Energies of the real images and of as many fresh samples (`sample_steps` from noise);
        `energy_gap` = mean E(sample) − mean E(real), positive while the sampler lags the data."""
        real = batch.images.float()
        starts = self.uniform_noise(len(real), tuple(real.shape[1:]), real.device)
        samples = self.langevin(starts, self.config.sample_steps)
        real_energy, sample_energy = self.energy(real), self.energy(samples)
        return {
            "energy_real": real_energy.mean(),
            "energy_sample": sample_energy.mean(),
            "energy_gap": sample_energy.mean() - real_energy.mean(),
            "energy_noise": self.energy(starts).mean(),
        }

    @torch.no_grad()
    def sample(
        self, n: int, cond: torch.Tensor | None = None, generator: torch.Generator | None = None, *, size: int = 64, steps: int | None = None
    ) -> torch.Tensor:
        """n images [n, 3, size, size] uint8: fresh SGLD chains from uniform noise, run for
        `steps` (default: the config's `sample_steps`) steps. Enables gradients inside; leaves the
        parameters' gradients as they were."""
        self.check_unconditional(cond)
        device = self.to_energy.weight.device
        starts = self.uniform_noise(n, (IMAGE_CHANNELS, size, size), device, generator)
        return self.to_uint8(self.langevin(starts, steps or self.config.sample_steps, generator))
