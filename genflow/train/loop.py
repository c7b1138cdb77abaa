"""The one training loop, run by every Ray Train worker (rank) for every family.

It knows the model protocol (genflow/models/protocol.py), not the family. Per rank:

    setup             the model on its device; on a fresh run `initialize` on every rank's first
                      batch gathered, on resume the checkpoint's weights, optimisers and this
                      rank's RNG and training state; the optimisers built on the device; DDP
    optimisation_step one forward, each named loss back-propagated into its own optimizer's
                      parameters, per-optimizer clipping, one collective non-finite decision,
                      the optimisers that have a loss step, `after_step`
    checkpoint        validation on the held-out split (shared by the ranks), then every rank
                      writes its part and reports through `ray.train.report`

Rank 0 alone logs (on a background thread, genflow.track.mlflow.RankZeroLogger), draws the
sample grids (every `train.grid_every` steps; MLflow step-keyed images `samples`, `reconstructions`)
and, under `genflow train`, prints a progress line every `train.log_every` steps. The local rank 0
of each node samples the node's system metrics into the same run (genflow/track/system_metrics.py). Nothing here
draws from the global RNGs except the model itself, and those RNGs are saved per rank: a resumed run repeats an uninterrupted one
exactly (on CPU).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import math
import os
import random
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator, Protocol

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from genflow.config import StrictModel, TrainParams
from genflow.images import image_grid
from genflow.models.protocol import Batch, GenerativeModel
from genflow.train.step import Optimization, ddp_options, distributed, gather_batch, optimisation_step
from genflow.train.checkpoint import restore_model, restore_optimizers, restore_rank_state, save_checkpoint
from genflow.track.mlflow import FAILURE_TAG, RankZeroLogger, check_credentials
from genflow.track.system_metrics import held_gpus, node_id, node_system_metrics


class EpochSource(Protocol):
    """Where a rank's batches come from: the same number of (images, attrs) batches per epoch on
    every rank, and the same batches for the same epoch (so a resumed run can skip ahead).
    `batches_per_epoch` counts the batches that reach a training step (see `batches_from`)."""

    batches_per_epoch: int

    def epoch(self, index: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]: ...


# (rank, world_size, seed, image_range) -> that rank's EpochSource. A plain function, so Ray can
# ship it to the workers: the shards by default, in-memory tensors in benchmarks and tests.
BatchSource = Callable[[int, int, int, tuple[float, float]], EpochSource]


@dataclass(frozen=True)
class WorkerConfig:
    """What every rank needs, built by the driver (genflow.train.trainer.torch_trainer).

    The driver resolves the family to its class and validated config, so a worker never reads
    params by name and never needs the family table.
    """

    family: str
    model_class: type[GenerativeModel]
    model_config: StrictModel
    train: TrainParams
    shards: str
    tracking_uri: str
    mlflow_run_id: str
    batch_source: BatchSource | None = None  # None: the shards' train split
    validation_source: BatchSource | None = None  # None: the shards' validation split (with no batch_source)
    progress: bool = False  # rank 0 prints a progress line every log_every steps (`genflow train`; Tune has its own)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf; raised by the driver with the step it happened at."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A seed for one (seed, epoch, rank, ...) combination, independent of the others."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --- batches --------------------------------------------------------------------------------------


def batches_from(source: EpochSource, step: int) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """(epoch, batch) pairs forever, starting where step `step` left off (resume).

    A batch of a single image never reaches a training step (a short last batch can be one: its
    per-batch statistics, a fitted Gaussian, a minibatch feature, are undefined): it is dropped,
    and sources count only the batches they train on. Every rank's loader has the same batch
    sizes, so every rank drops alike.
    """
    epoch, skip = divmod(step, source.batches_per_epoch)
    while True:
        trained = 0
        for batch in source.epoch(epoch):
            if len(batch[0]) < 2:
                continue
            trained += 1
            if skip:
                skip -= 1
                continue
            yield epoch, batch
        if trained != source.batches_per_epoch:
            raise RuntimeError(f"epoch {epoch} gave {trained} training batches, its source promised "
                               f"{source.batches_per_epoch}: a resumed run would start at the wrong batch")
        epoch += 1


class ShardBatches:
    """The default batch source: the prepared WebDataset shards, split by rank and loader worker."""

    def __init__(self, shards: str, train: TrainParams):
        self.shards, self.train = shards, train

    def __call__(self, rank: int, world_size: int, seed: int, image_range: tuple[float, float]) -> "LoaderEpochs":
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
        return LoaderEpochs(loader, seed, rank)


class LoaderEpochs:
    """A train loader's epochs. Each epoch's DataLoader gets its own generator from (seed, epoch,
    rank): a DataLoader without one draws its workers' base seed from the global torch RNG when
    it starts, which would shift the model's noise on every epoch start and resume."""

    def __init__(self, loader, seed: int, rank: int):
        self.loader, self.seed, self.rank = loader, seed, rank
        # train_loader yields whole batches only (a rank's remainder is left out of the epoch), so
        # no batch is short, let alone a single image: every batch it promises is trained on.
        self.batches_per_epoch = loader.batches_per_epoch

    def epoch(self, index: int):
        self.loader.set_epoch(index)
        self.loader.generator = torch.Generator().manual_seed(derived_seed(self.seed, index, self.rank))
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


