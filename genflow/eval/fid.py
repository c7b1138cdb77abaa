"""`genflow fid`: the distance between two image sets, as pytorch-fid's command computes it, offline.

    genflow fid samples/ data/shards:test                       fd_effnet (and kid, precision, recall)
    genflow fid celeba64-vae@staging data/shards --n 2000       a registered model, sampled on the fly
    genflow fid samples/ stats.npz --extractor inception        fd_inception (weights: see inception.py)
    genflow fid data/shards:test --save-stats test.npz          mu and sigma (float64), as pytorch-fid

Each of A and B is a folder of images (PNG/JPEG/..., one size), a shard folder (`genflow data
prepare`'s output; `DIR:SPLIT` picks the split, test by default), a saved statistics `.npz`
(only the Fréchet distance can use those), or a registered model NAME@ALIAS or NAME/VERSION.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from genflow import storage
from genflow.config import Params
from genflow.eval.distances import SavedStats, frechet_distance, kernel_distance, precision_recall
from genflow.eval.features import Extractor, StreamTimes, load_extractor, stream_features

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff"}


def device_of(params: Params) -> torch.device:
    return torch.device("cuda" if params.train.gpu and torch.cuda.is_available() else "cpu")


def default_samples(params: Params, device: torch.device) -> int:
    """evaluate.samples on a GPU, evaluate.cpu_samples on CPU."""
    return params.evaluate.samples if device.type == "cuda" else params.evaluate.cpu_samples


def folder_batches(folder: Path, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches of a folder's images, in name order; every image must have the same size."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    first_size = None
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start : start + batch_size]:
            try:
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
            except OSError as err:
                raise ValueError(f"{path}: not a readable image ({err}); remove it from {folder}") from None
            first_size = first_size or (pixels.shape, path)
            if pixels.shape != first_size[0]:
                raise ValueError(f"{path}: {pixels.shape[1]}x{pixels.shape[0]}, but {first_size[1].name} is "
                                 f"{first_size[0][1]}x{first_size[0][0]}; every image of {folder} must have one size")
            batch.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        yield torch.stack(batch)


def sample_batches(model, n: int, batch_size: int, seed: int, conditions: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """`n` samples of a GenerativeModel, `batch_size` at a time, from one seeded generator;
    conditional families get the rows of `conditions` in turn."""
    device = model.device()
    generator = torch.Generator(device).manual_seed(seed)
    if model.conditional and conditions is None:
        raise ValueError(f"{type(model).__name__} is conditional: sample it with attribute conditions")
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        cond = None
        if model.conditional:
            cond = conditions[torch.arange(start, start + size) % len(conditions)].to(device)
        yield model.sample(size, cond=cond, generator=generator).cpu()


def conditions_of_test_split(shards: str | Path, n: int) -> torch.Tensor:
    """Attribute vectors [<= n, 40] of the test split's first images: what a conditional model is
    asked for, so that its samples are compared with test faces of the same attributes."""
    from genflow.data.loader import ShardStream

    rows, count = [], 0
    for _, attrs in ShardStream(shards, "test", 256, shuffle=False):
        rows.append(attrs[: n - count].float())
        count += len(rows[-1])
        if count >= n:
            break
    return torch.cat(rows)


def load_registered(params: Params, reference: str, device: torch.device):
    import mlflow

    from genflow.track import mlflow as tracking
    from genflow.track.registry import parse_model_reference

    tracking.configure(params.tracking)
    model = mlflow.pyfunc.load_model(parse_model_reference(reference)).unwrap_python_model().model
    return model.to(device).eval()


@dataclass
class Source:
    kind: str  # "stats", "shards", "folder" or "model"
    location: str
    split: str = "test"

    @classmethod
    def parse(cls, text: str) -> "Source":
        path = Path(text)
        if text.endswith(".npz"):
            if not path.is_file():
                raise FileNotFoundError(f"{text}: no such statistics file")
            return cls("stats", text)
        folder, _, split = text.rpartition(":")  # a split name has no "/": s3://... is not DIR:SPLIT
        if folder and "/" not in split and storage.is_file(storage.join(folder, "stats.json")):
            return cls("shards", folder, split)
        if storage.is_file(storage.join(text, "stats.json")):  # a folder's or a URI's (genflow/storage.py)
            return cls("shards", text)
        if path.is_dir():
            return cls("folder", text)
        if "@" in text or text.count("/") == 1 and text.startswith("celeba64-"):
            return cls("model", text)
        raise FileNotFoundError(f"{text}: not a folder of images, a shard folder (DIR or DIR:SPLIT), a .npz of "
                                "statistics, or a registered model NAME@ALIAS / NAME/VERSION")

    def statistics(self, extractor: Extractor, params: Params, n: int | None, times: StreamTimes | None = None) -> SavedStats:
        """This source's feature statistics: the first `n` images (all of them if None; a model needs n)."""
        if self.kind == "stats":
            return SavedStats.load(self.location)
        batch_size = params.evaluate.batch_size
        keep = params.evaluate.keep_features
        batches: Iterable[torch.Tensor]
        if self.kind == "shards":
            from genflow.eval.features import shard_batches

            batches = shard_batches(self.location, self.split, batch_size)
        elif self.kind == "folder":
            batches = folder_batches(Path(self.location), batch_size)
        else:
            model = load_registered(params, self.location, extractor.device)
            n = n or default_samples(params, extractor.device)
            conditions = conditions_of_test_split(params.data.shards, n) if model.conditional else None
            batches = sample_batches(model, n, batch_size, params.train.seed, conditions)
        return SavedStats.of(stream_features(extractor, batches, keep=keep, limit=n, times=times))


