"""The train/test split: floor(train_fraction * N) images train, the rest test.

Each image is ranked by a keyed hash of its id, so the split depends only on the set of ids
and the seed: not on file order, process count or platform. An id added to or removed from
the set moves at most one other image across the boundary (a permutation of N would move
them all), which is why prepare splits the annotated list before decoding: see `prepare`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def split_ids(ids: Iterable[str], train_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, test), each in rank order: a seeded pseudo-random order, the order shards are written in."""
    ranked = sorted(ids, key=lambda image_id: (_rank(image_id, seed), image_id))
    if len(set(ranked)) != len(ranked):
        raise ValueError("split_ids: the ids are not unique; each image must be listed once")
    n_train = int(train_fraction * len(ranked))
    return ranked[:n_train], ranked[n_train:]


def _rank(image_id: str, seed: int) -> bytes:
    return hashlib.blake2b(image_id.encode(), digest_size=8, key=str(seed).encode()).digest()
