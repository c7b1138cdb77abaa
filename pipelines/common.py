"""What every DVC stage entry point shares: the params DVC tracks, and writing its outputs.

Light on purpose: every stage imports it, so whatever it imports is code every stage depends on
(dvc.yaml; pipelines/family.py holds what only the family stages need)."""

from __future__ import annotations

import json

import genflow  # noqa: F401  (telemetry off)
from genflow.atomic import write_atomically
from genflow.config import Params, load_params
from genflow.provenance import anchor_stores


def stage_params() -> Params:
    """params.yaml as DVC sees it (DVC passes -S overrides by rewriting params.yaml), with the
    stores DVC does not track anchored to the project, also in `dvc exp run --temp`
    (genflow.provenance)."""
    return anchor_stores(load_params("params.yaml"))


def write_json(path: str, content: dict) -> None:
    """Write a DVC metrics file atomically (a killed stage leaves the old file, not half a new one)."""
    write_atomically(path, json.dumps(content, indent=2, sort_keys=True) + "\n")
