"""Run identity: which params make another run, and how a changed one is described."""

import pytest

from genflow.config import load_params
from genflow.track.identity import changed_keys, run_identity, run_key
from tests.models.tiny import tiny_overrides


@pytest.fixture
def params(tmp_path):
    return lambda *overrides: load_params(tmp_path / "none.yaml", [*tiny_overrides("vae"), *overrides])


def test_another_max_steps_is_another_run(params):
    # Issue 8 #3: the cosine schedule ends at max_steps, so a longer run is another LR curve: it
    # must not resume the shorter run's checkpoint (nor keep its logged max_steps).
    assert run_key("vae", params("train.max_steps=300"), "d") != run_key("vae", params("train.max_steps=1000"), "d")


@pytest.mark.parametrize("override", ["train.workers=4", "train.loader_workers=3", "train.gpu=true"])
def test_what_changes_the_global_batch_or_data_order_is_part_of_the_run_key(params, override):
    # Issue 8 #8: workers set the global batch, loader workers the data order, the GPU the numerics.
    assert run_key("vae", params(override), "d") != run_key("vae", params(), "d")


@pytest.mark.parametrize("override", ["train.log_every=7", "train.checkpoint_every=9", "train.max_failures=5",
                                      "train.cpus_per_worker=2", "train.storage_path=/elsewhere", "train.run_name=x"])
def test_operational_params_keep_the_run_key(params, override):
    assert run_key("vae", params(override), "d") == run_key("vae", params(), "d")


def test_model_params_and_data_are_part_of_the_run_key(params):
    assert run_key("vae", params("models.vae.kl.weight=0.5"), "d") != run_key("vae", params(), "d")
    assert run_key("vae", params(), "other data") != run_key("vae", params(), "d")


def test_changed_keys_name_each_difference(params):
    before = run_identity("vae", params("train.lr=0.001", "train.weight_decay=0.01"), "d")
    after = run_identity("vae", params("train.lr=0.005", "train.weight_decay=0.1"), "d")
    assert changed_keys(before, after) == ["train.lr: 0.001 -> 0.005", "train.weight_decay: 0.01 -> 0.1"]
