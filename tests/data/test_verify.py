"""Shards are checked against stats.json before training: corrupted, truncated and missing
shards are named, unchanged shards are not hashed twice, and the digest is of what was read."""

import os
import shutil
import time
from pathlib import Path

import pytest

from genflow.config import ParamsError
from genflow.data import verify
from genflow.data.loader import dataset_digest, read_stats
from genflow.data.verify import ShardError, check_batch_fits, verified_digest


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENFLOW_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def shards(tmp_path, prepared):
    """A private copy of the session's prepared shards (these tests damage them)."""
    return shutil.copytree(prepared, tmp_path / "shards")


def zero_pixels(path, count=4096):
    """Zero bytes in the middle of a shard, keeping its size (what a bad disk or copy does)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(count)
    path.write_bytes(bytes(data))


def test_corrupted_shard_is_caught_with_its_name_not_trained_under_the_clean_name(shards):
    clean = dataset_digest(shards)
    shard = shards / read_stats(shards)["shards"]["train"][1]["file"]
    original = shard.read_bytes()
    zero_pixels(shard)
    with pytest.raises(ShardError, match=rf"{shard}: content differs from the sha256 stats.json records") as err:
        dataset_digest(shards)
    assert "1 of 7 shards" in str(err.value) and "genflow data prepare" in str(err.value)
    shard.write_bytes(original)  # repaired: checked again (its mtime moved), and the clean name is back
    assert dataset_digest(shards) == clean


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_truncated_shard_is_named(shards, damage):
    shard = shards / read_stats(shards)["shards"]["test"][0]["file"]
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:1000])
    expected = "missing" if damage == "missing" else "1000 bytes, stats.json records"
    with pytest.raises(ShardError, match=rf"{shard}: {expected}"):
        verified_digest(shards)


def test_unchanged_shards_are_hashed_once_and_a_changed_one_again(shards, monkeypatch):
    an_hour_ago = time.time_ns() - 3600 * 10**9  # files written seconds ago are hashed every time (racy)
    for shard in shards.rglob("*.tar"):
        os.utime(shard, ns=(an_hour_ago, an_hour_ago))
    hashed = []
    real_sha256 = verify._sha256
    monkeypatch.setattr(verify, "_sha256", lambda path: hashed.append(Path(path).name) or real_sha256(path))
    digest = verified_digest(shards)
    assert len(hashed) == 7
    hashed.clear()
    assert verified_digest(shards) == digest and hashed == []
    shard = shards / "train" / "celeba64-000002.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))
    assert verified_digest(shards) == digest and hashed == ["celeba64-000002.tar"]


def test_a_shard_modified_seconds_ago_is_hashed_again(shards):
    """A file changed twice within one mtime tick keeps its size and mtime (git's "racy" index):
    a hash taken seconds after a write is not trusted later."""
    shard = shards / "test" / "celeba64-000000.tar"
    clean = shard.read_bytes()
    zero_pixels(shard)
    tick = shard.stat().st_mtime_ns
    with pytest.raises(ShardError):
        verified_digest(shards)
    shard.write_bytes(clean)  # repaired within the same tick: same size, same mtime
    os.utime(shard, ns=(tick, tick))
    verified_digest(shards)


def test_batch_larger_than_a_workers_share_of_the_data_is_refused(prepared):
    # 70 train images, of which the last 7 are held out for validation (genflow/data/split.py):
    # 63 training images, ceil(63 / 2) = 32 for each worker.
    check_batch_fits(prepared, batch_size=32, workers=2)
    with pytest.raises(ParamsError, match=r"train.batch_size=33 .* \(63 training images: the train split minus its 7 "
                                          r"validation images\); lower train.batch_size to at most 32"):
        check_batch_fits(prepared, batch_size=33, workers=2)
