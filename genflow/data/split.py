"""The train/test split: floor(train_fraction * N) images train, the rest test; and the
validation set carved from the train split.

Each image is ranked by a keyed hash of its id, so the split depends only on the set of ids
and the seed: not on file order, process count or platform. An id added to or removed from
the set moves at most one other image across the boundary (a permutation of N would move
them all), which is why prepare splits the annotated list before decoding: see `prepare`.

Validation: the last `validation_count(n_train)` images of the train split in that rank order
(the order the train shards are written in, so the loader carves it from existing shards with
no new prepare). Model selection (checkpoint scoring, hyperparameter search) sees only these;
training sees the train split minus them; the test split is for final evaluation only.
On CelebA: 141,819 train = 136,819 training + 5,000 validation; 60,780 test.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from fractions import Fraction

# Enough for checkpoint scoring and search (each reads a few batches of it), small enough to
# leave the training set nearly whole; a tenth of the train split on small samples.
MAX_VALIDATION_IMAGES = 5000


def split_ids(ids: Iterable[str], train_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, test), each in rank order: a seeded pseudo-random order, the order shards are written in."""
    ranked = sorted(ids, key=lambda image_id: (_rank(image_id, seed), image_id))
    if len(set(ranked)) != len(ranked):
        raise ValueError("split_ids: the ids are not unique; each image must be listed once")
    n_train = train_count(len(ranked), train_fraction)
    return ranked[:n_train], ranked[n_train:]


def train_count(n: int, train_fraction: float) -> int:
    """floor(train_fraction * n) in exact arithmetic on the fraction as written (0.7 is 7/10):
    in floating point int(0.7 * 90) is 62, not 63."""
    return math.floor(Fraction(str(train_fraction)) * n)


def validation_count(n_train: int) -> int:
    """How many images at the end of the train split are held out for validation."""
    return min(MAX_VALIDATION_IMAGES, n_train // 10)


def _rank(image_id: str, seed: int) -> bytes:
    return hashlib.blake2b(image_id.encode(), digest_size=8, key=str(seed).encode()).digest()
