"""Sampling images/s of the PixelCNN (with and without its cache) and of the EBM's Langevin
chains, and training images/s in fp32 against bf16 autocast for both, measured in one run.

    python benchmarks/sampling_ar_ebm.py [--n 16] [--uncached-size 8] [--size 64] [--device cpu|cuda] [--threads 1]

(benchmarks/sampling.py, shared with the diffusion family, was not in this branch; these entries
can move into it.) The PixelCNN's uncached sampler runs the whole network once per sub-pixel, so
its time grows with the square of the pixel count: it is compared with the cached one at a small
size (--uncached-size) where both finish, and the cached one alone is also timed at full size.
Defaults are the params.yaml configs. This machine may be shared: the ratios are what matter.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from genflow.models import families  # noqa: F401 (registers the family configs load_params validates)
from genflow.config import load_params
from genflow.models.ebm import EBM
from genflow.models.pixelcnn import PixelCNN
from genflow.models.protocol import Batch


def timed(function) -> float:
    """Seconds for one call, after one warm-up call."""
    function()
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def synchronized(device: torch.device, function):
    def run():
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def training_images_per_s(model, images: torch.Tensor, bf16: bool, steps: int) -> float:
    device = images.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = Batch(images, torch.zeros(len(images), 40, device=device))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step():
        with autocast:
            loss = model(batch, 0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    seconds = timed(synchronized(device, lambda: [step() for _ in range(steps)]))
    return steps * len(images) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=16, help="images per sampling batch")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--uncached-size", type=int, default=8)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (on a shared machine, more threads oversubscribe it)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    params = load_params()
    torch.manual_seed(0)

    print(f"device {device}, {torch.get_num_threads()} threads; sampling batches of {args.n}")
    for likelihood in ("logistic_mixture", "softmax"):
        config = params.family_config("pixelcnn").model_copy(update={"likelihood": likelihood})
        model = PixelCNN(config).to(device).eval()
        small = {
            cache: args.n / timed(synchronized(device, lambda: model.sample(args.n, size=args.uncached_size, cache=cache)))
            for cache in (True, False)
        }
        print(
            f"pixelcnn {likelihood:16s} {args.uncached_size}x{args.uncached_size}: cached {small[True]:9.2f} img/s, "
            f"uncached {small[False]:9.2f} img/s, cache speed-up {small[True] / small[False]:6.1f}x"
        )
        start = time.perf_counter()
        synchronized(device, lambda: model.sample(args.n, size=args.size, cache=True))()
        full = args.n / (time.perf_counter() - start)
        print(f"pixelcnn {likelihood:16s} {args.size}x{args.size}: cached {full:9.3f} img/s (uncached not run: whole network per sub-pixel)")

    ebm = EBM(params.family_config("ebm")).to(device)
    steps = ebm.config.sample_steps
    rate = args.n / timed(synchronized(device, lambda: ebm.sample(args.n, size=args.size)))
    print(f"ebm Langevin {args.size}x{args.size}, {steps} steps: {rate:9.2f} img/s ({rate * steps:9.1f} image-steps/s)")

    images = torch.rand(args.train_batch, 3, args.size, args.size, device=device)
    levels = (images * 255).round() / 255  # 8-bit pixels, as the loader gives them
    for name, model, batch in (("pixelcnn", PixelCNN(params.family_config("pixelcnn")), levels), ("ebm", EBM(params.family_config("ebm")), images * 2 - 1)):
        model = model.to(device)
        fp32 = training_images_per_s(model, batch, bf16=False, steps=args.train_steps)
        bf16 = training_images_per_s(model, batch, bf16=True, steps=args.train_steps)
        print(f"train {name:8s} fp32 {fp32:8.1f} img/s, bf16 autocast {bf16:8.1f} img/s, bf16/fp32 {bf16 / fp32:5.2f}x")


if __name__ == "__main__":
    main()
