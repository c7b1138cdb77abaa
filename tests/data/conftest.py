"""Tiny CelebA-format samples and their shards, shared by the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from genflow.config import DataParams
from genflow.data.shards import prepare
from genflow.data.synth import write_sample


def _prepare_into(source: Path, shards: Path, **params) -> dict:
    defaults = {"processes": 1, "shard_size": 16}
    return prepare(DataParams(source=str(source), shards=str(shards), **{**defaults, **params}))


@pytest.fixture(scope="session")
def prepare_into():
    """prepare_into(source, shards, **data_params) -> stats, with test-sized defaults."""
    return _prepare_into


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """Shards of a 100-image sample: 70 train in shards of 16 (16,16,16,16,6), 30 test."""
    root = tmp_path_factory.mktemp("prepared")
    write_sample(root / "sample", n=100, seed=3)
    _prepare_into(root / "sample", root / "shards")
    return root / "shards"
