"""What every DVC stage entry point shares: the params DVC tracks, and writing its outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import genflow  # noqa: F401  (telemetry off)
from genflow.atomic import write_atomically
from genflow.config import Params, load_params


def stage_params() -> Params:
    """params.yaml as DVC sees it (DVC passes -S overrides by rewriting params.yaml)."""
    return load_params("params.yaml")


def family_params(family: str) -> Params:
    """The params of a family's train/evaluate/register stages: params.yaml with the winner of
    tune@FAMILY (tuned/FAMILY.yaml) on top, by the rule every `genflow` family command follows
    (genflow/tune/tuned.py), so that dvc repro and the CLI train, evaluate and register the same run."""
    from genflow.tune.tuned import family_params as with_tuned

    params, tuned = with_tuned(family, "params.yaml")
    if tuned is not None:
        stage = f"{Path(sys.argv[0]).stem}@{family}"  # run as pipelines/STAGE.py
        print(tuned.describe(stage, opt_out=f"a dependency of {stage} (dvc.yaml), written by tune@{family}"))
    return params


def write_json(path: str, content: dict) -> None:
    """Write a DVC metrics file atomically (a killed stage leaves the old file, not half a new one)."""
    write_atomically(path, json.dumps(content, indent=2, sort_keys=True) + "\n")
