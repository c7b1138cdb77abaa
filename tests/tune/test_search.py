"""The search end to end on CPU: the DVC stage (pipelines/tune.py) on real shards of a small
CelebA-format sample, four trials two at a time, one of which crashes; its outputs, the winner,
the MLflow parent and child runs; ASHA stopping a weak trial and an interrupted search resumed
(on in-memory data). One Ray for the session (conftest's ray_local); each search has its own
MLflow store and Ray storage."""

import csv
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
import yaml

from genflow.config import load_params
from genflow.data.shards import prepare
from genflow.data.synth import write_sample
from genflow.train.loop import InMemoryBatches
from genflow.tune.report import load_tuned
from genflow.tune.search import ERROR_TAG, PARENT_TAG, SEARCH_TAG, STOPPED_EARLY_TAG, SearchInterrupted, run_trial, tune

from pipelines.tune import main as tune_stage  # noqa: E402
from tests.conftest import S3_SECRET, objects_holding

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
# The four trials of the stage's search, one per KL schedule, so that the outcome is known: the
# searcher proposes these points first (TPE's own draws are tested in test_space.py).
POINTS = [
    CRASHING,
    {"train.lr": 2e-3, KIND: "linear", "models.vae.kl.weight": 1e-3, "models.vae.kl.warmup_steps": 10,
     "models.vae.norm_groups": 8},
    {"train.lr": 1e-3, KIND: "cyclical", "models.vae.kl.weight": 3e-4, "models.vae.kl.cycle_steps": 10,
     "models.vae.norm_groups": 8},
    {"train.lr": 5e-4, KIND: "capacity", "models.vae.kl.capacity_steps": 10, "models.vae.norm_groups": 8},
]


def tiny(root: Path, **settings) -> dict:
    """params.yaml's content for a tiny VAE and a small search. grace_period = max_steps: ASHA
    stops nobody unless a test asks it to."""
    search = {"trials": 4, "max_concurrent": 2, "grace_period": MAX_STEPS, "seed": 0, "space": SPACE,
              "plot_x": "models.vae.kl.weight", "plot_color": KIND, **settings}
    return {
        "data": {"sample": {"dir": f"{root}/sample", "n": 120}, "shards": f"{root}/shards", "shard_size": 50,
                 "processes": 1},
        "train": {"workers": 1, "batch_size": 8, "log_every": 5, "max_failures": 0, "max_steps": MAX_STEPS,
                  "checkpoint_every": 5, "loader_workers": 0, "storage_path": f"{root}/ray"},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db"},
        "models": {"vae": {"hidden_channels": [8, 16, 32, 32], "latent_dim": 8, "norm_groups": 8}},
        "tune": {"vae": search},
    }


def search_params(root: Path, **settings):
    return load_params(root / "none.yaml", [f"{section}={json.dumps(value)}"
                                            for section, value in tiny(root, **settings).items()])


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
    """`python -m pipelines.tune vae` in a folder holding params.yaml and the shards it names."""
    root = tmp_path_factory.mktemp("four")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny(root, points_to_evaluate=POINTS)))
    params = load_params(root / "params.yaml")
    write_sample(params.data.sample.dir, n=params.data.sample.n)
    prepare(params.data)
    start, cwd = time.perf_counter(), os.getcwd()
    os.chdir(root)
    # As DVC runs the stage in an experiment: the trials' runs, which Ray workers create, carry it too.
    os.environ.update(DVC_EXP_NAME="four-trials", DVC_EXP_BASELINE_REV="b" * 40)
    try:
        result = tune_stage("vae")
    finally:
        os.chdir(cwd)
        for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
            os.environ.pop(name)
    print(f"\n4-trial search (DVC stage, real shards): {time.perf_counter() - start:.1f} s wall")
    return root, result