def compare(a: SavedStats, b: SavedStats, suffix: str, params: Params) -> dict[str, float]:
    """fd_SUFFIX, and where both sides kept features, kid_SUFFIX (with its std over subsets),
    precision_SUFFIX and recall_SUFFIX (A is the reference set, B the one judged)."""
    metrics = {f"fd_{suffix}": frechet_distance(a.mu, a.sigma, b.mu, b.sigma)}
    if a.features is not None and b.features is not None:
        e = params.evaluate
        device = device_of(params)  # 10,000 x 10,000 distances: on the GPU where there is one
        kid, kid_std = kernel_distance(a.features, b.features, e.kid_subsets, e.kid_subset_size, seed=params.train.seed, device=device)
        precision, recall = precision_recall(a.features, b.features, k=e.pr_k, device=device)
        metrics.update({f"kid_{suffix}": kid, f"kid_{suffix}_std": kid_std,
                        f"precision_{suffix}": precision, f"recall_{suffix}": recall})
    return metrics


def fid(params: Params, a: str, b: str | None, extractor_name: str | None, n: int | None, save_stats: str | None) -> str:
    """What `genflow fid` prints."""
    if (b is None) == (save_stats is None):
        raise ValueError("genflow fid: give two sets (A B) to compare, or one set and --save-stats OUT.npz")
    extractor_name = extractor_name or params.evaluate.extractor
    first = Source.parse(a)
    second = Source.parse(b) if b is not None else None
    extractor = load_extractor(extractor_name, params.evaluate, device_of(params))
    stats_a = first.statistics(extractor, params, n)
    if save_stats is not None:
        if first.kind == "stats":
            raise ValueError(f"{a} is already a statistics file")
        stats_a.save(save_stats)
        return (f"wrote {save_stats}: mu [{len(stats_a.mu)}], sigma {list(stats_a.sigma.shape)} (float64) of "
                f"{stats_a.count} images ({extractor_name} features)")
    stats_b = second.statistics(extractor, params, n)
    metrics = compare(stats_a, stats_b, extractor.suffix, params)
    counts = f"  (n = {stats_a.count or '?'} vs {stats_b.count or '?'})"
    return "\n".join(f"{name}: {value:.6g}" + (counts if name.startswith("fd_") else "") for name, value in metrics.items())
