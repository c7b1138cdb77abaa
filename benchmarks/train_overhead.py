"""Steps/s of genflow's Ray Train loop (1 worker) against a bare PyTorch loop of the same step, for
a one-optimizer family (the VAE) and a two-optimizer one (the toy GAN of the contract test, D and
G each trained by its own loss), and the time rank 0 spends on its own work (logging, grids) in a
2-worker run at the default log_every, all measured in one run (this machine is shared: only the
ratios mean something).

    python benchmarks/train_overhead.py [--steps 120] [--batch 32]

Both loops run with one CPU thread (the Ray worker gets cpus_per_worker=1 and Ray sets its thread
count to match). genflow's figure is its own logged train/images_per_s over the windows after
the first (which holds start-up and warm-up); the bare loop is timed after the same warm-up.
Rank 0's share is the mean of its logged train/rank0_overhead: the seconds it spent logging and drawing grids
per second of training, which every other rank waits for at the next all-reduce.
Targets: loop >= 0.9x bare; rank 0's own work < 5% of the step time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the toy GAN lives with the tests

from genflow.config import load_params  # noqa: E402
from genflow.models import families  # noqa: E402
from genflow.models.protocol import Batch  # noqa: E402
from genflow.models.vae import VAE  # noqa: E402
from genflow.train.loop import InMemoryBatches  # noqa: E402
from genflow.train.trainer import train  # noqa: E402
from tests.models.test_protocol import ToyGAN, ToyGANConfig  # noqa: E402



class BenchGANConfig(ToyGANConfig):
    latent_dim: int = 64
    hidden: int = 512


class BenchGAN(ToyGAN):
    """The contract test's toy GAN, wider, so that a step is work rather than call overhead."""

    config_class = BenchGANConfig


GAN_CONFIG = BenchGANConfig()


def bare_vae_step(params):
    model = VAE(params.family_config("vae"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.train.lr)

    def step(batch: Batch, index: int) -> None:
        losses = model.training_step(batch, index)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()

    return step


def bare_gan_step(params):
    model = BenchGAN(GAN_CONFIG)
    generator = torch.optim.AdamW(model.generator.parameters(), lr=params.train.lr, betas=(0.5, 0.999))
    discriminator = torch.optim.AdamW(model.discriminator.parameters(), lr=params.train.lr, betas=(0.5, 0.999))

    def step(batch: Batch, index: int) -> None:
        losses = model.training_step(batch, index)
        generator.zero_grad(set_to_none=True)
        discriminator.zero_grad(set_to_none=True)
        losses["loss/generator"].backward(inputs=list(model.generator.parameters()), retain_graph=True)
        losses["loss/discriminator"].backward(inputs=list(model.discriminator.parameters()))
        generator.step()
        discriminator.step()

    return step


def bare_rate(step, params, images, attrs, steps: int, warmup: int) -> float:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batch_size, n = params.train.batch_size, len(images)
    start = None
    for index in range(warmup + steps):
        if index == warmup:
            start = time.perf_counter()
        chosen = torch.randint(0, n, (batch_size,))
        step(Batch(images[chosen], attrs[chosen]), index)
    return steps / (time.perf_counter() - start)


def genflow_run(family, params, images, attrs) -> tuple[float, float]:
    """(steps/s per worker, rank 0's median share of time on its own work)."""
    result = train(family, params, batch_source=InMemoryBatches(images, attrs, params.train.batch_size),
                   dataset_digest="benchmark")
    client = mlflow.MlflowClient()

    def windows(key):
        return [m.value for m in sorted(client.get_metric_history(result.mlflow_run_id, key), key=lambda m: m.step)][1:]

    rate = statistics.median(windows("train/images_per_s")) / (params.train.batch_size * params.train.workers)
    # The mean, not the median: the windows with a grid are few and belong in the figure.
    return rate, statistics.mean(windows("train/rank0_overhead"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    families._FAMILIES["toy-gan"] = f"{__name__}:BenchGAN"  # the driver's table; workers get the class
    with tempfile.TemporaryDirectory() as tmp:
        def params(*overrides):
            return load_params("params.yaml", [
                "train.workers=1", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
                f"train.checkpoint_every={args.steps}", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                f"train.storage_path={tmp}/ray", "train.lr_schedule=constant", "train.grad_clip=0", *overrides,
            ])

        generator = torch.Generator().manual_seed(0)
        images = torch.rand(1024, 3, 64, 64, generator=generator)
        attrs = (torch.rand(1024, 40, generator=generator) > 0.5).float()
        vae = params("train.run_name=vae-1")
        gan = params("train.run_name=gan-1")
        warmup = 10
        rows = []
        for label, family, run_params, bare_step in (("VAE", "vae", vae, bare_vae_step),
                                                     ("toy GAN (2 optimizers)", "toy-gan", gan, bare_gan_step)):
            loop_rate, _ = genflow_run(family, run_params, images, attrs)
            bare = bare_rate(bare_step(run_params), run_params, images, attrs, steps=args.steps - warmup, warmup=warmup)
            rows.append((label, bare, loop_rate))
        # The default log_every and grid_every, 2 workers.
        two = params("train.workers=2", "train.log_every=10", "train.grid_every=100", "train.run_name=vae-2",
                     "train.grad_clip=1.0")
        two_rate, rank0_share = genflow_run("vae", two, images, attrs)

    print(f"batch {args.batch} per worker, 1 thread per worker, CPU; VAE {vae.family_config('vae').hidden_channels}, "
          f"toy GAN hidden {GAN_CONFIG.hidden}")
    print(f"{'step':<26}{'bare steps/s':>14}{'genflow steps/s':>17}{'ratio':>8}")
    for label, bare, loop_rate in rows:
        print(f"{label:<26}{bare:>14.2f}{loop_rate:>17.2f}{loop_rate / bare:>8.2f}   target >= 0.90")
    print(f"2 workers, VAE, log_every 10, grid_every 100: {two_rate:.2f} steps/s; rank 0's own work "
          f"(logging, grids) {100 * rank0_share:.3f}% of the step time   target < 5%")


if __name__ == "__main__":
    main()
