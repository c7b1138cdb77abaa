"""Test-split measures: image-weighted means, and reconstruction PSNR/SSIM from `reconstruct`."""

import torch

from genflow.eval.metrics import evaluate_batches, reconstruction_quality
from tests.eval.test_quality import tiny_vae


def test_reconstruction_quality_of_a_perfect_and_a_poor_reconstruction():
    class Echo(type(tiny_vae())):
        def reconstruct(self, images):
            return self.to_uint8(images)

    model = tiny_vae()
    images = torch.rand(3, 3, 64, 64)
    perfect = Echo(model.config).eval()
    quality = reconstruction_quality(perfect, images, own={})
    assert float(quality["reconstruction_ssim"]) > 0.999 and float(quality["reconstruction_psnr"]) > 80
    poor = reconstruction_quality(model, images, own={})
    assert float(poor["reconstruction_ssim"]) < 0.5 and float(poor["reconstruction_psnr"]) < 15
    assert "reconstruction_psnr" not in reconstruction_quality(model, images, own={"reconstruction_psnr": 1.0})


def test_evaluate_batches_weights_by_images_and_adds_ssim():
    model = tiny_vae()
    batches = [(torch.rand(4, 3, 64, 64), torch.zeros(4, 40)), (torch.rand(1, 3, 64, 64), torch.zeros(1, 40))]
    metrics = evaluate_batches(model, batches, torch.device("cpu"))
    assert metrics["images"] == 5
    assert {"bits_per_dim", "reconstruction_psnr", "reconstruction_ssim"} <= set(metrics)
