"""The search end to end on CPU with in-memory data: four trials two at a time, one of which
crashes; the exported winner; the MLflow parent and child runs; ASHA stopping a weak trial; an
interrupted search resumed. One Ray for the session (conftest's ray_local); each search has its
own MLflow store and Ray storage."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest
import ray.tune
import torch

from genflow.config import load_params
from genflow.train.loop import InMemoryBatches
from genflow.tune.report import load_tuned, write_tuned
from genflow.tune.search import ERROR_TAG, PARENT_TAG, SEARCH_TAG, STOPPED_EARLY_TAG, SearchInterrupted, run_trial, tune

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_STEPS = 20
KIND = "models.vae.kl.kind"
SPACE = {
    "train.lr": {"loguniform": [3e-4, 3e-3]},
    KIND: {"choice": ["constant", "linear", "cyclical", "capacity"]},
    "models.vae.kl.weight": {"loguniform": [1e-5, 1e-2], "when": {KIND: ["constant", "linear", "cyclical"]}},
    "models.vae.kl.warmup_steps": {"int": [5, 20], "when": {KIND: "linear"}},
    "models.vae.kl.cycle_steps": {"int": [5, 20], "when": {KIND: "cyclical"}},
    "models.vae.kl.capacity_steps": {"int": [5, 20], "when": {KIND: "capacity"}},
    # 16 groups do not divide the tiny VAE's 8 channels: a trial drawing it fails at construction.
    "models.vae.norm_groups": {"choice": [8, 16]},
}
CRASHING = {"train.lr": 1e-3, KIND: "constant", "models.vae.kl.weight": 1e-4, "models.vae.norm_groups": 16}


def search_params(root: Path, **settings):
    # grace_period = max_steps: ASHA stops nobody unless a test asks it to.
    section = {"trials": 4, "max_concurrent": 2, "grace_period": MAX_STEPS, "seed": 0, "space": SPACE, **settings}
    return load_params(root / "none.yaml", [
        "models.vae.hidden_channels=[8,16,32,32]", "models.vae.latent_dim=8", "models.vae.norm_groups=8",
        f"tracking.uri=sqlite:///{root}/mlflow.db", f"train.storage_path={root}/ray",
        "train.batch_size=8", "train.log_every=5", "train.max_failures=0",
        f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=5",
        "tune.vae=" + json.dumps(section),
    ])


def batches() -> InMemoryBatches:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 64, 64, generator=generator)
    return InMemoryBatches(images, (torch.rand(64, 40, generator=generator) > 0.5).float(), 8)


def runs_of(root: Path):
    client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("celeba64")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if SEARCH_TAG in r.data.tags]
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    return client, parents, children


@pytest.fixture(scope="module")
def four_trials(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    # With this seed TPE draws 8 groups for the three trials after the crashing point (Optuna 5).
    params = search_params(root, seed=6, points_to_evaluate=[CRASHING])
    start = time.perf_counter()
    result = tune("vae", params, batch_source=batches(), dataset_digest="tiny")
    print(f"\n4-trial search: {time.perf_counter() - start:.1f} s wall")
    return root, params, result


def test_four_trials_run_two_at_a_time_and_a_crash_does_not_end_the_search(four_trials):
    root, _, result = four_trials
    assert len(result.trials) == 4
    failed = [row for row in result.trials if row["status"] == "failed"]
    finished = [row for row in result.trials if row["status"] == "completed"]
    assert failed and finished and len(failed) + len(finished) == 4
    # Exactly the trials drawn (or pointed) at 16 groups crashed, each reported with its error.
    assert all(row["norm_groups"] == 16 for row in failed) and all(row["norm_groups"] == 8 for row in finished)
    assert all("groups must divide every hidden channel count" in result.errors[row["trial"]] for row in failed)
    assert all(row["step"] == MAX_STEPS and row["objective"] > 0 for row in finished)
    assert f"{len(failed)} failed" in str(result)

    # Trials trained at the same time, never more than max_concurrent: their child runs' lifetimes.
    _, _, children = runs_of(root)
    trained = [r for r in children if r.info.status == "FINISHED"]
    events = sorted([(r.info.start_time, 1) for r in trained] + [(r.info.end_time, -1) for r in trained])
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most == 2


def test_the_exported_config_is_the_best_trials(four_trials, tmp_path):
    _, params, result = four_trials
    grid = ray.tune.Tuner.restore(result.path, trainable=run_trial).get_results()
    best = grid.get_best_result(metric="loss", mode="min")
    assert best.metrics["trial_id"] == result.best["trial"]
    write_tuned(result, tmp_path / "vae.yaml")
    tuned = load_params(tmp_path / "none.yaml", load_tuned("vae", tmp_path / "vae.yaml"))
    config = tuned.family_config("vae")
    drawn = {"train.lr": tuned.train.lr, KIND: config.kl.kind, "models.vae.norm_groups": config.norm_groups}
    assert {k: v for k, v in best.config.items() if k in drawn} == {k: drawn[k] for k in best.config if k in drawn}
    assert len(load_tuned("vae", tmp_path / "vae.yaml")) == len(best.config)
    assert result.best["objective"] == min(r["objective"] for r in result.trials if r["objective"] is not None)


def test_one_parent_run_and_a_child_run_per_trial(four_trials):
    root, _, result = four_trials
    client, parents, children = runs_of(root)
    assert [p.info.run_id for p in parents] == [result.mlflow_run_id]
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_failed"] == len(result.errors)
    assert {a.path for a in client.list_artifacts(result.mlflow_run_id, "tune")} == {
        "tune/vae.csv", "tune/vae.png", "tune/vae.yaml"}

    assert len(children) == 4 and all(c.data.tags[PARENT_TAG] == result.mlflow_run_id for c in children)
    by_trial = {c.data.tags["genflow.tune.trial"]: c for c in children}
    for row in result.trials:
        child = by_trial[row["trial"]]
        if row["status"] == "failed":
            assert child.info.status == "FAILED"
            assert "groups must divide" in child.data.tags[ERROR_TAG]
            continue
        assert child.info.status == "FINISHED" and child.data.tags[STOPPED_EARLY_TAG] == "false"
        assert child.data.params["model.kl.kind"] == row["kl_kind"]
        assert float(child.data.params["train.lr"]) == pytest.approx(row["train_lr"])
        # The trial's rank-0 worker logged its curve into its child run.
        curve = client.get_metric_history(child.info.run_id, "train/loss")
        assert [m.step for m in curve] == list(range(5, MAX_STEPS + 1, 5))


def test_asha_stops_a_weak_trial_early(ray_local, tmp_path):
    # One trial at a time, so the weak one reaches the first rung after the strong one: the capacity
    # objective γ·|KL − C| (γ = 1000) dwarfs the constant one's, and ASHA stops it at step 5.
    points = [{"train.lr": 3e-3, KIND: "constant", "models.vae.kl.weight": 1e-4, "models.vae.norm_groups": 8},
              {"train.lr": 3e-4, KIND: "capacity", "models.vae.kl.capacity_steps": 20, "models.vae.norm_groups": 8}]
    params = search_params(tmp_path, trials=2, max_concurrent=1, grace_period=5, reduction_factor=2,
                           points_to_evaluate=points)
    result = tune("vae", params, batch_source=batches(), dataset_digest="tiny")
    strong, weak = sorted(result.trials, key=lambda row: row["kl_kind"] == "capacity")
    assert (strong["status"], strong["step"]) == ("completed", MAX_STEPS)
    assert weak["status"] == "stopped" and weak["step"] < MAX_STEPS
    assert result.best["trial"] == strong["trial"]
    _, _, children = runs_of(tmp_path)
    stopped = {c.data.tags["genflow.tune.trial"]: c.data.tags[STOPPED_EARLY_TAG] for c in children}
    assert stopped == {strong["trial"]: "false", weak["trial"]: "true"}


def test_an_interrupted_search_resumes_where_it_stopped(ray_local, tmp_path):
    params = search_params(tmp_path, trials=3, space={k: v for k, v in SPACE.items() if k != "models.vae.norm_groups"})

    def interrupt_after_the_first_trial():
        deadline = time.time() + 300
        while time.time() < deadline:
            if (tmp_path / "mlflow.db").exists() and any(c.info.status == "FINISHED" for c in runs_of(tmp_path)[2]):
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl+C: Tune saves its state and stops
                return
            time.sleep(0.5)

    interrupter = threading.Thread(target=interrupt_after_the_first_trial)
    interrupter.start()
    with pytest.raises(SearchInterrupted, match="run the same command again to resume"):
        tune("vae", params, batch_source=batches(), dataset_digest="tiny")
    interrupter.join()
    client, parents, children = runs_of(tmp_path)
    assert parents[0].info.status == "KILLED"
    done_before = {c.info.run_id for c in children if c.info.status == "FINISHED"}
    assert 1 <= len(done_before) < 3

    result = tune("vae", params, batch_source=batches(), dataset_digest="tiny")
    assert len(result.trials) == 3 and all(row["status"] == "completed" for row in result.trials)
    client, parents, children = runs_of(tmp_path)
    assert [p.info.run_id for p in parents] == [result.mlflow_run_id]
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    # Resumed trials went on in their own child runs: one run per trial, the finished ones untouched,
    # and a trial interrupted mid-run resumed from its last Train checkpoint, not from step 0.
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    assert done_before <= {c.info.run_id for c in children}
    for child in children:
        starts = [int(m.value) for m in client.get_metric_history(child.info.run_id, "train/start_step")]
        assert starts[0] == 0 and all(s > 0 and s % 5 == 0 for s in starts[1:]), starts
