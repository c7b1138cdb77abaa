"""The worker loop's pieces that need no Ray: LR schedule, resume position, batch sources, short
batches, the loader's RNG, the collective non-finite stop on 2 gloo ranks, and val/fd_effnet."""

import datetime
import itertools
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from genflow.config import TrainParams
from genflow.eval.features import load_extractor
from genflow.models.protocol import Batch, GenerativeModel
from genflow.models.vae import VAE
from genflow.train import loop
from genflow.train.loop import InMemoryBatches, ShardBatches, batches_from, derived_seed, progress_line, validation_fd
from genflow.train.step import Optimization, gather_batch, lr_lambda, optimisation_step
from tests.models.tiny import TINY_CONFIGS


def test_cosine_schedule_warms_up_then_decays_to_zero():
    factor = lr_lambda(TrainParams(max_steps=110, warmup_steps=10, lr_schedule="cosine"))
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.5)
    assert factor(110) == pytest.approx(0.0, abs=1e-12)
    assert math.isclose(lr_lambda(TrainParams(lr_schedule="constant"))(500), 1.0)


def test_in_memory_batches_split_ranks_disjointly_and_equally():
    images = torch.arange(40).float().view(40, 1, 1, 1).expand(40, 3, 2, 2)
    data = InMemoryBatches(images, torch.zeros(40, 40), batch_size=4)
    ranks = [data(rank, 3, seed=7, image_range=(0, 1)) for rank in range(3)]
    assert {r.batches_per_epoch for r in ranks} == {3}  # 40 // (4*3): the remainder is dropped alike on all
    seen = [int(x[0, 0, 0]) for r in ranks for b, _ in r.epoch(0) for x in b]
    assert len(seen) == len(set(seen)) == 36
    # The combined batch of one rank of twice the size is the ranks' batches side by side.
    two = [data(rank, 2, seed=7, image_range=(0, 1)) for rank in range(2)]
    one = InMemoryBatches(images, torch.zeros(40, 40), batch_size=8)(0, 1, seed=7, image_range=(0, 1))
    for (first, _), (second, _), (combined, _) in zip(two[0].epoch(1), two[1].epoch(1), one.epoch(1)):
        assert torch.equal(torch.cat([first, second]), combined)


def test_resume_position_skips_to_the_same_batch():
    images = torch.arange(64).float().view(64, 1, 1, 1)
    source = InMemoryBatches(images, torch.zeros(64, 40), batch_size=8)(0, 1, seed=0, image_range=(0, 1))
    straight = batches_from(source, 0)
    run = [next(straight) for _ in range(13)]
    resumed = batches_from(source, 11)
    for expected in run[11:]:
        epoch, (batch, _) = next(resumed)
        assert epoch == expected[0] == 1
        assert torch.equal(batch, expected[1][0])


# --- short batches, loader RNG ------------------------------------------------------------------


class ListEpochs:
    """An epoch source over fixed batch sizes (the same every epoch)."""

    def __init__(self, sizes, batches_per_epoch):
        self.sizes, self.batches_per_epoch = sizes, batches_per_epoch

    def epoch(self, index):
        for i, size in enumerate(self.sizes):
            yield torch.full((size, 3, 2, 2), float(index * 100 + i)), torch.zeros(size, 40)


def test_short_batch_single_image_never_reaches_a_training_step_and_resume_counts_without_it():
    source = ListEpochs([4, 4, 1], batches_per_epoch=2)
    straight = [(epoch, int(images[0, 0, 0, 0])) for epoch, (images, _) in itertools.islice(batches_from(source, 0), 6)]
    assert straight == [(0, 0), (0, 1), (1, 100), (1, 101), (2, 200), (2, 201)]
    resumed = [(epoch, int(images[0, 0, 0, 0])) for epoch, (images, _) in itertools.islice(batches_from(source, 3), 3)]
    assert resumed == straight[3:]


def test_a_source_that_miscounts_its_batches_is_an_error_not_a_silent_resume_shift():
    with pytest.raises(RuntimeError, match="promised 3"):
        list(itertools.islice(batches_from(ListEpochs([4, 4, 1], batches_per_epoch=3), 0), 5))


def test_shard_epochs_drop_a_last_batch_of_one_image(shards):
    # 70 train images minus the 7 held out for validation = 63 = 2 * 31 + 1: the loader's third
    # batch would be a single image.
    source = ShardBatches(str(shards), TrainParams(batch_size=31, loader_workers=0))(0, 1, 0, (0.0, 1.0))
    assert source.batches_per_epoch == 2
    sizes = [len(images) for _, (images, _) in itertools.islice(batches_from(source, 0), 6)]
    assert sizes == [31] * 6


def test_starting_an_epoch_draws_nothing_from_the_global_torch_rng(shards):
    # A DataLoader without its own generator draws its workers' base seed from the global RNG
    # when an epoch starts: the model's noise then depends on where a run was resumed.
    source = ShardBatches(str(shards), TrainParams(batch_size=8, loader_workers=1))(1, 2, 0, (0.0, 1.0))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = next(iter(source.epoch(3)))
    assert torch.equal(torch.get_rng_state(), before)
    again = next(iter(source.epoch(3)))
    assert torch.equal(first[0], again[0])


# --- the collective non-finite decision ---------------------------------------------------------


