"""Metrics over a whole split, from the per-batch metrics each family's `evaluate` returns."""

from __future__ import annotations

from typing import Iterable

import torch

from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from genflow.models.protocol import Batch, GenerativeModel


@torch.no_grad()
def evaluate_batches(model: GenerativeModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> dict[str, float]:
    """Image-weighted means of `model.evaluate` over `batches` (so a short last batch counts
    for what it holds), plus the number of images seen."""
    model.eval()
    totals: dict[str, float] = {}
    images_seen = 0
    for images, attrs in batches:
        images = images.to(device)
        metrics = model.evaluate(Batch(images, attrs.to(device)))
        metrics.update(reconstruction_quality(model, images, own=metrics))
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
def reconstruction_quality(model: GenerativeModel, images: torch.Tensor, own: dict) -> dict[str, torch.Tensor]:
    """PSNR and SSIM (Wang et al. 2004, torchmetrics' Gaussian 11x11 window) of `reconstruct`'s
    uint8 output against the input pixels, per-image means; nothing for families that do not
    reconstruct. A PSNR the family reports itself (before quantisation) is kept."""
    reconstructed = model.reconstruct(images)
    if reconstructed is None:
        return {}
    original = model.to_uint8(images).float() / 255
    reconstructed = reconstructed.float() / 255
    quality = {"reconstruction_ssim": structural_similarity_index_measure(reconstructed, original, data_range=1.0)}
    if "reconstruction_psnr" not in own:
        quality["reconstruction_psnr"] = peak_signal_noise_ratio(reconstructed, original, data_range=1.0, dim=(1, 2, 3))
    return quality
