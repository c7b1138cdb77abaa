"""What a checkpoint holds and how it is read back.

A checkpoint directory is what every rank hands to `ray.train.report`; Ray merges the ranks'
directories into one, so rank 0 writes the model and the optimiser state, and every rank writes
its own RNG state (the ranks draw different noise). Layout:

    model.pt              {"family", "config", "state_dict"}: enough to rebuild the model alone
    training_state.pt     optimisers, LR schedulers, the step
    rng-rank{R}.pt        torch, numpy and python RNG states of rank R
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from genflow.models.protocol import GenerativeModel
from genflow.models.saved import MODEL_FILE, load_model, save_model  # noqa: F401  (load_model: re-exported)

TRAINING_STATE_FILE = "training_state.pt"


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def save_checkpoint(
    directory: str | Path,
    *,
    family: str,
    model: GenerativeModel,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[torch.optim.lr_scheduler.LRScheduler],
    step: int,
    rank: int,
) -> None:
    directory = Path(directory)
    if rank == 0:
        save_model(directory / MODEL_FILE, family, model)
        torch.save(
            {
                "step": step,
                "optimizers": [o.state_dict() for o in optimizers],
                "schedulers": [s.state_dict() for s in schedulers],
            },
            directory / TRAINING_STATE_FILE,
        )
    torch.save(
        {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        directory / _rng_file(rank),
    )


def restore_training_state(
    directory: str | Path,
    *,
    model: GenerativeModel,
    optimizers: list[torch.optim.Optimizer],
    schedulers: list[torch.optim.lr_scheduler.LRScheduler],
    rank: int,
) -> int:
    """Load everything `save_checkpoint` wrote into the live objects; returns the step."""
    directory = Path(directory)
    saved_model = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(saved_model["state_dict"])
    state = torch.load(directory / TRAINING_STATE_FILE, map_location="cpu", weights_only=False)
    for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
        optimizer.load_state_dict(saved)
    for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
        scheduler.load_state_dict(saved)
    rng_path = directory / _rng_file(rank)
    # A run resumed with more workers than it was saved with has no RNG state for the new ranks:
    # they keep the fresh seed they were given.
    if rng_path.exists():
        rng = torch.load(rng_path, weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
    return int(state["step"])