# --- one rank's run -------------------------------------------------------------------------------


@dataclass
class RankRun:
    """What `setup` gives one rank to train with."""

    model: GenerativeModel
    forward: Callable[[Batch, int], dict[str, torch.Tensor]]  # DDP-wrapped (and compiled) model
    optimization: Optimization
    step: int  # steps completed
    batches: Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]
    batches_per_epoch: int
    device: torch.device
    autocast: ContextManager
    channels_last: bool  # the model's and the batches' memory format (bf16 on a GPU)


def train_worker(config: WorkerConfig) -> None:
    """Ray Train's train_loop_per_worker (bound to its config by genflow.train.trainer): this
    rank's training, while the local rank 0 of each node samples the node's system metrics."""
    context = ray.train.get_context()
    check_credentials(f"Ray Train worker {context.get_world_rank()} on {socket.gethostname()}")
    every = config.train.system_metrics_every if context.get_local_rank() == 0 else 0
    gpus = held_gpus(config.train.gpu, os.environ.get("CUDA_VISIBLE_DEVICES"))
    with node_system_metrics(config.tracking_uri, config.mlflow_run_id, node_id(context.get_node_rank()), every, gpus):
        train_rank(config, context.get_world_rank(), context.get_world_size())


def train_rank(config: WorkerConfig, rank: int, world_size: int) -> None:
    """One rank's run: set up (fresh or resumed), train to max_steps, checkpoint on the way."""
    train = config.train
    run = setup(config, rank, world_size)
    logger = RankZeroLogger(config.tracking_uri, config.mlflow_run_id) if rank == 0 else None
    try:
        if logger:
            logger.log_metrics({"train/start_step": run.step}, run.step)
        held_out = held_out_batches(config, run.model.image_range)
        monitored = torch.tensor(float("nan"))
        window_start, window_steps, rank0_seconds = time.perf_counter(), 0, 0.0
        while run.step < train.max_steps:
            _, (images, attrs) = next(run.batches)
            batch = to_device(images, attrs, run.device, run.channels_last)
            # The learning rates this step trains with (the schedules move on inside the step).
            step_lrs = {name: scheduler.get_last_lr()[0] for name, scheduler in run.optimization.schedulers.items()}
            result = optimisation_step(run.forward, run.model, run.optimization, batch, run.step,
                                       grad_clip=train.grad_clip, autocast=run.autocast)
            if not result.finite:
                if logger:
                    values = {k: float(v) for k, v in result.outputs.items()}
                    norms = {k: float(v) for k, v in result.grad_norms.items()}
                    logger.set_tag(FAILURE_TAG, f"non-finite loss at step {run.step} (on some rank): rank 0 saw "
                                                f"{values}, gradient norms {norms}")
                # Every rank returns here at the same step (the decision is collective). Returning,
                # not raising, keeps Ray from retrying a run that would fail the same way; the
                # driver reads the failure tag and raises NonFiniteLossError.
                return
            run.step += 1
            window_steps += 1
            monitored = result.outputs.get(run.model.monitor, monitored)

            if logger:
                started = time.perf_counter()
                if run.step % train.log_every == 0 or run.step == train.max_steps:
                    elapsed = started - window_start
                    metrics: dict[str, Any] = {f"train/{k}": v for k, v in result.outputs.items()}
                    for name, norm in result.grad_norms.items():
                        metrics["train/grad_norm" if name == "main" else f"train/grad_norm/{name}"] = norm
                    for name, lr in step_lrs.items():
                        metrics["train/lr" if name == "main" else f"train/lr/{name}"] = lr
                    images_per_s = window_steps * train.batch_size * world_size / elapsed
                    metrics["train/images_per_s"] = images_per_s
                    metrics["train/epoch"] = run.step / run.batches_per_epoch
                    # The share of the window rank 0 spent on its own work (logging, grids), which
                    # every other rank waits for at the next all-reduce.
                    metrics["train/rank0_overhead"] = rank0_seconds / elapsed
                    logger.log_metrics(metrics, run.step)
                    if config.progress:
                        seconds_per_step = elapsed / window_steps
                        logger.say(functools.partial(progress_line, config.family, run.step, train.max_steps,
                                                     run.model.monitor, monitored, images_per_s,
                                                     (train.max_steps - run.step) * seconds_per_step))
                    window_start, window_steps, rank0_seconds = time.perf_counter(), 0, 0.0
                if (train.grid_every and run.step % train.grid_every == 0) or run.step == train.max_steps:
                    log_grids(logger, run.model, batch, run.step, train)
                rank0_seconds += time.perf_counter() - started
            if run.step % train.checkpoint_every == 0 or run.step == train.max_steps:
                checkpoint(config, run, rank, world_size, held_out, monitored, logger)
    finally:
        if logger:
            logger.close()


