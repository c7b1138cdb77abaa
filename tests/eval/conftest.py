"""Tiny shards shared by the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from genflow.config import DataParams
from genflow.data.shards import prepare
from genflow.data.synth import write_sample


@pytest.fixture(scope="session")
def eval_shards(tmp_path_factory) -> Path:
    """Shards of an 80-image synthetic sample: 56 train, 24 test."""
    root = tmp_path_factory.mktemp("eval-shards")
    write_sample(root / "sample", n=80, seed=5)
    prepare(DataParams(source=str(root / "sample"), shards=str(root / "shards"), processes=1, shard_size=32))
    return root / "shards"
