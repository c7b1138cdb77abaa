"""Attribute conditions for conditional models, as `genflow sample --attr NAME=0|1` names them.

    conditions = parse_attribute_settings(["Smiling=1", "Eyeglasses=1"])
    cond = attribute_rows(conditions, "data/shards", n=16, generator=torch.Generator().manual_seed(0))

Each of the n rows keeps the named attributes at their values and takes every other attribute
from one random image of the training split (a row of the shards' manifest.parquet), so the
unnamed attributes follow their joint training frequencies: no bald woman with a beard unless
the training data has one.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from genflow import storage
from genflow.data.celeba import ATTRIBUTE_NAMES

MANIFEST_FILE = "manifest.parquet"


def parse_attribute_settings(items: list[str]) -> dict[str, int]:
    """["Smiling=1", "Male=0"] -> {"Smiling": 1, "Male": 0}; a clear error for anything else."""
    settings: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or name not in ATTRIBUTE_NAMES:
            close = [n for n in ATTRIBUTE_NAMES if n.lower() == name.lower()]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"--attr {item!r}: {name!r} is not a CelebA attribute{hint}; expected NAME=0|1 with NAME "
                             f"one of: {', '.join(ATTRIBUTE_NAMES)}")
        if value not in ("0", "1"):
            raise ValueError(f"--attr {item!r}: the value must be 0 (absent) or 1 (present), got {value!r}")
        if settings.get(name, int(value)) != int(value):
            raise ValueError(f"--attr {name} is given twice, as {settings[name]} and {value}")
        settings[name] = int(value)
    return settings


def training_attribute_table(shards: str | Path) -> torch.Tensor:
    """The 40 attributes of every training image, float [N, 40] of 0/1, from the manifest."""
    path = storage.join(shards, MANIFEST_FILE)  # a folder's or a URI's (genflow/storage.py)
    if not storage.is_file(path):
        raise FileNotFoundError(
            f"{path} is missing: the attributes not named by --attr are drawn from the training images' "
            "manifest, which `genflow data prepare` writes there. Prepare the data on this machine, point "
            "data.shards (-S data.shards=DIR) at a prepared shard folder, or name all 40 attributes with --attr")
    filesystem, inner = storage.filesystem(path)
    table = pq.read_table(inner, filesystem=filesystem, columns=["split", *ATTRIBUTE_NAMES])
    table = table.filter(pc.equal(table["split"], "train"))
    if table.num_rows == 0:
        raise ValueError(f"{path} lists no training images to draw attributes from")
    return torch.stack([torch.from_numpy(table[name].to_numpy(zero_copy_only=False).astype("float32"))
                        for name in ATTRIBUTE_NAMES], dim=1)


def attribute_rows(settings: dict[str, int], shards: str | Path, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n condition rows, float [n, 40]: the named attributes as set, the others those of a random
    training image per row (no manifest is read when all 40 are named)."""
    if len(settings) == len(ATTRIBUTE_NAMES):
        rows = torch.zeros(n, len(ATTRIBUTE_NAMES))
    else:
        table = training_attribute_table(shards)
        rows = table[torch.randint(len(table), (n,), generator=generator)]
    for name, value in settings.items():
        rows[:, ATTRIBUTE_NAMES.index(name)] = float(value)
    return rows
