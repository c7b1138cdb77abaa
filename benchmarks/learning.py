"""Does a family learn? Trains it directly through the model protocol (plain torch, one process)
on prepared shards and prints its measures on the test split before and after.

    genflow data synth /tmp/sample --n 2000 && genflow data prepare --source /tmp/sample --out /tmp/shards
    OMP_NUM_THREADS=1 python benchmarks/learning.py ae 100 --shards /tmp/shards --out /tmp/learning
    OMP_NUM_THREADS=1 python benchmarks/learning.py dcgan 400 --shards /tmp/shards -S generator_channels=16

Measures: the family's own `evaluate` over the test split (reconstruction PSNR for the
autoencoders), and for every family a Fréchet distance between as many samples as test images
and the test images on average-pooled pixels (4×4 and 8×8 per channel): a coarse, independent
stand-in for the sample-quality metrics of genflow/eval. Sample grids (and reconstructions) are
written to --out to be looked at.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from genflow.config import TrainParams
from genflow.data.loader import eval_loader
from genflow.images import save_grid
from genflow.models.families import get_family
from genflow.models.gan import frechet_distance, pooled_pixels
from genflow.models.protocol import Batch
from tests.models.direct import protocol_step


def load_split(shards: str, split: str, image_range) -> tuple[torch.Tensor, torch.Tensor]:
    images, attrs = zip(*eval_loader(shards, split=split, batch_size=200, image_range=image_range))
    return torch.cat(images), torch.cat(attrs)


@torch.no_grad()
def measure(model, test: tuple[torch.Tensor, torch.Tensor], out: Path, tag: str) -> dict[str, float]:
    model.eval()
    images, attrs = test
    metrics: dict[str, float] = {}
    per_batch = [model.evaluate(Batch(images[i:i + 100], attrs[i:i + 100])) for i in range(0, len(images), 100)]
    sizes = [len(images[i:i + 100]) for i in range(0, len(images), 100)]
    for name in per_batch[0]:
        metrics[name] = sum(float(m[name]) * n for m, n in zip(per_batch, sizes)) / len(images)
    samples = model.sample(len(images), cond=attrs if model.conditional else None, generator=torch.Generator().manual_seed(1))
    real = model.to_uint8(images)
    for side in (4, 8):
        metrics[f"fd_pooled_pixels_{side}x{side}"] = float(frechet_distance(pooled_pixels(real / 255, side), pooled_pixels(samples / 255, side)))
    save_grid(samples[:64], out / f"{tag}_samples.png")
    reconstructions = model.reconstruct(images[:8])
    if reconstructions is not None:
        save_grid(torch.cat([real[:8], reconstructions]), out / f"{tag}_reconstructions.png", columns=8)
    model.train()
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family")
    parser.add_argument("steps", type=int)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", default="learning")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4, help="train.lr (the GANs take theirs from their config)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="a family config key")
    args = parser.parse_args()

    torch.manual_seed(0)
    model_class = get_family(args.family)
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    model = model_class(model_class.config_class(**overrides))
    out = Path(args.out) / args.family
    out.mkdir(parents=True, exist_ok=True)
    train_images, train_attrs = load_split(args.shards, "train", model_class.image_range)
    test = load_split(args.shards, "test", model_class.image_range)

    before = measure(model, test, out, "untrained")
    optimizers = model.optimizers(TrainParams(batch_size=args.batch_size, max_steps=args.steps, lr=args.lr))
    order_generator = torch.Generator().manual_seed(0)
    start, step = time.perf_counter(), 0
    while step < args.steps:
        order = torch.randperm(len(train_images), generator=order_generator)
        for first in range(0, len(order) - args.batch_size + 1, args.batch_size):
            chosen = order[first:first + args.batch_size]
            outputs = protocol_step(model, optimizers, Batch(train_images[chosen], train_attrs[chosen]), step)
            step += 1
            if step % 50 == 0:
                print(step, {k: round(float(v), 4) for k, v in outputs.items()}, flush=True)
            if step == args.steps:
                break
    seconds = time.perf_counter() - start
    after = measure(model, test, out, "trained")
    print(json.dumps({"family": args.family, "config": overrides, "steps": args.steps, "s_per_step": round(seconds / args.steps, 3),
                      "before": before, "after": after}, indent=1))


if __name__ == "__main__":
    main()
