"""The interface every family implements, so that the training loop needs no `if family == ...`.

- `training_step(batch, step)` returns a dict of scalar tensors; its "loss" is what the loop
  back-propagates. `forward` is `training_step`, so that DDP's gradient hooks fire when the loop
  calls the wrapped model.
- `optimizers(train)` returns the model's optimizers; one for most families, several where the
  model needs them (GAN G/D): how they alternate is the model's business, through the step.
- `sample(n, cond, generator)` returns uint8 images [n, 3, H, W].
- `evaluate(batch)` returns per-batch metrics (PSNR, ELBO, bits/dim, ...) where defined.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import nn

from genflow.config import StrictModel, TrainParams


class Batch(NamedTuple):
    images: torch.Tensor  # float [B, 3, H, W] in the model's `image_range`
    attrs: torch.Tensor  # float [B, 40] in {0, 1}, CelebA's attribute order


class GenerativeModel(nn.Module):
    config_class: ClassVar[type[StrictModel]]
    # The range the loader scales pixels to for this family.
    image_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    # Conditional families take the 40 attributes as `cond` in `sample`; others refuse them.
    conditional: ClassVar[bool] = False
    # What `evaluate` returns that ranks versions of this model (registry promotion gate).
    primary_metric: ClassVar[str]
    primary_metric_lower_is_better: ClassVar[bool] = True

    def __init__(self, config: StrictModel):
        super().__init__()
        self.config = config

    def forward(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        return self.training_step(batch, step)

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def optimizers(self, train: TrainParams) -> list[torch.optim.Optimizer]:
        # fused AdamW where the device supports it: one kernel for the whole update.
        fused = all(p.is_cuda for p in self.parameters())
        return [torch.optim.AdamW(self.parameters(), lr=train.lr, weight_decay=train.weight_decay, fused=fused)]

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {}

    def to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Model-range floats -> uint8 pixels, the form `sample` returns."""
        low, high = self.image_range
        scaled = (images.float() - low) / (high - low)
        return (scaled.clamp(0, 1) * 255).round().to(torch.uint8)