def test_four_trials_run_two_at_a_time_and_a_crash_does_not_end_the_search(four_trials):
    root, result = four_trials
    assert len(result.trials) == 4
    failed = [row for row in result.trials if row["status"] == "failed"]
    assert [row["norm_groups"] for row in failed] == [16]
    assert "groups must divide every hidden channel count" in result.errors[failed[0]["trial"]]
    finished = [row for row in result.trials if row["status"] == "completed"]
    assert sorted(row["kl_kind"] for row in finished) == ["capacity", "cyclical", "linear"]
    assert all(row["step"] == MAX_STEPS and row["objective"] > 0 for row in finished)
    assert "3 completed, 0 stopped early by ASHA, 1 failed" in str(result)

    # Trials trained at the same time, never more than max_concurrent: their child runs' lifetimes.
    _, _, children = runs_of(root)
    trained = [r for r in children if r.info.status == "FINISHED"]
    events = sorted([(r.info.start_time, 1) for r in trained] + [(r.info.end_time, -1) for r in trained])
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most == 2


def test_the_stage_writes_the_best_trials_config_and_the_search_table(four_trials):
    root, result = four_trials
    grid = ray.tune.Tuner.restore(result.path, trainable=run_trial).get_results()
    # No trial was stopped early, so Tune's best is the search's (which prefers full-budget trials).
    best = grid.get_best_result(metric="loss", mode="min")
    assert best.metrics["trial_id"] == result.best["trial"]
    # tuned/vae.yaml holds exactly the best trial's drawn values, as params.
    tuned = load_params(root / "none.yaml", load_tuned("vae", root / "tuned/vae.yaml"))
    assert tuned.train.lr == best.config["train.lr"]
    config = tuned.family_config("vae")
    drawn = {f"models.vae.{k}": v for k, v in config.model_dump().items() if not isinstance(v, dict)}
    drawn.update({f"models.vae.kl.{k}": v for k, v in config.kl.model_dump().items()})
    assert all(drawn[k] == v for k, v in best.config.items() if k != "train.lr")
    assert len(load_tuned("vae", root / "tuned/vae.yaml")) == len(best.config)

    with open(root / "plots/tune/vae.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["trial"] for r in rows} == {t.metrics["trial_id"] for t in grid}
    assert {"trial", "status", "step", "objective", "kl_weight", "kl_kind", "train_lr"} <= set(rows[0])
    assert (root / "plots/tune/vae.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((root / "metrics/tune/vae.json").read_text())
    assert metrics["best"] == best.metrics["loss"] and metrics["trials"] == 4
    assert metrics["failed"] == len(result.errors) and metrics["completed"] == 4 - len(result.errors)


def test_one_parent_run_and_a_child_run_per_trial(four_trials):
    root, result = four_trials
    client, parents, children = runs_of(root)
    assert [p.info.run_id for p in parents] == [result.mlflow_run_id]
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_failed"] == len(result.errors)
    assert {a.path for a in client.list_artifacts(result.mlflow_run_id, "tune")} == {
        "tune/vae.csv", "tune/vae.png", "tune/vae.yaml"}

    assert len(children) == 4 and all(c.data.tags[PARENT_TAG] == result.mlflow_run_id for c in children)
    for run in (parent, *children):  # issue 13: every run records the commit and the DVC experiment
        assert run.data.tags["genflow.dvc.experiment"] == "four-trials"
        assert run.data.tags["mlflow.source.git.commit"] == "b" * 40
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


def test_trial_runs_carry_the_drivers_provenance(tmp_path):
    # Ray workers create the trial runs, away from the project's git and DVC's environment: the
    # driver's tags travel with SearchRuns.
    from genflow.tune.search import SearchRuns

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("celeba64")
    parent = client.create_run(experiment).info.run_id
    provenance = {"mlflow.source.git.commit": "c" * 40, "genflow.dvc.experiment": "wispy-gulf"}
    runs = SearchRuns(f"sqlite:///{tmp_path}/mlflow.db", experiment, parent, "vae", "tune-vae-x", provenance)
    tags = runs.trial_run("trial_1", {"train.lr": 0.001}).data.tags
    assert {key: tags[key] for key in provenance} == provenance and tags[PARENT_TAG] == parent


@pytest.mark.parametrize("case", ["autoscaler reports its largest", "a cluster joined", "a local Ray", "cannot ever fit"])
def test_concurrency_default_waits_for_an_autoscaling_clusters_gpu_nodes(case, tiny_params, monkeypatch, capsys):
    # Issue 13: on the shipped clusters (GPU groups at 0 nodes) `genflow tune -S train.gpu=true` failed
    # before the autoscaler could add a GPU node: the default read the cluster as it was.
    from genflow.tune.search import trial_slots
    from genflow.tune.space import search_settings

    params = tiny_params("train.gpu=true", "train.workers=2", "tune.vae.cpus_per_worker=2",
                         f"tune.vae.space={json.dumps({'train.lr': SPACE['train.lr']})}",
                         *(["ray.address=10.0.0.1:6379"] if case == "a cluster joined" else []))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    largest = {"autoscaler reports its largest": {"CPU": 8 + 4 * 16, "GPU": 4 * 4},
               "cannot ever fit": {"CPU": 64, "GPU": 1}}.get(case)
    def max_resources():
        if case == "a cluster joined":  # through Ray Client (ray://), which has no GCS state to ask
            raise ray.exceptions.RaySystemError("Ray has not been started yet")
        return largest

    monkeypatch.setattr(ray._private.state.state, "get_max_resources_from_cluster_config", max_resources)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "memory": 3e10})  # the CPU head alone
    settings = search_settings(params, "vae")
    if case == "autoscaler reports its largest":
        assert trial_slots(params, settings) == 8  # 16 GPUs, 2 a trial
    elif case == "a cluster joined":
        assert trial_slots(params, settings) == 1
        assert "running one trial at a time, for which its autoscaler adds nodes" in capsys.readouterr().err
    else:
        with pytest.raises(ValueError, match="a local Ray, which cannot grow" if case == "a local Ray" else "has at most"):
            trial_slots(params, settings)


