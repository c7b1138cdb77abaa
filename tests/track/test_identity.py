"""Run identity: which params make another run, and how a changed one is described."""

import json

import pytest

from genflow.config import load_params
from genflow.track.identity import (IDENTITY_TAG, changed_keys, describe_finished_runs, identity_key,
                                    named_training_run, run_identity, run_key)
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


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """One SQLite store for the module (creating one takes seconds)."""
    from genflow.config import TrackingParams
    from genflow.track import mlflow as tracking

    uri = f"sqlite:///{tmp_path_factory.mktemp('identity')}/mlflow.db"
    tracking.configure(TrackingParams(uri=uri))
    return uri


@pytest.fixture
def store(database, request):
    """An experiment of its own, to hold training runs made by hand (no Ray), tagged as `train` tags them."""
    import mlflow
    from mlflow import MlflowClient

    from genflow.track import mlflow as tracking

    mlflow.set_tracking_uri(database)
    client = MlflowClient()
    experiment = client.create_experiment(request.node.name)

    def training_run(family, identity, status="FINISHED", shards="data/shards"):
        tags = {tracking.FAMILY_TAG: family, tracking.RUN_KEY_TAG: identity_key(identity),
                IDENTITY_TAG: json.dumps(identity, sort_keys=True)}
        run_id = client.create_run(experiment, tags=tags, run_name=f"{family}-{identity_key(identity)}").info.run_id
        client.log_param(run_id, "data.shards", shards)
        client.set_terminated(run_id, status)
        return run_id

    return experiment, training_run


def test_no_matching_run_lists_the_finished_runs_with_what_sets_each_apart(params, store):
    experiment, training_run = store
    current = run_identity("vae", params("train.lr=0.001"), "digest-now")
    other_lr = training_run("vae", run_identity("vae", params("train.lr=0.004"), "digest-now"))
    other_data = training_run("vae", run_identity("vae", params("train.lr=0.001", "models.vae.latent_dim=4"),
                                                  "digest-before"), shards="elsewhere/shards")
    killed = training_run("vae", run_identity("vae", params("train.lr=0.009"), "digest-now"), status="KILLED")
    listing = describe_finished_runs(experiment, "vae", current)
    lines = listing.splitlines()
    assert "--run RUN_ID" in lines[0]
    assert lines[1].startswith(f"  {other_data}") and lines[2].startswith(f"  {other_lr}")  # newest first
    assert "train.lr=0.004 (now: 0.001)" in lines[2]
    assert "models.vae.latent_dim=4 (now: 8)" in lines[1]
    assert "data.shards=elsewhere/shards (its data: digest digest-befor; now digest-now)" in lines[1]
    assert killed not in listing and len(lines) == 3  # only finished runs can be evaluated


def test_no_finished_run_at_all_says_train_first(params, store):
    experiment, _ = store
    assert "holds no finished vae training run: run `genflow train vae`" in describe_finished_runs(
        experiment, "vae", run_identity("vae", params(), "d"))


def test_a_named_run_must_be_a_finished_training_run_of_the_family(params, store):
    _, training_run = store
    finished = training_run("vae", run_identity("vae", params(), "d"))
    assert named_training_run("vae", finished).info.run_id == finished
    with pytest.raises(ValueError, match="a dcgan run, not vae"):
        named_training_run("vae", training_run("dcgan", {"family": "dcgan"}))
    with pytest.raises(ValueError, match="its training is KILLED, not finished; run the same `genflow train vae`"):
        named_training_run("vae", training_run("vae", run_identity("vae", params("train.lr=0.002"), "d"), status="KILLED"))
    with pytest.raises(FileNotFoundError, match="--run 0123abcd: no such MLflow run"):
        named_training_run("vae", "0123abcd")
