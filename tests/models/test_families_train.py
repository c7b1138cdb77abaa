"""Every registered family through the real training path: Ray Train, 2 DDP workers (gloo, as the
default `train.workers: 2` runs), a worker crash mid-run, and the resume from the checkpoint that
Ray then restores (every optimizer, EMA, phase and per-rank training state).

The contract test (test_protocol.py) checks one step against one rank; this runs the loop itself.
"""

import sys
from pathlib import Path

import mlflow
import pytest
import ray.cloudpickle
import torch

from genflow.models.families import FAMILY_NAMES
from genflow.models.saved import load_model
from genflow.train.loop import InMemoryBatches
from genflow.train.trainer import train
from tests.models.tiny import tiny_overrides

pytestmark = pytest.mark.slow

# The batch source below travels to the Ray workers, which cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CrashOnce(InMemoryBatches):
    """In-memory batches; rank 0 raises the first time it reaches batch `index` of epoch 0 (a marker
    file makes it once per test, across Ray's restart of the workers)."""

    def __init__(self, images, attrs, batch_size, index, marker):
        super().__init__(images, attrs, batch_size)
        self.index, self.marker = index, Path(marker)

    def __call__(self, rank, world_size, seed, image_range):
        epochs = super().__call__(rank, world_size, seed, image_range)
        plain_epoch = epochs.epoch

        def epoch(number):
            for i, batch in enumerate(plain_epoch(number)):
                if rank == 0 and (number, i) == (0, self.index) and not self.marker.exists():
                    self.marker.touch()
                    raise RuntimeError("a worker crash, staged by the test")
                yield batch

        epochs.epoch = epoch
        return epochs


def eight_bit_images(n: int, image_range: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels k/255 in the family's range, as the loader gives them (flow and PixelCNN insist)."""
    generator = torch.Generator().manual_seed(0)
    low, high = image_range
    images = torch.randint(0, 256, (n, 3, 64, 64), generator=generator).float() / 255 * (high - low) + low
    return images, (torch.rand(n, 40, generator=generator) > 0.5).float()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_two_workers_train_crash_and_resume_from_the_checkpoint(family, ray_local, tiny_params, tmp_path):
    from genflow.models.families import get_family

    images, attrs = eight_bit_images(48, get_family(family).image_range)
    # 48 images, 2 ranks, batches of 4: 6 steps an epoch, 6 steps in all (the tiny stacked AE's
    # greedy phases take 5, then it fine-tunes). Checkpoint at step 3; rank 0 crashes fetching
    # step 4's batch, so Ray restarts both workers from step 3's checkpoint, mid-phase for sae.
    params = tiny_params(*tiny_overrides(family), "train.workers=2", "train.batch_size=4", "train.max_steps=6",
                         "train.checkpoint_every=3", "train.max_failures=1", "train.grid_size=2",
                         "train.validation_batches=0", f"train.run_name={family}-resume")
    result = train(family, params, batch_source=CrashOnce(images, attrs, 4, index=4, marker=tmp_path / "crashed"),
                   dataset_digest=f"{family}-resume")
    assert (tmp_path / "crashed").exists()
    starts = [int(m.value) for m in mlflow.MlflowClient().get_metric_history(result.mlflow_run_id, "train/start_step")]
    assert starts == [0, 3]
    assert result.metrics["step"] == 6
    model = load_model(result.checkpoint_path)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    samples = model.sample(2, cond=attrs[:2] if model.conditional else None, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, 64, 64) and samples.dtype == torch.uint8
