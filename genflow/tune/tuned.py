"""The one rule for tuned params: every family command reads params.yaml, then the winner of the
family's search (tuned/FAMILY.yaml, written by `genflow tune` and `dvc repro tune@FAMILY`), then
its own flags and -S overrides, which win.

    genflow train vae              params.yaml + tuned/vae.yaml
    genflow train vae -S train.lr=1e-3    ... and train.lr from -S, whatever tuned/vae.yaml says
    genflow evaluate vae --no-tuned       params.yaml alone

`genflow train`, `evaluate`, `register` and `sample` apply it, and so do the DVC stages
train@, evaluate@ and register@ (pipelines/common.py): the same params find the same run.
Applying a tuned file is said on the console, with the keys it set.

Light on purpose (no Ray): every command reads it before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from genflow.config import Params, load_params, parse_override
from genflow.tune.report import load_tuned


def tuned_path(family: str) -> Path:
    """Where the winner of `family`'s search lives (relative to the project, like data/ and mlflow.db)."""
    return Path("tuned") / f"{family}.yaml"


@dataclass(frozen=True)
class TunedApplied:
    """What a tuned file did to a command's params."""

    path: Path
    applied: list[str]  # key=value, the overrides taken from the file
    overridden: list[str]  # keys the file holds that the command's own flags or -S set instead

    def describe(self, command: str, opt_out: str = "--no-tuned leaves it out") -> str:
        """One console line: the file, the keys it set, the keys the command's own overrides won,
        and how to do without it."""
        line = f"genflow: {command}: applying {self.path}: " + (", ".join(self.applied) or "no key")
        if self.overridden:
            line += f" (your -S/flags set {', '.join(self.overridden)} instead)"
        return line + f"; {opt_out}"


def _keys(overrides: list[str]) -> list[str]:
    return [".".join(parse_override(text)[0]) for text in overrides]


def family_params(family: str, params_file: str | Path | None = None, overrides: list[str] | None = None,
                  flags: dict[str, str] | None = None, use_tuned: bool = True) -> tuple[Params, TunedApplied | None]:
    """params.yaml (or `params_file`), then tuned/FAMILY.yaml where it exists and `use_tuned`,
    then `overrides` (the command's flags and -S: they win). Returns the params and what the tuned
    file did (None: no file, or --no-tuned).

    `flags` as for load_params: an override -> the flag it stands for, so that an error names it;
    a bad value in the tuned file is reported as the file's.
    """
    overrides = list(overrides or [])
    path = tuned_path(family)
    if not use_tuned or not path.exists():
        return load_params(params_file, overrides, flags=flags), None
    explicit = _keys(overrides)

    def overridden(key: str) -> bool:  # by an override of the key itself or of a section holding it
        return any(key == given or key.startswith(given + ".") for given in explicit)

    tuned = load_tuned(family, path)
    kept = [text for text, key in zip(tuned, _keys(tuned)) if not overridden(key)]
    dropped = [key for key in _keys(tuned) if overridden(key)]
    origins = {**{text: str(path) for text in kept}, **(flags or {})}
    params = load_params(params_file, kept + overrides, flags=origins)
    return params, TunedApplied(path, kept, dropped)
