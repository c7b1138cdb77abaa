"""One optimisation step of the training loop, for any family: the model's named optimisers,
each trained by its own loss from one (DDP) forward, per-optimizer clipping and LR schedule, and
one collective decision whether the step was finite.

Apart from genflow.train.loop (which adds Ray, data, checkpoints and logging around it), this
needs only torch: the contract test and the benchmarks run the very step the loop runs.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist

from genflow.config import TrainParams
from genflow.models.protocol import Batch, GenerativeModel


def lr_lambda(train: TrainParams) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to zero at max_steps."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.lr_schedule == "constant":
            return 1.0
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --- the optimisation step ------------------------------------------------------------------------


@dataclass
class Optimization:
    """A model's named optimisers, one LR schedule each, and which training_step key trains which."""

    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    loss_keys: dict[str, str]  # optimizer name -> the training_step key of its loss
    parameters: dict[str, list[torch.nn.Parameter]]  # every parameter each optimizer holds

    @classmethod
    def build(cls, model: GenerativeModel, train: TrainParams) -> "Optimization":
        """Call once the model is on its device (fused optimisers need it there)."""
        optimizers = model.optimizers(train)
        if not optimizers:
            raise ValueError(f"{type(model).__name__}.optimizers() returned no optimizer")
        single = list(optimizers) == ["main"]
        return cls(
            optimizers=optimizers,
            schedulers={name: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(train)) for name, o in optimizers.items()},
            loss_keys={name: "loss" if single else f"loss/{name}" for name in optimizers},
            parameters={name: [p for group in o.param_groups for p in group["params"]] for name, o in optimizers.items()},
        )

    def trainable(self, name: str) -> list[torch.nn.Parameter]:
        """The parameters of optimizer `name` that take gradients now (a phase may freeze some)."""
        return [p for p in self.parameters[name] if p.requires_grad]


@dataclass
class StepResult:
    outputs: dict[str, torch.Tensor]  # training_step's dict, detached
    grad_norms: dict[str, torch.Tensor]  # per optimizer that had a loss, before clipping
    finite: bool  # on every rank: False means no optimizer stepped, anywhere


def ddp_options(model: GenerativeModel) -> dict[str, Any]:
    """DistributedDataParallel's options for a model (what the loop and the contract test wrap with)."""
    return {"find_unused_parameters": model.find_unused_parameters}


def optimisation_step(
    forward: Callable[[Batch, int], dict[str, torch.Tensor]],
    model: GenerativeModel,
    optimization: Optimization,
    batch: Batch,
    step: int,
    *,
    grad_clip: float,
    autocast: ContextManager = contextlib.nullcontext(),
) -> StepResult:
    """One step of every optimizer that has a loss, from one forward of `forward` (the model, or
    the DDP-wrapped model, whose gradient hooks then average each gradient over the ranks).

    Each named loss is back-propagated into its own optimizer's parameters only (D's loss never
    moves G); the graph is kept until the last. Then: each optimizer's gradients clipped to
    `grad_clip` (0 = no clipping), one all-reduced decision whether every rank's losses and
    gradient norms are finite (a loss can be NaN on one rank while the averaged gradients are
    finite: a rank deciding alone would leave the others waiting in the next all-reduce), the
    optimizers stepped, every LR schedule advanced (the LR follows the global step, also for an
    optimizer that sat this step out) and `model.after_step(step + 1)`.
    """
    with autocast:
        outputs = forward(batch, step)
    losses = {name: outputs[key] for name, key in optimization.loss_keys.items() if key in outputs}
    check_losses(model, optimization, outputs, losses, step)
    for optimizer in optimization.optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    names = list(losses)
    # DDP waits for a gradient of every parameter the forward reached (an alternating GAN's G step
    # reaches D): the last backward also fills those of the optimizers sitting this step out.
    # Those gradients are never used: their optimizers do not step, and every step starts zeroed.
    idle = [p for name in optimization.optimizers if name not in losses for p in optimization.trainable(name)]
    for i, name in enumerate(names):
        last = i == len(names) - 1
        losses[name].backward(inputs=optimization.trainable(name) + (idle if last else []), retain_graph=not last)
    max_norm = grad_clip or float("inf")
    grad_norms = {name: torch.nn.utils.clip_grad_norm_(optimization.trainable(name), max_norm) for name in names}
    detached = {key: value.detach() for key, value in outputs.items()}
    if not all_finite([detached[optimization.loss_keys[name]] for name in names] + list(grad_norms.values())):
        return StepResult(detached, grad_norms, finite=False)
    for name in names:
        optimization.optimizers[name].step()
    with warnings.catch_warnings():
        # An optimizer that has not stepped yet (an alternating GAN's first step) makes torch warn
        # that its schedule stepped first; here that is the intent.
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before `optimizer.step()`"))
        for scheduler in optimization.schedulers.values():
            scheduler.step()
    model.after_step(step + 1)
    return StepResult(detached, grad_norms, finite=True)


def check_losses(model: GenerativeModel, optimization: Optimization, outputs: dict, losses: dict, step: int) -> None:
    """Clear errors where training_step does not return what the protocol says."""
    family = type(model).__name__
    expected = sorted(optimization.loss_keys.values())
    stray = sorted(k for k in outputs if (k == "loss" or k.startswith("loss/")) and k not in expected)
    if stray:
        raise ValueError(f"{family}.training_step returned {stray}, but its optimizers {sorted(optimization.optimizers)} "
                         f"train the losses {expected} (one optimizer named 'main': 'loss'; else 'loss/NAME' each)")
    if not losses:
        raise ValueError(f"{family}.training_step at step {step} returned none of its losses {expected}")
    if len(losses) < len(optimization.loss_keys) and not model.find_unused_parameters:
        absent = sorted(set(expected) - {optimization.loss_keys[n] for n in losses})
        raise ValueError(f"{family}.training_step at step {step} left out {absent}: a family whose steps leave "
                         "optimizers out sets `find_unused_parameters = True` (DDP needs it)")


def all_finite(values: list[torch.Tensor]) -> bool:
    """Whether every value is finite on every rank: one all-reduced flag, the same answer everywhere."""
    flag = torch.stack([torch.isfinite(v).all() for v in values]).all().to(torch.float32)
    if distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_batch(batch: Batch) -> Batch:
    """Every rank's batch, concatenated in rank order, on every rank (one rank: the batch itself)."""
    if not distributed():
        return batch
    parts = []
    for tensor in batch:
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        parts.append(torch.cat(gathered))
    return Batch(*parts)
