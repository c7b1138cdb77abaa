"""What checking the shards before training costs (genflow.data.verify), side by side.

    python benchmarks/verify.py [--n 6000] [--repeats 3]

On the shards of one synthetic sample (prepared as `genflow data prepare` does), in one run,
best of --repeats each:
  read        reading every shard's bytes once (the I/O floor of any content check)
  first check verified_digest with an empty cache: size + sha256 of every shard
  cached      verified_digest again: a stat per shard, hashes from the cache
  one epoch   one pass of the train loader over the train split (what training does anyway)
and the CelebA estimate: its 2.9 GB of shards at the first check's rate.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from genflow.config import DataParams
from genflow.data.loader import read_stats, train_loader
from genflow.data.shards import prepare
from genflow.data.synth import write_sample

CELEBA_SHARD_BYTES = 2.9e9


def best(repeats: int, action, before=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=6000, help="images in the synthetic input")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        os.environ["GENFLOW_CACHE_DIR"] = str(root / "cache")
        from genflow.data import verify  # after GENFLOW_CACHE_DIR: the cache is private to this run

        write_sample(root / "sample", n=args.n, seed=0)
        prepare(DataParams(source=str(root / "sample"), shards=str(root / "shards"), shard_size=1000))
        shards = root / "shards"
        files = [shards / s["file"] for split in read_stats(shards)["shards"].values() for s in split]
        total = sum(f.stat().st_size for f in files)

        def read_all():
            for f in files:
                f.read_bytes()

        def epoch():
            for _ in train_loader(shards, batch_size=128, num_workers=2):
                pass

        read = best(args.repeats, read_all)
        first = best(args.repeats, lambda: verify.verified_digest(shards), before=lambda: verify.cache_file().unlink(missing_ok=True))
        cached = best(args.repeats, lambda: verify.verified_digest(shards))
        one_epoch = best(args.repeats, epoch)
    mb = total / 1e6
    print(f"{len(files)} shards, {mb:.0f} MB ({args.n} images)")
    print(f"read        {read * 1e3:8.1f} ms  {mb / read:7.0f} MB/s")
    print(f"first check {first * 1e3:8.1f} ms  {mb / first:7.0f} MB/s  ({first / read:.2f}x reading; {first / one_epoch:.2f}x one epoch)")
    print(f"cached      {cached * 1e3:8.1f} ms  ({cached / first:.4f}x the first check)")
    print(f"one epoch   {one_epoch * 1e3:8.1f} ms  (train split, loader with 2 workers)")
    print(f"CelebA (2.9 GB of shards): first check ~{CELEBA_SHARD_BYTES / (total / first):.1f} s, then a stat per shard")


if __name__ == "__main__":
    main()
