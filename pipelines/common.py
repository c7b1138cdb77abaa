"""What every DVC stage entry point shares: the params DVC tracks, and writing its outputs."""

from __future__ import annotations

import json

import genflow  # noqa: F401  (telemetry off)
from genflow.atomic import write_atomically
from genflow.config import Params, load_params


def stage_params(overrides: list[str] | None = None) -> Params:
    """params.yaml as DVC sees it (DVC passes -S overrides by rewriting params.yaml), with
    `overrides` on top (train@FAMILY: the winner of tune@FAMILY)."""
    return load_params("params.yaml", overrides)


def family_params(family: str) -> Params:
    """The params of a family's train/evaluate/register stages: params.yaml with the winner of
    tune@FAMILY (tuned/FAMILY.yaml) on top, so that dvc repro trains, evaluates and registers
    the final model with the tuned values (and all three find the same run)."""
    from genflow.tune.report import load_tuned

    return stage_params(load_tuned(family))


def write_json(path: str, content: dict) -> None:
    """Write a DVC metrics file atomically (a killed stage leaves the old file, not half a new one)."""
    write_atomically(path, json.dumps(content, indent=2, sort_keys=True) + "\n")
