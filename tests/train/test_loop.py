"""The worker loop's pieces that need no Ray: LR schedule, resume position, in-memory batches."""

import math

import pytest
import torch

from genflow.config import TrainParams
from genflow.train.loop import InMemoryBatches, batches_from, lr_lambda


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
