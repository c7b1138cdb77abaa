"""Steps/s of genflow's Ray Train loop (1 worker) against a bare PyTorch loop, same VAE, batch and
in-memory data, measured in one run (this machine is shared: only the ratio means something).

    python benchmarks/train_overhead.py [--steps 120] [--batch 32]

Both run with one CPU thread (the Ray worker gets cpus_per_worker=1 and Ray sets its thread
count to match). genflow's figure is its own logged train/images_per_s over the windows after
the first (which holds start-up and warm-up); the bare loop is timed after the same warm-up.
Target: >= 0.9x.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import mlflow
import torch

from genflow.config import load_params
from genflow.models.vae import VAE
from genflow.models.protocol import Batch
from genflow.train.loop import InMemoryBatches
from genflow.train.trainer import train


def bare_loop(params, images, attrs, steps: int, warmup: int) -> float:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = VAE(params.family_config("vae"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.lr)
    batch_size = params.train.batch_size
    n = len(images)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        index = torch.randint(0, n, (batch_size,))
        losses = model.training_step(Batch(images[index], attrs[index]), step)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
    return steps / (time.perf_counter() - start)


def genflow_loop(params, images, attrs) -> float:
    result = train("vae", params, batch_source=InMemoryBatches(images, attrs, params.train.batch_size), dataset_digest="benchmark")
    history = mlflow.MlflowClient().get_metric_history(result.mlflow_run_id, "train/images_per_s")
    windows = [m.value for m in sorted(history, key=lambda m: m.step)][1:]
    return statistics.median(windows) / params.train.batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        params = load_params("params.yaml", [
            "train.workers=1", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
            f"train.checkpoint_every={args.steps}", "train.log_every=10", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            f"train.storage_path={tmp}/ray", "train.lr_schedule=constant", "train.grad_clip=0",
        ])
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(1024, 3, 64, 64, generator=generator)
        attrs = (torch.rand(1024, 40, generator=generator) > 0.5).float()
        genflow_rate = genflow_loop(params, images, attrs)
        bare_rate = bare_loop(params, images, attrs, steps=args.steps - 10, warmup=10)
    print(f"VAE {params.family_config('vae').hidden_channels}, batch {args.batch}, 1 worker, 1 thread, CPU")
    print(f"{'loop':<32}{'steps/s':>10}{'ratio':>8}")
    print(f"{'bare PyTorch':<32}{bare_rate:>10.2f}{1.0:>8.2f}")
    print(f"{'genflow (Ray Train, 1 worker)':<32}{genflow_rate:>10.2f}{genflow_rate / bare_rate:>8.2f}   target >= 0.90")


if __name__ == "__main__":
    main()