def progress_line(family: str, step: int, max_steps: int, monitor: str, loss: torch.Tensor | float,
                  images_per_s: float, eta_seconds: float) -> str:
    """`vae step 120/300 (40%)  loss 0.5321  2,310 images/s  ETA 1m18s`: what `genflow train`
    prints every log_every steps (the ETA at the last window's rate)."""
    minutes, seconds = divmod(round(eta_seconds), 60)
    hours, minutes = divmod(minutes, 60)
    eta = f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
    return (f"{family} step {step}/{max_steps} ({100 * step // max_steps}%)  {monitor} {float(loss):.4g}  "
            f"{images_per_s:,.0f} images/s  ETA {eta}")


def setup(config: WorkerConfig, rank: int, world_size: int) -> RankRun:
    """The model on this rank's device, fresh or resumed, wrapped for DDP; its optimisers; its batches."""
    train = config.train
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(train.seed)  # the same initial weights on every rank, before `initialize`
    model = config.model_class(config.model_config).to(device)
    # NHWC is what bf16 tensor-core convolutions want; in fp32 the default layout measured faster
    # (README, "On one GPU"), so train.bf16 = false on a GPU is plain fp32.
    channels_last = on_gpu and train.bf16
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    seed_everything(derived_seed(train.seed, rank))  # each rank its own noise
    make_source = config.batch_source or ShardBatches(config.shards, train)
    source = make_source(rank, world_size, train.seed, model.image_range)

    resume_from = ray.train.get_checkpoint()
    if resume_from:
        with resume_from.as_directory() as directory:
            restore_model(directory, model)
            optimization = Optimization.build(model, train)
            step = restore_optimizers(directory, optimization.optimizers, optimization.schedulers)
            restore_rank_state(directory, model, rank)
        batches = batches_from(source, step)
    else:
        step, batches = 0, batches_from(source, 0)
        first = next(batches)
        model.initialize(gather_batch(to_device(*first[1], device, channels_last)))
        batches = itertools.chain([first], batches)
        optimization = Optimization.build(model, train)
    # DDP when world_size > 1 (gloo on CPU, NCCL on GPU); it broadcasts rank 0's weights.
    wrapped = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_options(model))
    return RankRun(
        model=model,
        forward=torch.compile(wrapped) if train.compile else wrapped,
        optimization=optimization,
        step=step,
        batches=batches,
        batches_per_epoch=source.batches_per_epoch,
        device=device,
        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu and train.bf16 else contextlib.nullcontext(),
        channels_last=channels_last,
    )


