"""The model protocol's training step in plain torch, as genflow/models/protocol.py states it:
every named loss back-propagated into its own optimizer's parameters from one forward, only the
optimizers whose loss is present step, then `after_step`. Tests drive families with it where
the Ray loop is not the point."""

from __future__ import annotations

import torch

from genflow.models.protocol import Batch, GenerativeModel


def loss_key(optimizer_name: str) -> str:
    return "loss" if optimizer_name == "main" else f"loss/{optimizer_name}"


def protocol_step(model: GenerativeModel, optimizers: dict[str, torch.optim.Optimizer], batch: Batch, step: int) -> dict[str, torch.Tensor]:
    """One training step at `step` (steps completed so far); returns the detached outputs."""
    outputs = model(batch, step)
    present = [name for name in optimizers if loss_key(name) in outputs]
    assert present, f"no loss of any optimizer in {sorted(outputs)}"
    for optimizer in optimizers.values():
        optimizer.zero_grad(set_to_none=True)
    for index, name in enumerate(present):
        params = [p for group in optimizers[name].param_groups for p in group["params"] if p.requires_grad]
        outputs[loss_key(name)].backward(inputs=params, retain_graph=index < len(present) - 1)
    for name in present:
        optimizers[name].step()
    model.after_step(step + 1)
    return {key: value.detach() for key, value in outputs.items()}
