"""Sample quality of a trained model, family-agnostic: what `genflow evaluate` adds to the
family's own measures.

    fd_effnet, kid_effnet (+ _std), precision_effnet, recall_effnet     generated vs test images
    fd_effnet_n                                                        images per set behind them
    attribute_match, attribute_match/NAME                              conditional families: share of
                                                                       samples the celeba classifier finds
                                                                       carrying each attribute asked for
    quality_sampling_s, quality_featurising_s                          where the time went
    sample_images_per_s                                                generated images per second

N = evaluate.samples on a GPU (10,000), evaluate.cpu_samples on CPU: both sets hold N images (the
test split's first N; fewer when it is smaller, and then the generated set matches it).
"""

from __future__ import annotations

import statistics
from typing import Iterator

import torch

from genflow.config import Params
from genflow.data.celeba import ATTRIBUTE_NAMES
from genflow.eval.distances import SavedStats
from genflow.eval.features import StreamTimes, load_extractor, real_stats, stream_features
from genflow.eval.fid import compare, default_samples, sample_batches, conditions_of_test_split
from genflow.models.protocol import GenerativeModel


def sample_quality(model: GenerativeModel, params: Params, device: torch.device, log=print) -> dict[str, float]:
    e = params.evaluate
    extractor = load_extractor(e.extractor, e, device)
    n = default_samples(params, device)
    real = real_stats(extractor, params.data.shards, "test", n, e.keep_features, e.batch_size, e.stats_cache)
    n = min(n, real.count)  # a small test split: as many generated images as real ones
    conditions = conditions_of_test_split(params.data.shards, n) if model.conditional else None
    batches: Iterator[torch.Tensor] = sample_batches(model, n, e.batch_size, params.train.seed, conditions)
    checker = attribute_checker(params, device, log) if model.conditional else None
    if checker is not None:
        batches = checker.watch(batches, conditions)
    times = StreamTimes()
    generated = SavedStats.of(stream_features(extractor, batches, keep=e.keep_features, limit=n, times=times))
    metrics = compare(real, generated, extractor.suffix, params)
    metrics[f"fd_{extractor.suffix}_n"] = generated.count
    metrics["quality_sampling_s"] = times.producing
    metrics["quality_featurising_s"] = times.featurising
    # Timed on the images drawn here anyway: a PixelCNN draws ~1 image/s on a CPU, and a separate
    # timing run would double evaluate's longest part.
    metrics["sample_images_per_s"] = generated.count / max(times.producing, 1e-9)
    if checker is not None:
        metrics.update(checker.shares())
    return metrics


class AttributeChecker:
    """Counts, batch by batch, the samples the celeba classifier finds carrying what they were asked."""

    def __init__(self, network):
        self.network = network
        self.hits = torch.zeros(len(ATTRIBUTE_NAMES), dtype=torch.long)
        self.asked = torch.zeros(len(ATTRIBUTE_NAMES), dtype=torch.long)

    def watch(self, batches: Iterator[torch.Tensor], conditions: torch.Tensor) -> Iterator[torch.Tensor]:
        from genflow.eval.featurizer import attribute_hits

        start = 0
        for images in batches:
            requested = conditions[torch.arange(start, start + len(images)) % len(conditions)]
            hits, asked = attribute_hits(self.network, images, requested)
            self.hits += hits
            self.asked += asked
            start += len(images)
            yield images

    def shares(self) -> dict[str, float]:
        shares = {f"attribute_match/{name}": float(h) / int(a)
                  for name, h, a in zip(ATTRIBUTE_NAMES, self.hits, self.asked) if a > 0}
        if shares:
            shares["attribute_match"] = sum(shares.values()) / len(shares)
        return shares


def attribute_checker(params: Params, device: torch.device, log) -> AttributeChecker | None:
    """The checker, or None (said aloud) where the celeba featurizer is missing or too weak."""
    from genflow.eval.featurizer import FeaturizerTooWeak, load_featurizer

    try:
        network, _ = load_featurizer(params.evaluate.featurizer)
    except (FileNotFoundError, FeaturizerTooWeak) as err:
        log(f"attribute check skipped: {err}")
        return None
    return AttributeChecker(network.to(device))


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_images_per_s(run_id: str) -> float | None:
    """The median of the training run's logged train/images_per_s (None if it logged none)."""
    from mlflow import MlflowClient

    from genflow.track import mlflow as tracking

    history = tracking.with_retries(lambda: MlflowClient().get_metric_history(run_id, "train/images_per_s"))
    return statistics.median(point.value for point in history) if history else None