def to_device(images: torch.Tensor, attrs: torch.Tensor, device: torch.device, channels_last: bool = False) -> Batch:
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return Batch(images, attrs.to(device, non_blocking=True))


# --- checkpoints, validation, grids ---------------------------------------------------------------


def checkpoint(config: WorkerConfig, run: RankRun, rank: int, world_size: int, held_out: list,
               monitored: torch.Tensor, logger: RankZeroLogger | None) -> None:
    """Score the held-out batches, then every rank writes its part of the checkpoint and reports.

    Every rank reports (a barrier, and the same number of calls on every rank, as Ray requires);
    Ray merges the ranks' directories. Rank 0's report, the one Ray Tune receives, carries the
    family's monitored loss and the validation metrics.
    """
    validation = validation_metrics(run.model, held_out, run.device, config.train.seed, rank, world_size)
    if config.train.validation_fd:
        validation.update(validation_fd(run.model, held_out, run.device, config.train.seed, rank, world_size))
    if logger:
        if validation:
            logger.log_metrics(validation, run.step)
        logger.flush()  # what was logged up to the checkpoint is in MLflow when Ray records it
    metrics = {"step": run.step, run.model.monitor: float(monitored), **validation}
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, family=config.family, model=run.model, optimizers=run.optimization.optimizers,
                        schedulers=run.optimization.schedulers, step=run.step, rank=rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def held_out_batches(config: WorkerConfig, image_range: tuple[float, float]) -> list:
    """The first `train.validation_batches` batches of the validation split (of
    config.validation_source in benchmarks and tests), the same ones at every checkpoint."""
    train = config.train
    if not train.validation_batches:
        return []
    if config.validation_source is not None:
        epochs = config.validation_source(0, 1, train.seed, image_range)
        return list(itertools.islice(epochs.epoch(0), train.validation_batches))
    if config.batch_source is not None:
        return []  # in-memory training data and no held-out source: nothing to score
    from genflow.data.loader import eval_loader

    loader = eval_loader(config.shards, split="validation", batch_size=train.batch_size, image_range=image_range,
                         limit_batches=train.validation_batches)
    loader.generator = torch.Generator().manual_seed(train.seed)  # not the global RNG (see LoaderEpochs)
    return list(loader)


