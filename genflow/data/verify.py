"""Check the shards against what prepare recorded, before training starts.

    digest = verified_digest("data/shards")    # raises ShardError naming every bad shard

Every shard listed in stats.json must exist with the recorded size (one stat each, always)
and the recorded sha256. A content hash is computed when the file is new to this machine or
has changed since it was last verified (its size or mtime moved), and remembered by
(path, size, mtime) in $GENFLOW_CACHE_DIR/verified-shards.json (default ~/.cache/genflow):
a corrupted shard is caught the first time it is seen, and an unchanged one costs a stat.
A file written less than 2 s before it was hashed is hashed again next time (git's "racy"
rule: a second write within the same mtime tick would leave size and mtime as they were).
The dataset digest (the run key's data part, MLflow's dataset) is made from the hashes
verified here, so a run names the data it read. Shards in an object store (data.shards=s3://...)
are checked the same way, by the object's size and modification time and a hash of its bytes,
which are then read once through (genflow/storage.py).

Cost (`python benchmarks/verify.py`, this project's 2-core machine while heavily shared, load
~40): the first check of 86 MB of shards (6,000 images) took 0.37 s, 236 MB/s, which is the
rate hashlib's sha256 reached in memory at the same time (~250 MB/s): the check is hash-bound.
That is 0.26x one loader epoch over the same shards; a cached check took 0.2 ms. For CelebA's
2.9 GB that is ~12 s once at that rate (shards are hashed on all cores in threads), then a stat
per shard. The policy (hash once per file version, not per run or per read) follows from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from genflow import storage
from genflow.data.loader import read_stats


_RACY_NS = 2_000_000_000


class ShardError(ValueError):
    """The shards on disk are not what prepare wrote; the message names each file and the fix."""


def cache_file() -> Path:
    root = os.environ.get("GENFLOW_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genflow"
    return Path(root) / "verified-shards.json"


def verify_shards(shards: str | Path) -> dict[str, str]:
    """{file: sha256} of every shard in stats.json, each checked against the file on disk."""
    folder = storage.resolved(shards)
    stats = read_stats(folder)
    listed = [shard for split in stats["shards"].values() for shard in split]
    problems, to_hash = [], []
    cache = _read_cache()
    for shard in listed:
        path = storage.join(folder, shard["file"])
        found = storage.stat(path)
        if found is None:
            problems.append(f"{path}: missing")
            continue
        size, mtime_ns = found
        if size != shard["bytes"]:
            problems.append(f"{path}: {size} bytes, stats.json records {shard['bytes']} (truncated or replaced)")
            continue
        known = cache.get(path)
        if not (known and known["size"] == size and known["mtime_ns"] == mtime_ns):
            to_hash.append((path, found))
    # hashlib releases the GIL on large reads: threads hash shards on every core.
    hashed = {}
    with ThreadPoolExecutor(min(len(to_hash), os.cpu_count() or 1) or 1) as pool:
        for (path, (size, mtime_ns)), sha256 in zip(to_hash, pool.map(_sha256, (p for p, _ in to_hash))):
            hashed[path] = entry = {"size": size, "mtime_ns": mtime_ns, "sha256": sha256}
            # As git does with its index: a file modified within the last seconds may be
            # modified again within the same mtime tick, unseen; it is hashed again next time.
            if time.time_ns() - mtime_ns > _RACY_NS:
                cache[path] = entry
    for shard in listed:
        path = storage.join(folder, shard["file"])
        known = hashed.get(path) or cache.get(path)
        if known and known["sha256"] != shard["sha256"] and not any(p.startswith(f"{path}:") for p in problems):
            problems.append(f"{path}: content differs from the sha256 stats.json records (changed or corrupted after prepare)")
    if to_hash:
        _write_cache(cache)
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ShardError(f"{folder}: {len(problems)} of {len(listed)} shards are not what prepare wrote:\n  {shown}\n"
                         "run `genflow data prepare` again (or `dvc checkout`/`dvc repro` where DVC tracks the shards)")
    return {shard["file"]: (hashed.get(storage.join(folder, shard["file"])) or cache[storage.join(folder, shard["file"])])["sha256"]
            for shard in listed}


def verified_digest(shards: str | Path) -> str:
    """One sha256 over every verified shard's sha256: names the exact data a model was trained on."""
    lines = sorted(f"{file} {sha256}\n" for file, sha256 in verify_shards(shards).items())
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _sha256(path: str) -> str:
    if not storage.is_remote(path):
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    digest = hashlib.sha256()
    with storage.open_input(path) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}  # a lost or damaged cache only costs hashing again


def _write_cache(cache: dict) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache))
        os.replace(temporary, path)
    except OSError:
        pass  # an unwritable cache only costs hashing again next time


def check_batch_fits(shards: str | Path, batch_size: int, workers: int) -> None:
    """Refuse a per-worker batch larger than a worker's share of the training images (the train
    split minus its validation tail, as the loader reads them): the loader would silently train
    on smaller batches than the params (and MLflow) say."""
    from genflow.config import ParamsError
    from genflow.data.loader import ShardStream

    stream = ShardStream(shards, "train", batch_size, 0, workers)
    per_worker = stream.samples_per_rank
    if batch_size > per_worker:
        held_out = ShardStream(shards, "validation", batch_size).samples_per_rank
        raise ParamsError(f"train.batch_size={batch_size} (per worker) is more than the {per_worker} training images each of "
                          f"{workers} worker(s) gets from {shards} ({sum(stream.counts)} training images: the train "
                          f"split minus its {held_out} validation images); lower train.batch_size to at most {per_worker} "
                          "(or train.workers), or prepare more data")
