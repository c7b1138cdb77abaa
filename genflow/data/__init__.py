"""CelebA in, WebDataset shards out: celeba.py reads a source, synth.py writes a CelebA-format
sample, split.py splits train/test, shards.py writes the shards, loader.py streams them."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