@torch.no_grad()
def validation_metrics(model: GenerativeModel, batches: list, device: torch.device, seed: int,
                       rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """`model.evaluate` averaged over the held-out batches, as val/NAME: what a search compares
    across trials (the training loss is not comparable across, e.g., KL weights).

    The ranks share the batches (rank r scores batches r, r + world_size, ...) and gather the
    sums, so no rank idles while another scores. Batch i's noise comes from (seed, i) and is
    forked off training's random stream: every checkpoint, whatever the number of ranks, is
    scored alike, and scoring does not change the training that follows.
    """
    if not batches:
        return {}
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(rank, len(batches), world_size):
            torch.manual_seed(derived_seed(seed, i))
            images, attrs = batches[i]
            for name, value in model.evaluate(Batch(images.to(device), attrs.to(device))).items():
                totals[name] = totals.get(name, 0.0) + float(value)
    model.train(was_training)
    if distributed():
        every_rank: list[dict[str, float]] = [{} for _ in range(world_size)]
        dist.all_gather_object(every_rank, totals)
        totals = {name: sum(t.get(name, 0.0) for t in every_rank) for name in set().union(*every_rank)}
    return {f"val/{name}": total / len(batches) for name, total in sorted(totals.items())}


@torch.no_grad()
def validation_fd(model: GenerativeModel, batches: list, device: torch.device, seed: int,
                  rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """val/fd_effnet: the Fréchet distance between the validation images and as many samples
    (conditional families: given each image's attributes), on the evaluation's default features
    (EfficientNet-Lite0, genflow/eval). What a search over sample quality compares: a VAE's ELBO
    alone always prefers the smallest KL weight on offer.

    With a few batches' worth of images (fewer than the 1280 feature dimensions) the estimate is
    biased upwards; it ranks runs scored on the same number of images, and is not the figure
    `evaluate` reports on evaluate.samples images. Shared by the ranks as validation_metrics is;
    batch i's samples come from (seed, i), so the result does not depend on the number of ranks.
    """
    from genflow.eval.distances import FeatureStats, frechet_distance

    if len(batches) == 0:
        return {}
    was_training = model.training
    model.eval()
    real, fake = [], []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # Inside the fork: building the network draws its initial weights from the global RNG
        # before the ImageNet weights replace them.
        extractor = _fd_extractor(device)
        for i in range(rank, len(batches), world_size):
            images, attrs = batches[i]
            torch.manual_seed(derived_seed(seed, i, 1))  # for a family that draws outside its generator
            generator = torch.Generator(device).manual_seed(derived_seed(seed, i, 1))
            cond = attrs.to(device) if model.conditional else None
            real.append(extractor(model.to_uint8(images)))
            fake.append(extractor(model.sample(len(images), cond=cond, generator=generator)))
    model.train(was_training)
    if distributed():
        gathered: list[tuple[list, list]] = [([], []) for _ in range(world_size)]
        dist.all_gather_object(gathered, (real, fake))
        real = [f for r, _ in gathered for f in r]
        fake = [f for _, g in gathered for f in g]
    stats = []
    for features in (real, fake):
        moments = FeatureStats(extractor.dim, keep=0)
        moments.update(torch.cat(features))
        stats.append(moments)
    return {"val/fd_effnet": frechet_distance(stats[0].mu, stats[0].sigma, stats[1].mu, stats[1].sigma)}


_EXTRACTORS: dict[str, Any] = {}


def _fd_extractor(device: torch.device):
    """The EfficientNet once per process and device (loading it costs more than one scoring)."""
    from genflow.eval.features import load_extractor

    if str(device) not in _EXTRACTORS:
        _EXTRACTORS[str(device)] = load_extractor("imagenet", None, device)
    return _EXTRACTORS[str(device)]


def log_grids(logger: RankZeroLogger, model: GenerativeModel, batch: Batch, step: int, train: TrainParams) -> None:
    """Sample grid (fixed noise, so grids are comparable across steps) and, where the family
    reconstructs, originals above reconstructions. Forked off training's random stream, so how
    often grids are drawn does not change training."""
    was_training = model.training
    model.eval()
    device = model.device()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(train.seed)
        generator = torch.Generator(device).manual_seed(train.seed)
        n = train.grid_size
        cond = batch.attrs[torch.arange(n, device=device) % len(batch.attrs)] if model.conditional else None
        samples = model.sample(n, cond=cond, generator=generator)
        logger.log_image(image_grid(samples, columns=math.ceil(math.sqrt(n))), "samples", step)
        originals = batch.images[:8]
        reconstructions = model.reconstruct(originals)
        if reconstructions is not None:
            pair = torch.cat([model.to_uint8(originals), reconstructions])
            logger.log_image(image_grid(pair, columns=len(originals)), "reconstructions", step)
    model.train(was_training)
