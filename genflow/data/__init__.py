"""CelebA in, WebDataset shards out: celeba.py reads a source, synth.py writes a CelebA-format
sample, split.py splits train/test, shards.py writes the shards, loader.py streams them."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from genflow import storage


@contextmanager
def replaced_atomically(out: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside `out`; when the block succeeds it takes `out`'s place.

    Everything is written under a hidden temporary name and renamed into place at the end, so
    an interrupted or failed run leaves either the previous complete output or none, never a
    half-written one. The folder sits beside `out` (same filesystem) so the rename is atomic.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        # A folder cannot be replaced by one rename: move the old one aside first.
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def published_in_order(out: str, last: str) -> Iterator[tuple[Path, Callable[[str], None]]]:
    """replaced_atomically for an object store (genflow/storage.py), where no rename replaces a
    prefix: yield a local staging folder and `publish(file)`, which uploads `file` (relative to
    both) to a hidden prefix beside `out` and removes the local copy (a file stays on local disk
    only from when it is written until it is uploaded).

    The earlier output stays untouched while the block runs: a failed or interrupted block removes
    its hidden prefix and leaves `out` as it was. When the block succeeds, the earlier output is
    removed (its `last` file, the one whose presence marks a finished output, first: from then on
    no reader takes the prefix for a finished output), the new files are copied in by the store
    (no upload again) and `last` at the end. Should that swap fail, the whole new output is still
    in the hidden prefix, which the error names.
    """
    parent, leaf = out.rstrip("/").rsplit("/", 1)
    if parent.endswith(":/"):  # s3://BUCKET: no prefix beside a bucket's root to stage in
        raise ValueError(f"{out} is a bucket's root: give a prefix in it, e.g. {out.rstrip('/')}/shards")
    hidden = f"{parent}/.{leaf}.staging-{secrets.token_hex(4)}"
    staging = Path(tempfile.mkdtemp(prefix="genflow-staging-"))
    published: list[str] = []

    def publish(file: str) -> None:
        storage.upload(staging / file, storage.join(hidden, file))
        (staging / file).unlink()
        published.append(file)

    try:
        yield staging, publish
    except BaseException:
        storage.remove_tree(hidden)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        storage.remove(storage.join(out, last))
        storage.remove_tree(out)
        for file in sorted(published, key=lambda name: name == last):  # `last` last
            storage.copy(storage.join(hidden, file), storage.join(out, file))
    except BaseException as err:
        raise RuntimeError(f"replacing {out} failed part way ({err}); the complete new output is in {hidden}: "
                           f"copy it to {out}, or run the command again") from err
    storage.remove_tree(hidden)