class NaNOnRankOne(GenerativeModel):
    """A one-parameter model whose reported loss is NaN on rank 1 from step 1 on, while its
    gradient stays finite (the NaN is a constant term, as a loss term that overflowed in a
    quantity with no gradient): the all-reduced gradients alone would never show it."""

    config_class = TrainParams  # any StrictModel; the model has no hyperparameters
    primary_metric = "loss"

    def __init__(self, config):
        super().__init__(config)
        self.weight = torch.nn.Parameter(torch.ones(()))

    def training_step(self, batch, step):
        loss = (self.weight * batch.images.mean() - 1).square()
        if dist.get_rank() == 1 and step >= 1:
            loss = loss + float("nan")
        return {"loss": loss}


def _two_ranks(rank, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    model = NaNOnRankOne(TrainParams())
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimization = Optimization.build(model, TrainParams(lr_schedule="constant"))
    batch = Batch(torch.rand(2, 3, 4, 4), torch.zeros(2, 40))
    finite = [optimisation_step(wrapped, model, optimization, batch, step, grad_clip=1.0).finite for step in range(3)]
    # A further collective: had the ranks decided apart, one would be waiting here for the other.
    dist.barrier()
    gathered = gather_batch(Batch(torch.full((2, 1), float(rank)), torch.full((2, 40), float(rank))))
    fd = validation_fd(tiny_vae(), validation_images(), torch.device("cpu"), seed=0, rank=rank, world_size=2)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "finite": finite, "weight": model.weight.item(), "fd": fd,
        "gathered": gathered.images.flatten().tolist(), "gathered_attrs": gathered.attrs[:, 0].tolist(),
    }))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What each of 2 spawned gloo ranks saw (spawned once for the tests below)."""
    folder = tmp_path_factory.mktemp("two-ranks")
    context = mp.start_processes(_two_ranks, args=(str(folder / "store"), str(folder)), nprocs=2,
                                 join=False, start_method="spawn")
    # Generous: each rank also loads EfficientNet and scores val/fd_effnet (a minute on a loaded CPU).
    deadline = time.monotonic() + 400
    try:
        while not context.join(timeout=2):
            assert time.monotonic() < deadline, "a rank hung: a collective (the non-finite decision, the FD's gather) was not"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_non_finite_loss_on_one_rank_only_stops_every_rank_at_the_same_step(two_ranks):
    assert two_ranks[0]["finite"] == two_ranks[1]["finite"] == [True, False, False]
    assert two_ranks[0]["weight"] == two_ranks[1]["weight"]  # no optimizer stepped on the NaN step, on either rank


def test_every_rank_initialises_on_the_same_gathered_batch(two_ranks):
    for rank in two_ranks:
        assert rank["gathered"] == [0.0, 0.0, 1.0, 1.0] and rank["gathered_attrs"] == [0.0, 0.0, 1.0, 1.0]


# --- val/fd_effnet ---------------------------------------------------------------------------------


def tiny_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(VAE.config_class(**TINY_CONFIGS["vae"]))


def validation_images() -> list:
    """Three held-out batches (an odd count: 2 ranks share them unevenly), pixels k/255."""
    generator = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 256, (4, 3, 64, 64), generator=generator).float() / 255, torch.zeros(4, 40)) for _ in range(3)]


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # sqrtm of a rank-deficient product: the reference
def test_validation_fd_is_the_frechet_distance_of_the_validation_images_and_as_many_samples(monkeypatch):
    model = tiny_vae()
    batches = validation_images()
    monkeypatch.setattr(loop, "_EXTRACTORS", {})  # the first scoring in a process also builds the network
    before = torch.get_rng_state()
    got = validation_fd(model, batches, torch.device("cpu"), seed=0)["val/fd_effnet"]
    # Forked off training's random stream, network building included: a run scored at its
    # checkpoints trains as one that is not (a search's trials as the final run).
    assert torch.equal(torch.get_rng_state(), before)

    extractor = load_extractor("imagenet", None, "cpu")
    real = torch.cat([extractor(model.to_uint8(images)) for images, _ in batches]).double().numpy()
    fake = torch.cat([extractor(model.sample(len(images), generator=torch.Generator().manual_seed(derived_seed(0, i, 1))))
                      for i, (images, _) in enumerate(batches)]).double().numpy()
    # Heusel et al. 2017, Eq. 6, the way pytorch-fid computes it (np.cov, scipy's sqrtm).
    mu1, mu2, s1, s2 = real.mean(0), fake.mean(0), np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root)
    assert got == pytest.approx(expected, rel=1e-3)
    assert got > 0
    assert model.training  # left as it was found


def test_validation_fd_does_not_depend_on_the_number_of_ranks(two_ranks):
    alone = validation_fd(tiny_vae(), validation_images(), torch.device("cpu"), seed=0)
    assert two_ranks[0]["fd"] == two_ranks[1]["fd"]
    assert two_ranks[0]["fd"]["val/fd_effnet"] == pytest.approx(alone["val/fd_effnet"], rel=1e-4)  # other processes: float32 sums in another order


@pytest.mark.parametrize("eta, shown", [(7.4, "ETA 7s"), (78, "ETA 1m18s"), (3 * 3600 + 125, "ETA 3h02m")])
def test_the_progress_line_says_step_loss_speed_and_eta(eta, shown):
    line = progress_line("vae", 120, 300, "loss", torch.tensor(0.53214), 2310.4, eta)
    assert line == f"vae step 120/300 (40%)  loss 0.5321  2,310 images/s  {shown}"
