"""Shards shared by the loop and trainer tests."""

import pytest


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """70 train images (shards of 16) of a synthetic sample."""
    from genflow.config import DataParams
    from genflow.data.shards import prepare
    from genflow.data.synth import write_sample

    root = tmp_path_factory.mktemp("loop-shards")
    write_sample(root / "sample", n=100, seed=3)
    prepare(DataParams(source=str(root / "sample"), shards=str(root / "shards"), processes=1, shard_size=16))
    return root / "shards"
