"""Does ddpm learn? A short plain-PyTorch run of the embedded config (tiny preset) on prepared
shards: held-out L_simple and the bound estimate of the EMA model before and after, and sample
grids (DDIM-50, the same noise) before and after.

    genflow data synth /tmp/sample --n 2000 && genflow data prepare --source /tmp/sample --out /tmp/shards
    python benchmarks/ddpm_learning.py --shards /tmp/shards --steps 300 --out /tmp/ddpm_learning

The protocol's training step, as the loop runs it: training_step → backward → clip → Adam step →
after_step (EMA). Held out: the first `--held-out` images of the test split (a measurement, not a
selection: nothing here is tuned on them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from genflow.models import families  # noqa: F401 (registers the family configs load_params validates)
from genflow.config import load_params
from genflow.data.loader import eval_loader, train_loader
from genflow.images import save_grid
from genflow.models.ddpm import DDPM
from genflow.models.protocol import Batch


def held_out_scores(model: DDPM, batches: list[Batch]) -> dict[str, float]:
    model.eval()
    scores = [model.evaluate(batch) for batch in batches]
    model.train()
    return {key: sum(s[key].item() for s in scores) / len(scores) for key in scores[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--held-out", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="ddpm_learning")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = DDPM(load_params().family_config("ddpm")).train()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=args.lr)
    held_out = [Batch(images, attrs) for images, attrs in
                eval_loader(args.shards, split="test", batch_size=64, image_range=model.image_range,
                            limit_batches=max(1, args.held_out // 64))]
    noise_seed = 1234

    def grid(name: str) -> None:
        model.eval()
        save_grid(model.sample(16, generator=torch.Generator().manual_seed(noise_seed)), out / name)
        model.train()

    before = held_out_scores(model, held_out)
    grid("samples_untrained.png")
    print(f"untrained: {before}", flush=True)

    loader = train_loader(args.shards, batch_size=args.batch, image_range=model.image_range, num_workers=0)
    step, start = 0, time.perf_counter()
    while step < args.steps:
        for images, attrs in loader:
            losses = model.training_step(Batch(images, attrs), step)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
            optimizer.step()
            step += 1
            model.after_step(step)
            if step % 25 == 0:
                print(f"step {step} loss {losses['loss'].item():.4f} ({(time.perf_counter() - start) / step:.2f} s/step)", flush=True)
            if step == args.steps:
                break

    after = held_out_scores(model, held_out)
    grid("samples_trained.png")
    print(f"trained ({args.steps} steps of {args.batch}): {after}")
    for key in before:
        print(f"{key:<28} untrained {before[key]:.4f}   trained {after[key]:.4f}")


if __name__ == "__main__":
    main()
