"""The `celeba` feature extractor: a small classifier of CelebA's 40 attributes, trained by the
pipeline itself on the train split (DVC stage `featurizer`), for two jobs:

- a face-specific Fréchet distance (`fd_celeba`) on its penultimate (pooled) features;
- checking attribute-conditional samples: the share of samples it finds to carry each attribute
  they were asked for.

    python -m pipelines.featurizer      (or: dvc repro featurizer)  -> models/featurizer/celeba.pt

Its held-out mean attribute accuracy (on the test split, which it never trains on) is saved in
the file and logged; below `evaluate.featurizer.min_accuracy` the features are refused, since a
classifier that cannot tell the attributes apart measures nothing about faces.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genflow.config import FeaturizerParams
from genflow.data.celeba import ATTRIBUTE_NAMES

BLOCKS = 4  # 64 -> 4 pixels


class AttributeClassifier(nn.Module):
    """Four stride-2 conv blocks (GroupNorm, SiLU), a global average pool (the features), a linear
    layer to 40 logits."""

    def __init__(self, width: int):
        super().__init__()
        layers, c_in = [], 3
        for block in range(BLOCKS):
            c_out = width * 2**block
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.feature_dim = c_in
        self.head = nn.Linear(c_in, len(ATTRIBUTE_NAMES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, 64, 64] -> [-1, 1]; the classifier sees faces at the data's own 64x64."""
    if images.shape[-2:] != (64, 64):
        raise ValueError(f"the celeba extractor takes the data's 64x64 images, got {list(images.shape[-2:])}")
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def held_out_accuracy(network: AttributeClassifier, batches) -> dict[str, float]:
    """Per-attribute accuracy, its mean, and the mean accuracy of always predicting each
    attribute's majority value on the same images (the floor a useless classifier reaches)."""
    network.eval()
    correct = torch.zeros(len(ATTRIBUTE_NAMES), dtype=torch.float64)
    positives = torch.zeros(len(ATTRIBUTE_NAMES), dtype=torch.float64)
    seen = 0
    for images, attrs in batches:
        predicted = network(preprocess(images)) > 0
        correct = correct + (predicted == attrs.bool()).sum(0)
        positives = positives + attrs.sum(0)
        seen += len(images)
    if seen == 0:
        raise ValueError("no held-out images to score the featurizer on")
    accuracy = correct / seen
    share = positives / seen
    result = {f"accuracy/{name}": float(a) for name, a in zip(ATTRIBUTE_NAMES, accuracy)}
    result.update(accuracy=float(accuracy.mean()), majority_baseline=float(torch.maximum(share, 1 - share).mean()), images=seen)
    return result


def train_featurizer(shards: str | Path, config: FeaturizerParams, log=print) -> dict[str, float]:
    """Train on the train split, score on the test split, write `config.path`; returns the scores."""
    from genflow.data.loader import ShardStream, dataset_digest, train_loader

    torch.manual_seed(config.seed)
    network = AttributeClassifier(config.width)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps)
    loader = train_loader(shards, batch_size=config.batch_size, num_workers=0, seed=config.seed, image_range=(0.0, 255.0))
    step, start = 0, time.perf_counter()
    while step < config.steps:
        for images, attrs in loader:
            network.train()
            loss = F.binary_cross_entropy_with_logits(network(preprocess(images.to(torch.uint8))), attrs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % 100 == 0 or step == config.steps:
                log(f"featurizer step {step}/{config.steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
            if step == config.steps:
                break
    scores = held_out_accuracy(network, ShardStream(shards, "test", 256, shuffle=False))
    scores["train_steps"] = step
    path = Path(config.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save({"width": config.width, "state_dict": network.state_dict(), "accuracy": scores["accuracy"],
                "majority_baseline": scores["majority_baseline"], "data_digest": dataset_digest(shards)}, temporary)
    os.replace(temporary, path)
    return scores


class FeaturizerTooWeak(ValueError):
    """The trained classifier scores below the floor; its features would measure nothing."""


def load_featurizer(config: FeaturizerParams) -> tuple[AttributeClassifier, str]:
    """The trained classifier, in eval mode, and its file's sha256; refused below the floor."""
    from genflow.eval.effnet import file_sha256

    path = Path(config.path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained celeba featurizer; run `dvc repro featurizer` "
                                "(python -m pipelines.featurizer) or use --extractor imagenet")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved["accuracy"] < config.min_accuracy:
        raise FeaturizerTooWeak(
            f"{path}: held-out mean attribute accuracy {saved['accuracy']:.3f} is below evaluate.featurizer.min_accuracy "
            f"{config.min_accuracy} (always guessing the majority scores {saved['majority_baseline']:.3f}); "
            "train it longer (evaluate.featurizer.steps) or use --extractor imagenet")
    network = AttributeClassifier(saved["width"])
    network.load_state_dict(saved["state_dict"])
    return network.eval(), file_sha256(path)


@torch.no_grad()
def attribute_hits(network: AttributeClassifier, images: torch.Tensor, requested: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per attribute: (samples asked to carry it that the classifier finds carrying it, samples
    asked to carry it). images uint8 [B, 3, 64, 64], requested [B, 40] in {0, 1}."""
    device = next(network.parameters()).device
    found = network(preprocess(images.to(device))).cpu() > 0
    asked = requested.cpu().bool()
    return (found & asked).sum(0), asked.sum(0)
