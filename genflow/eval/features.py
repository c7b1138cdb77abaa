"""Feature extractors for sample-quality metrics, and streaming their features over image batches.

    extractor = load_extractor("imagenet", params.evaluate, device)    # or "inception", "celeba"
    stats = stream_features(extractor, batches_of_uint8_images)         # FeatureStats
    real = real_stats(extractor, params, split="test")                  # cached per extractor

Extractors (metric names carry the suffix, never "FID" unless it is the Inception network):
    imagenet   EfficientNet-Lite0, ImageNet weights from a pip package: fd_effnet (the default)
    inception  pytorch-fid's FID Inception (user-supplied weights):     fd_inception
    celeba     genflow's own 40-attribute classifier (DVC stage featurizer): fd_celeba
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from genflow.eval.distances import FeatureStats, SavedStats

EXTRACTORS = ("imagenet", "inception", "celeba")
METRIC_SUFFIX = {"imagenet": "effnet", "inception": "inception", "celeba": "celeba"}


@dataclass
class Extractor:
    name: str  # one of EXTRACTORS
    network: nn.Module  # with a `features(preprocessed) -> [B, dim]` method
    preprocess: Callable[[torch.Tensor], torch.Tensor]  # uint8 [B, 3, H, W] -> the network's input
    dim: int
    weights_sha256: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def suffix(self) -> str:
        return METRIC_SUFFIX[self.name]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, H, W] -> float32 features [B, dim] on the CPU."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"the {self.name} extractor takes uint8 RGB images [B, 3, H, W], got {images.dtype} {list(images.shape)}")
        # channels_last on every device: ~1.5x on this CPU for EfficientNet's depthwise convs.
        x = self.preprocess(images.to(self.device)).contiguous(memory_format=torch.channels_last)
        return self.network.features(x).float().cpu()


def load_extractor(name: str, evaluate, device: torch.device | str = "cpu") -> Extractor:
    """An extractor by name; `evaluate` is the params' EvaluateParams (where weights live)."""
    device = torch.device(device)
    if name == "imagenet":
        from genflow.eval import effnet

        network, digest = effnet.load_effnet()
        extractor = Extractor(name, network, effnet.preprocess, effnet.FEATURE_DIM, digest)
    elif name == "inception":
        from genflow.eval import inception
        from genflow.eval.effnet import file_sha256

        path = inception.weights_path(evaluate.inception_weights)
        extractor = Extractor(name, inception.load_inception(path), inception.preprocess, inception.FEATURE_DIM, file_sha256(path))
    elif name == "celeba":
        from genflow.eval import featurizer

        network, digest = featurizer.load_featurizer(evaluate.featurizer)
        extractor = Extractor(name, network, featurizer.preprocess, network.feature_dim, digest)
    else:
        raise ValueError(f"unknown feature extractor {name!r}; known: {', '.join(EXTRACTORS)}")
    extractor.network.to(device, memory_format=torch.channels_last)
    extractor.device = device
    return extractor


@dataclass
class StreamTimes:
    """Where a streaming pass spent its time: producing the images vs featurising them."""

    producing: float = 0.0
    featurising: float = 0.0


def stream_features(extractor: Extractor, batches: Iterable[torch.Tensor], keep: int, limit: int | None = None,
                    times: StreamTimes | None = None) -> FeatureStats:
    """Features of every image in `batches` (uint8), at most `limit`, one batch in memory at a time."""
    stats = FeatureStats(extractor.dim, keep=keep)
    times = times if times is not None else StreamTimes()
    iterator = iter(batches)
    while limit is None or stats.count < limit:
        start = time.perf_counter()
        images = next(iterator, None)
        times.producing += time.perf_counter() - start
        if images is None:
            break
        if limit is not None:
            images = images[: limit - stats.count]
        start = time.perf_counter()
        stats.update(extractor(images))
        if extractor.device.type == "cuda":
            torch.cuda.synchronize()
        times.featurising += time.perf_counter() - start
    if stats.count < 2:
        raise ValueError(f"only {stats.count} images to compute statistics on; need at least 2")
    return stats


def shard_batches(shards: str | Path, split: str, batch_size: int) -> Iterable[torch.Tensor]:
    """uint8 image batches of a shard split, in shard order (the split is already a random
    partition, so its first N images are a fair sample of it)."""
    from genflow.data.loader import ShardStream

    for images, _ in ShardStream(shards, split, batch_size, shuffle=False):
        yield images


def real_stats(extractor: Extractor, shards: str | Path, split: str, n: int, keep: int, batch_size: int,
               cache_dir: str | Path) -> SavedStats:
    """Statistics of the first `n` images of a shard split, cached in `cache_dir` under a key of
    the shards' digest, the split, n, keep and the extractor's weights: computed once per extractor."""
    from genflow.data.loader import dataset_digest

    key = hashlib.sha256(f"{dataset_digest(shards)} {split} {n} {keep} {extractor.name} {extractor.weights_sha256}".encode()).hexdigest()
    path = Path(cache_dir) / f"{split}-{extractor.name}-{key[:16]}.npz"
    if path.is_file():
        return SavedStats.load(path)
    stats = SavedStats.of(stream_features(extractor, shard_batches(shards, split, batch_size), keep=keep, limit=n))
    stats.save(path, with_features=True)
    return stats
