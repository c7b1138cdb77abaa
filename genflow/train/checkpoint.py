"""What a checkpoint holds and how it is read back.

A checkpoint directory is what every rank hands to `ray.train.report`; Ray merges the ranks'
directories into one, so rank 0 writes the model and the optimisers, and every rank writes its
own part: its RNG states (the ranks draw different noise) and the model's per-rank training
state (an EBM's replay buffer), which is never part of the released model. Layout:

    model.pt          the released-model file (genflow/models/saved.py)
    optimizers.pt     {"step", "optimizers": {NAME: state}, "schedulers": {NAME: state}}
    rank-{R}.pt       {"rng": torch, CUDA, numpy and python RNG states, "training_state": ...} of rank R
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from genflow.models.protocol import GenerativeModel
from genflow.models.saved import MODEL_FILE, load_model, save_model  # noqa: F401  (load_model: re-exported)

OPTIMIZERS_FILE = "optimizers.pt"


def rank_file(rank: int) -> str:
    return f"rank-{rank}.pt"


def save_checkpoint(
    directory: str | Path,
    *,
    family: str,
    model: GenerativeModel,
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler],
    step: int,
    rank: int,
) -> None:
    """Write this rank's part of the checkpoint of `step` (steps completed) into `directory`."""
    directory = Path(directory)
    if rank == 0:
        save_model(directory / MODEL_FILE, family, model)
        torch.save(
            {
                "step": step,
                "optimizers": {name: o.state_dict() for name, o in optimizers.items()},
                "schedulers": {name: s.state_dict() for name, s in schedulers.items()},
            },
            directory / OPTIMIZERS_FILE,
        )
    torch.save({"rng": rng_states(), "training_state": model.training_state()}, directory / rank_file(rank))


def restore_model(directory: str | Path, model: GenerativeModel) -> None:
    """The checkpoint's weights into `model` (before its optimisers exist: they are built on the device)."""
    saved = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["state_dict"])


def restore_optimizers(
    directory: str | Path,
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler],
) -> int:
    """The checkpoint's optimiser and LR-scheduler states into the live ones; returns the step.

    The optimisers are built on the model's device before this: `Optimizer.load_state_dict` moves
    each state tensor to its parameter's device, except Adam's `step`, which torch keeps on the
    CPU (a GPU step counter would cost a host sync per step).
    """
    path = Path(directory) / OPTIMIZERS_FILE
    state = torch.load(path, map_location="cpu", weights_only=False)
    if set(state["optimizers"]) != set(optimizers):
        raise ValueError(f"{path}: saved optimizers {sorted(state['optimizers'])}, the model has {sorted(optimizers)}; "
                         "a checkpoint resumes only the model that wrote it (start a new run: change train.run_name)")
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
        schedulers[name].load_state_dict(state["schedulers"][name])
    return int(state["step"])


def restore_rank_state(directory: str | Path, model: GenerativeModel, rank: int) -> bool:
    """This rank's RNG states and the model's training state; False where the checkpoint has none
    for this rank (a run resumed with more workers than it was saved with: the new ranks keep the
    fresh seed and the fresh training state they were given)."""
    path = Path(directory) / rank_file(rank)
    if not path.exists():
        return False
    saved = torch.load(path, map_location="cpu", weights_only=False)
    set_rng_states(saved["rng"])
    model.load_training_state(saved["training_state"])
    return True


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
