"""The one training loop, run by every Ray Train worker (rank) for every family.

It knows the model protocol (genflow/models/protocol.py), not the family: build the model from
its typed config, wrap it for DDP, stream batches, step, log from rank 0, checkpoint through
`ray.train.report` every `checkpoint_every` steps, and resume from `ray.train.get_checkpoint()`
after a worker failure or when a run of the same name is started again.
"""

from __future__ import annotations

import itertools
import math
import random
import tempfile
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import ray.train
import ray.train.torch
import torch

from genflow.config import Params, TrainParams
from genflow.images import image_grid
from genflow.models.families import get_family
from genflow.models.protocol import Batch, GenerativeModel
from genflow.train.checkpoint import restore_training_state, save_checkpoint
from genflow.track.mlflow import FAILURE_TAG, RankZeroLogger



class EpochSource(Protocol):
    """Where a rank's batches come from: the same number of (images, attrs) batches per epoch on
    every rank, and the same batches for the same epoch (so a resumed run can skip ahead)."""

    batches_per_epoch: int

    def epoch(self, index: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...


# (rank, world_size, seed, image_range) -> that rank's EpochSource. A plain function, so Ray can
# ship it to the workers: the shards by default, in-memory tensors in benchmarks and tests.
BatchSource = Callable[[int, int, int, tuple[float, float]], EpochSource]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf; raised by the driver with the step it happened at."""


def lr_lambda(train: TrainParams) -> Callable[[int], float]:
    """Linear warm-up, then constant or cosine decay to zero at max_steps."""

    def factor(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.lr_schedule == "constant":
            return 1.0
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batches_from(source: EpochSource, step: int) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """(epoch, batch) pairs forever, starting where step `step` left off (resume)."""
    epoch, skip = divmod(step, source.batches_per_epoch)
    while True:
        for batch in source.epoch(epoch):
            if skip:
                skip -= 1
                continue
            yield epoch, batch
        epoch += 1


class ShardBatches:
    """The default batch source: the prepared WebDataset shards, split by rank and loader worker."""

    def __init__(self, shards: str, train: TrainParams):
        self.shards, self.train = shards, train

    def __call__(self, rank: int, world_size: int, seed: int, image_range: tuple[float, float]) -> "_LoaderEpochs":
        from genflow.data.loader import train_loader

        loader = train_loader(
            self.shards,
            batch_size=self.train.batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=self.train.loader_workers,
            seed=seed,
            image_range=image_range,
        )
        return _LoaderEpochs(loader)


class _LoaderEpochs:
    def __init__(self, loader):
        self.loader = loader
        self.batches_per_epoch = loader.batches_per_epoch

    def epoch(self, index: int):
        self.loader.set_epoch(index)
        return iter(self.loader)


class InMemoryBatches:
    """A batch source over tensors held in memory (benchmarks, tests): rank r takes every
    world_size-th batch, in an order shuffled per epoch from the seed."""

    def __init__(self, images: torch.Tensor, attrs: torch.Tensor, batch_size: int):
        self.images, self.attrs, self.batch_size = images, attrs, batch_size

    def __call__(self, rank: int, world_size: int, seed: int, image_range: tuple[float, float]) -> "_InMemoryEpochs":
        return _InMemoryEpochs(self, rank, world_size, seed)


class _InMemoryEpochs:
    def __init__(self, data: InMemoryBatches, rank: int, world_size: int, seed: int):
        self.data, self.rank, self.world_size, self.seed = data, rank, world_size, seed
        self.batches_per_epoch = len(data.images) // (data.batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(data.images)} images make no batch of {data.batch_size} for {world_size} ranks")

    def epoch(self, index: int):
        order = torch.randperm(len(self.data.images), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + index))
        size = self.data.batch_size
        for b in range(self.batches_per_epoch):
            start = (b * self.world_size + self.rank) * size
            chosen = order[start : start + size]
            yield self.data.images[chosen], self.data.attrs[chosen]


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker. `config` is built by genflow.train.trainer."""
    family: str = config["family"]
    params = Params(**config["params"])
    train = params.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    seed_everything(train.seed + rank)

    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    model_class = get_family(family)
    model: GenerativeModel = model_class(params.family_config(family))
    if on_gpu:
        # NHWC convolutions are what tensor cores are fast at.
        model = model.to(memory_format=torch.channels_last)
    # The optimisers must hold the parameters that DDP will keep in sync, so build them first.
    optimizers = model.optimizers(train)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(train)) for o in optimizers]
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            step = restore_training_state(directory, model=model, optimizers=optimizers, schedulers=schedulers, rank=rank)
    wrapped = ray.train.torch.prepare_model(model)  # DDP when world_size > 1 (gloo on CPU, NCCL on GPU)
    # The optimiser states were loaded on the CPU; move them with the parameters.
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    state[key] = value.to(device)
    forward = torch.compile(wrapped) if train.compile else wrapped
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and train.bf16 else nullcontext()

    logger = RankZeroLogger(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else None
    if logger:
        logger.log_metrics({"train/start_step": step}, step)

    make_source: BatchSource = config["batch_source"] or ShardBatches(config["shards"], train)
    source = make_source(rank, world_size, train.seed, model.image_range)
    steps_per_epoch = source.batches_per_epoch
    # Rank 0 scores the checkpoints (its report is the one Ray Tune receives).
    held_out = held_out_batches(config, train, model.image_range) if rank == 0 else []
    batches = batches_from(source, step)
    params_to_clip = [p for p in model.parameters() if p.requires_grad]
    window_start, window_steps = time.perf_counter(), 0

    while step < train.max_steps:
        _, (images, attrs) = next(batches)
        images = images.to(device, non_blocking=True)
        if on_gpu:
            images = images.contiguous(memory_format=torch.channels_last)
        batch = Batch(images, attrs.to(device, non_blocking=True))
        with autocast:
            losses = forward(batch, step)
        loss = losses["loss"]
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # After DDP's all-reduce the gradients, and so their norm, are the same on every rank:
        # a NaN on any rank is seen by all at the same step, and all stop together
        # (no rank waits forever in a collective, no checkpoint is written).
        grad_norm = torch.nn.utils.clip_grad_norm_(params_to_clip, train.grad_clip or float("inf"))
        losses = {k: v.detach() for k, v in losses.items()}
        if not (torch.isfinite(grad_norm) and torch.isfinite(losses["loss"])):
            if logger:
                values = {k: float(v) for k, v in losses.items()}
                logger.set_tag(FAILURE_TAG, f"non-finite loss at step {step}: {values}")
            # Returning (not raising) keeps Ray from retrying a run that would fail the same way;
            # the driver reads the failure tag and raises NonFiniteLossError.
            return
        for optimizer, scheduler in zip(optimizers, schedulers):
            optimizer.step()
            scheduler.step()
        step += 1
        window_steps += 1

        if logger and (step % train.log_every == 0 or step == train.max_steps):
            elapsed = time.perf_counter() - window_start
            metrics = {f"train/{k}": float(v) for k, v in losses.items()}
            metrics["train/grad_norm"] = float(grad_norm)
            metrics["train/lr"] = schedulers[0].get_last_lr()[0]
            metrics["train/images_per_s"] = window_steps * train.batch_size * world_size / elapsed
            metrics["train/epoch"] = step / steps_per_epoch
            logger.log_metrics(metrics, step)
            window_start, window_steps = time.perf_counter(), 0
        if logger and (step % steps_per_epoch == 0 or step == train.max_steps):
            log_grids(logger, model, batch, step, train.seed)
        if step % train.checkpoint_every == 0 or step == train.max_steps:
            validation = validation_metrics(model, held_out, device, train.seed)
            if logger and validation:
                logger.log_metrics(validation, step)
            report_checkpoint(family, model, optimizers, schedulers, step, rank, {"loss": float(losses["loss"]), **validation})


def log_grids(logger: RankZeroLogger, model: GenerativeModel, batch: Batch, step: int, seed: int) -> None:
    """Sample grid (fixed noise, so grids are comparable across steps) and, where the family
    reconstructs, originals above reconstructions."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    cond = batch.attrs[:64] if model.conditional else None
    samples = model.sample(len(cond) if cond is not None else 64, cond=cond, generator=generator)
    logger.log_png(image_grid(samples, columns=8), f"samples/step_{step:07d}.png")
    reconstruct = getattr(model, "reconstruct", None)
    if reconstruct is not None:
        originals = batch.images[:8]
        with torch.no_grad():
            pair = torch.cat([model.to_uint8(originals), reconstruct(originals)])
        logger.log_png(image_grid(pair, columns=len(originals)), f"reconstructions/step_{step:07d}.png")
    model.train(was_training)


def held_out_batches(config: dict[str, Any], train: TrainParams, image_range: tuple[float, float]) -> list:
    """The first `train.validation_batches` batches of the test split (of config["validation_source"]
    in benchmarks and tests), the same ones at every checkpoint."""
    if not train.validation_batches:
        return []
    if config.get("validation_source") is not None:
        epochs = config["validation_source"](0, 1, train.seed, image_range)
        return list(itertools.islice(epochs.epoch(0), train.validation_batches))
    if config.get("batch_source") is not None:
        return []  # in-memory training data and no held-out source: nothing to score
    from genflow.data.loader import eval_loader

    return list(eval_loader(config["shards"], batch_size=train.batch_size, image_range=image_range,
                            limit_batches=train.validation_batches))


@torch.no_grad()
def validation_metrics(model: GenerativeModel, batches: list, device: torch.device, seed: int) -> dict[str, float]:
    """`model.evaluate` averaged over held-out batches, as val/NAME: what a search compares across
    trials (the training loss is not comparable across, e.g., KL weights). Its noise comes from a
    fixed seed, apart from training's random stream, so every checkpoint is scored alike."""
    if not batches:
        return {}
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for images, attrs in batches:
            for name, value in model.evaluate(Batch(images.to(device), attrs.to(device))).items():
                totals[name] = totals.get(name, 0.0) + float(value)
    model.train(was_training)
    return {f"val/{name}": total / len(batches) for name, total in totals.items()}


def report_checkpoint(family, model, optimizers, schedulers, step: int, rank: int, metrics: dict[str, float]) -> None:
    # Every rank reports (a barrier, and the same number of calls on every rank, as Ray requires);
    # each writes its part, Ray merges the directories.
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, family=family, model=model, optimizers=optimizers, schedulers=schedulers, step=step, rank=rank)
        ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(directory))
