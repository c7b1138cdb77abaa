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
    both) to `out` and removes the staged copy.

    The earlier output's `last` file (the one whose presence marks a finished output) is removed
    first, so that from then on no reader takes the prefix for a finished output, then the rest of
    it; the block publishes its files as they are finished and `last` at the end. A failed block
    removes what it published: the prefix holds a whole output or none, never `last` over part of
    one. A file stays staged only from when it is written until it is published.
    """
    storage.remove(storage.join(out, last))
    storage.remove_tree(out)
    staging = Path(tempfile.mkdtemp(prefix="genflow-staging-"))

    def publish(file: str) -> None:
        storage.upload(staging / file, storage.join(out, file))
        (staging / file).unlink()

    try:
        yield staging, publish
    except BaseException:
        storage.remove_tree(out)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