def test_a_search_keeps_its_state_and_checkpoints_in_a_bucket_and_resumes_from_there(ray_local, tmp_path, s3_bucket,
                                                                                     monkeypatch):
    from genflow import storage
    from genflow.tune import search as searching

    setups, real_tuner = [], searching._tuner  # the TrialSetup Tune ships to every trial, pickled

    def tuner(settings, params, setup, location):
        setups.append(setup)
        return real_tuner(settings, params, setup, location)

    monkeypatch.setattr(searching, "_tuner", tuner)
    point = {"train.lr": 1e-3, KIND: "constant", "models.vae.kl.weight": 1e-4, "models.vae.norm_groups": 8}
    params = search_params(tmp_path, trials=1, max_concurrent=1, points_to_evaluate=[point])
    params.train.storage_path = f"{s3_bucket}/ray"
    params.train.max_steps = params.tune["vae"]["grace_period"] = 5
    result = tune("vae", params, batch_source=batches(), dataset_digest="tiny")
    (trial,) = result.trials
    assert (trial["status"], trial["step"]) == ("completed", 5)
    search = f"{s3_bucket}/ray/{result.name}"
    assert any(name.startswith("experiment_state") for name, _ in storage.listdir(search))  # Tune's state
    (train_run,) = [name for name, is_folder in storage.listdir(f"{search}/train") if is_folder]
    assert any(name.startswith("checkpoint_") for name, _ in storage.listdir(f"{search}/train/{train_run}"))
    # The same command again restores the finished search from the bucket: no trial runs again.
    again = tune("vae", params, batch_source=batches(), dataset_digest="tiny")
    assert again.best["trial"] == trial["trial"] and len(runs_of(tmp_path)[2]) == 1
    # The trials used their node's credentials (conftest's ray_local): none was shipped to them, nor
    # saved in the store (Tune's tuner.pkl holds the RunConfig and its storage filesystem).
    assert setups and all(S3_SECRET.encode() not in ray.cloudpickle.dumps(setup) for setup in setups)
    assert any(name == "tuner.pkl" for name, _ in storage.listdir(search))
    assert objects_holding(s3_bucket, S3_SECRET) == []
