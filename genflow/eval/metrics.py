"""Metrics over a whole split, from the per-batch metrics each family's `evaluate` returns."""

from __future__ import annotations

import time
from typing import Iterable

import torch

from genflow.models.protocol import Batch, GenerativeModel


@torch.no_grad()
def evaluate_batches(model: GenerativeModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> dict[str, float]:
    """Image-weighted means of `model.evaluate` over `batches` (so a short last batch counts
    for what it holds), plus the number of images seen."""
    model.eval()
    totals: dict[str, float] = {}
    images_seen = 0
    for images, attrs in batches:
        metrics = model.evaluate(Batch(images.to(device), attrs.to(device)))
        n = len(images)
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value) * n
        images_seen += n
    if images_seen == 0:
        raise ValueError("no test images to evaluate: the test split is empty")
    means = {name: total / images_seen for name, total in totals.items()}
    means["images"] = images_seen
    return means


@torch.no_grad()
def sampling_speed(model: GenerativeModel, n: int, device: torch.device, repeats: int = 3) -> float:
    """Generated images per second (best of `repeats`, after one warm-up call)."""
    model.eval()
    generator = torch.Generator(device).manual_seed(0)
    cond = torch.zeros(n, 40, device=device) if model.conditional else None
    model.sample(n, cond=cond, generator=generator)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.sample(n, cond=cond, generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return n / best
