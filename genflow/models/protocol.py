"""The interface every family implements, so that the training loop needs no `if family == ...`.

The loop (genflow/train/loop.py) relies on exactly this:

- `optimizers(train)` returns the family's optimizers by name, built after the model is on its
  device (fused kernels where the device has them). One optimizer is named "main".
- `training_step(batch, step)` returns a dict of scalar tensors. The losses the loop
  back-propagates are `loss` (the family has one optimizer, "main") or `loss/NAME` for each
  named optimizer NAME: each is back-propagated into that optimizer's parameters only, from one
  forward, so D's loss never moves G and G's loss never moves D. An optimizer whose loss is
  absent at a step does not step (alternating GAN steps, the phases of a stacked AE); such a
  family sets `find_unused_parameters`, as DDP then needs. Everything else in the dict is a
  detached metric. `forward` is `training_step`, so DDP's gradient hooks fire when the loop
  calls the wrapped model.
- `monitor` names the key of `training_step`'s output that checkpoints and progress report.
- Hooks, no-ops unless a family needs them:
    `initialize(batch)`       data-dependent initialisation (a flow's actnorm), on a fresh run only,
                              before DDP wraps the model; every rank gets the same batch (the first
                              batch of every rank, gathered), so every rank starts identical.
    `after_step(step)`        after the optimizers stepped (EMA, weight clipping); `step` counts
                              the steps completed.
    `training_state()` /      per-rank state that is not part of the released model (an EBM's
    `load_training_state()`   replay buffer): saved per rank in checkpoints, restored on resume.
                              Keep it out of `state_dict` (a plain attribute, not a buffer: DDP
                              broadcasts buffers from rank 0 at every forward).
- `sample(n, cond, generator)` returns uint8 images [n, 3, H, W]; families with sampler choices
  take them as keyword arguments (ddpm: sampler, steps, eta).
- `evaluate(batch)` returns per-batch metrics, each named for what it is (a BCE is not bits/dim).
- `reconstruct(images)` returns uint8 reconstructions, or None where the family does not reconstruct.

Objectives must be means of per-image terms (no BatchNorm, no batch-level nonlinearity of a
mean), so that DDP over N ranks computes what one rank computes on the combined batch; the
contract test (tests/models/test_protocol.py) holds every family to that.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

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
    # The training_step key that checkpoints and progress lines report.
    monitor: ClassVar[str] = "loss"
    # True where some parameters get no gradient at some steps (alternation, phases): DDP then
    # has to look for them after every forward, which costs a graph traversal.
    find_unused_parameters: ClassVar[bool] = False

    def __init__(self, config: StrictModel):
        super().__init__()
        self.config = config

    def forward(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        return self.training_step(batch, step)

    def training_step(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def optimizers(self, train: TrainParams) -> dict[str, torch.optim.Optimizer]:
        return {"main": adamw(self.trainable_parameters(), train)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def initialize(self, batch: Batch) -> None:
        """Data-dependent initialisation on a fresh run (not on resume); no-op by default."""

    def after_step(self, step: int) -> None:
        """Called after every optimizer stepped; `step` = steps completed. No-op by default."""

    def training_state(self) -> dict[str, Any]:
        """This rank's state that checkpoints keep but the released model does not."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no training state, got {sorted(state)}")

    @torch.no_grad()
    def sample(self, n: int, cond: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor | None:
        """uint8 reconstructions of `images`, or None: this family does not reconstruct."""
        return None

    def device(self) -> torch.device:
        return next(self.parameters()).device

    def to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """Model-range floats -> uint8 pixels, the form `sample` returns."""
        low, high = self.image_range
        scaled = (images.float() - low) / (high - low)
        return (scaled.clamp(0, 1) * 255).round().to(torch.uint8)

    def check_unconditional(self, cond: torch.Tensor | None) -> None:
        if cond is not None:
            raise ValueError(f"{type(self).__name__} is unconditional: sample it without attributes (cond=None)")


def adamw(parameters, train: TrainParams, lr: float | None = None, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW with the training params' lr and weight decay; fused where the parameters are on a
    GPU (one kernel for the whole update). Call it once the model is on its device."""
    parameters = list(parameters)
    fused = bool(parameters) and all(p.is_cuda for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr or train.lr, betas=betas, weight_decay=train.weight_decay, fused=fused)
