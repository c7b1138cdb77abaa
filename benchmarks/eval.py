"""Feature extraction images/s per extractor, and where `genflow evaluate`'s sample-quality time
goes (sampling vs featurising), measured in one run (this machine is shared: compare the ratios).

    python benchmarks/eval.py [--batch 64] [--n 256] [--device cpu|cuda]

Extractors run on random uint8 64x64 images, best of 3 batches after a warm-up. `inception` and
`celeba` use their architectures with random weights where their weight files are absent (the
speed is the architecture's); `imagenet` its packaged weights. The evaluate split is measured on
the default VAE (params.yaml models.vae, untrained: sampling cost does not depend on training)
streaming n samples through the imagenet extractor, as `genflow evaluate` does.
"""

from __future__ import annotations

import argparse
import time

import torch

from genflow.config import load_params
from genflow.eval import featurizer, inception
from genflow.eval.features import Extractor, StreamTimes, load_extractor, stream_features
from genflow.eval.fid import sample_batches
from genflow.models.families import get_family


def extractors(device: torch.device) -> list[Extractor]:
    params = load_params("params.yaml")
    found = [load_extractor("imagenet", params.evaluate, device)]
    for name, build in (
        ("inception", lambda: Extractor("inception", inception.FIDInceptionV3().eval(), inception.preprocess, 2048, "random")),
        ("celeba", lambda: Extractor("celeba", featurizer.AttributeClassifier(params.evaluate.featurizer.width).eval(),
                                     featurizer.preprocess, params.evaluate.featurizer.width * 8, "random")),
    ):
        try:
            found.append(load_extractor(name, params.evaluate, device))
        except (FileNotFoundError, ValueError):
            extractor = build()
            extractor.network.to(device, memory_format=torch.channels_last)
            extractor.device = device
            found.append(extractor)
    return found


def images_per_s(extractor: Extractor, batch: int, device: torch.device) -> float:
    images = torch.randint(0, 256, (batch, 3, 64, 64), dtype=torch.uint8)
    extractor(images)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        extractor(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return batch / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n", type=int, default=256, help="samples streamed for the evaluate split")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch}")

    rates = {}
    for extractor in extractors(device):
        rates[extractor.name] = images_per_s(extractor, args.batch, device)
        weights = "packaged/trained weights" if extractor.weights_sha256 != "random" else "random weights"
        print(f"  {extractor.name:10s} {rates[extractor.name]:9.1f} images/s  ({extractor.dim}-d, {weights})")
    base = rates["imagenet"]
    print("  relative to imagenet: " + ", ".join(f"{name} {rate / base:.2f}x" for name, rate in rates.items()))

    params = load_params("params.yaml")
    model_class = get_family("vae")
    model = model_class(params.family_config("vae")).to(device).eval()
    times = StreamTimes()
    extractor = load_extractor("imagenet", params.evaluate, device)
    stream_features(extractor, sample_batches(model, args.n, args.batch, seed=0), keep=args.n, limit=args.n, times=times)
    total = times.producing + times.featurising
    print(f"evaluate's sample quality on {args.n} vae samples: sampling {times.producing:.2f} s "
          f"({times.producing / total:.0%}), featurising {times.featurising:.2f} s ({times.featurising / total:.0%})")


if __name__ == "__main__":
    main()
