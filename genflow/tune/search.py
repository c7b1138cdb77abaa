"""Hyperparameter search: a Ray Tune Tuner whose trials each fit one Ray Train TorchTrainer.

    genflow tune vae --trials 16                  (or: dvc repro tune@vae)

Ray Train V2's pattern: a trial is a light driver that builds its params from the drawn config
and fits a TorchTrainer with `TuneReportCallback`, which forwards each checkpoint's metrics to
Tune. OptunaSearch (TPE, define-by-run over the conditional space of genflow/tune/space.py)
proposes configs; ASHA stops weak trials, its rungs counted in training steps; a
ConcurrencyLimiter keeps as many trials in flight as the cluster has room for their Train workers.

What a trial is: the run the drawn values give, under the final run's training conditions
(train.workers, per-worker batch, loader workers: genflow.tune.space.trial_base), so train@FAMILY
retrains the winner as it won. What it is scored on: the checkpoints' `val/*` metrics, computed
on the validation split (the train split's held-out tail, genflow/data/split.py), never on the
test images that the final evaluation reports.

MLflow: one parent run per search and one nested child run per trial, into which the trial's
rank-0 worker logs its curves. The driver closes each child run as Tune saw the trial end
(finished, stopped early by ASHA, or failed with its error), so a crashing trial is reported and
the search goes on. The same params name the same search: started again after an interruption,
it is restored from its Tune experiment, in the same MLflow runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import ray
import ray._private.state  # the cluster config an autoscaler reports (trial_slots)
import ray.cloudpickle
import ray.train
import ray.tune
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from genflow import storage as stores
from genflow.config import Params, ParamsError, flatten
from genflow.provenance import provenance_tags
from genflow.train.loop import BatchSource, NonFiniteLossError
from genflow.train.trainer import controller_storage_refusals, ensure_ray, torch_trainer
from genflow.track import mlflow as tracking
from genflow.track.identity import run_key
from genflow.track.mlflow import with_retries
from genflow.tune import report
from genflow.tune.report import SearchResult
from genflow.tune.space import SearchSettings, SearchSpace, overrides, search_settings, trial_base, trial_params

SEARCH_TAG = report.SEARCH_TAG
TRIAL_TAG = "genflow.tune.trial"
STOPPED_EARLY_TAG = "genflow.tune.stopped_early"
ERROR_TAG = "genflow.tune.error"
OVERRIDES_TAG = "genflow.tune.overrides"  # the trial's drawn values, as -S overrides
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for nested runs

# What a trial's Tune actor reserves. It only drives its Train run, whose workers reserve their
# own CPUs/GPUs in Train's placement group; a CPU here would be counted twice (on 2 CPUs, two
# trials' drivers would hold both and their workers would never start). Ray's scheduler needs
# some resource in the request, so the driver's is memory. Concurrency is bounded separately.
DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}

# Settings that change how a search runs, not what it finds: they do not change its name.
OPERATIONAL_SETTINGS = {"max_concurrent", "cpus_per_worker", "max_failures", "plot_x", "plot_color"}


class SearchInterrupted(KeyboardInterrupt):
    """The search was stopped (Ctrl+C) before all its trials ended; running it again resumes it."""


@dataclass(frozen=True)
class SearchRuns:
    """Where a search's MLflow runs live: what trials and the driver need to find them."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    family: str
    search: str
    # The driver's provenance_tags, for the trial runs (which Ray workers create, elsewhere).
    provenance: dict[str, str] = field(default_factory=dict)

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def trial_run(self, trial_id: str, config: dict[str, Any]):
        """The child run of a trial: found again (a resumed trial, the driver closing it) or created."""
        client = self.client()
        found = with_retries(lambda: client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{self.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
            max_results=1,
        ))
        if found:
            return found[0]
        tags = {PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial_id, tracking.FAMILY_TAG: self.family,
                OVERRIDES_TAG: " ".join(overrides(config)), **self.provenance}
        return with_retries(lambda: client.create_run(self.experiment_id, run_name=f"{self.search}/{trial_id}",
                                                      tags=tags))


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs besides its drawn config (shipped once through the object store)."""

    family: str
    base: dict[str, Any]  # the params every trial starts from (genflow.tune.space.trial_base)
    runs: SearchRuns
    train_storage: str  # trial T's Train run (checkpoints) is TRAIN_STORAGE/T
    batch_source: BatchSource | None = None


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One trial (Tune's function trainable): the trial's params, its child run, its TorchTrainer."""
    trial_id = ray.tune.get_context().get_trial_id()
    client = setup.runs.client()
    run_id = setup.runs.trial_run(trial_id, config).info.run_id
    params = trial_params(setup.base, setup.family, config)  # a bad combination fails this trial alone
    _log_params(client, run_id, flatten({"model": params.family_config(setup.family), "train": params.train,
                                         "data": params.data}))
    finished = finished_train_run(stores.join(setup.train_storage, trial_id), params.train.max_steps)
    if finished is not None:
        ray.tune.report(finished)
        return
    trainer = torch_trainer(
        setup.family, params, name=trial_id, storage=setup.train_storage,
        tracking_uri=setup.runs.tracking_uri, mlflow_run_id=run_id,
        batch_source=setup.batch_source, callbacks=[TuneReportCallback()],
    )
    with controller_storage_refusals(setup.train_storage):
        trainer.fit()
    # The loop stops at a non-finite loss without raising (Train would retry it); see genflow.train.trainer.
    failure = with_retries(lambda: client.get_run(run_id)).data.tags.get(tracking.FAILURE_TAG)
    if failure:
        raise NonFiniteLossError(f"{failure}; lower train.lr or set train.grad_clip")


def finished_train_run(path: str, max_steps: int) -> dict[str, Any] | None:
    """The last report of a trial's Train run that already reached max_steps, else None.

    A search interrupted after a trial's last checkpoint but before Tune received it restarts that
    trial: its Train run resumes at max_steps and reports nothing, so Tune gets the report from here.
    """
    if not stores.exists(path):
        return None
    try:
        previous = ray.train.Result.from_path(*stores.ray_storage(path))
    except RuntimeError:  # the run reported no checkpoint yet
        return None
    if previous.checkpoint is None or previous.metrics.get("step", 0) < max_steps:
        return None
    return {**previous.metrics, CHECKPOINT_PATH_KEY: previous.checkpoint.path}


class TrialRuns(ray.tune.Callback):
    """Closes each trial's child run on the driver, where Tune knows how the trial ended: a trial
    that ASHA stops is killed, and a failed one may not have got as far as its run."""

    def __init__(self, runs: SearchRuns, metric: str, max_steps: int):
        self.runs, self.metric, self.max_steps = runs, metric, max_steps

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        run_id = self.runs.trial_run(trial.trial_id, trial.config).info.run_id
        client = self.runs.client()
        stopped = RunTag(STOPPED_EARLY_TAG, str(last.get("step", 0) < self.max_steps).lower())
        metrics = []
        if self.metric in last:
            metrics.append(Metric(f"tune/{self.metric}", float(last[self.metric]), report.now_ms(), int(last["step"])))
        with_retries(lambda: client.log_batch(run_id, metrics=metrics, tags=[stopped]))
        with_retries(lambda: client.set_terminated(run_id, "FINISHED"))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        run_id = self.runs.trial_run(trial.trial_id, trial.config).info.run_id
        client = self.runs.client()
        with_retries(lambda: client.set_tag(run_id, ERROR_TAG, report.describe_error(_trial_exception(trial))[:5000]))
        with_retries(lambda: client.set_terminated(run_id, "FAILED"))


def _trial_exception(trial) -> BaseException | None:
    # Tune has just written it beside the trial (Trial.get_pickled_error reads the synced copy,
    # which is not there yet).
    path = trial.pickled_error_file
    if path and Path(path).exists():
        return ray.cloudpickle.loads(Path(path).read_bytes())
    return trial.get_pickled_error()


def tune(family: str, params: Params, batch_source: BatchSource | None = None,
         dataset_digest: str | None = None) -> SearchResult:
    """Search `family`'s hyperparameters as `tune.FAMILY` declares; returns the trials and the best.

    batch_source replaces the shards (benchmarks, tests); dataset_digest then names its data.
    """
    settings = search_settings(params, family)  # a bad space fails here, before Ray starts
    if settings.grace_period > params.train.max_steps:
        raise ParamsError(f"tune.{family}.grace_period={settings.grace_period} is beyond train.max_steps="
                          f"{params.train.max_steps}: ASHA would never compare trials")
    if batch_source is None:
        from genflow.data.loader import dataset_digest as shards_digest

        dataset_digest = shards_digest(stores.resolved(params.data.shards))
    base = trial_base(params, family, settings)
    name = search_name(family, params, settings, dataset_digest or "in-memory")
    storage = stores.resolved(params.train.storage_path)  # a folder or a URI (s3://, gs://)
    stores.check_bucket(storage, "train.storage_path")

    experiment_id = tracking.configure(params.tracking)
    parent_run_id = parent_run(experiment_id, family, name, params, settings)
    runs = SearchRuns(mlflow.get_tracking_uri(), experiment_id, parent_run_id, family, name, provenance_tags())
    client = runs.client()
    status = "FAILED"  # unless the search ends, or is interrupted
    try:
        ensure_ray(params.ray)
        # A trial's Train run lives beside Tune's trial state, so that a restored trial resumes from it.
        setup = TrialSetup(family, base, runs, stores.join(storage, name, "train"), batch_source)
        tuner = _tuner(settings, params, setup, stores.join(storage, name))
        grid = tuner.fit()
        unfinished = unfinished_trials(grid.experiment_path, settings, stores.ray_storage(storage)[1])
        if unfinished:
            raise SearchInterrupted(f"{family} search {name} was interrupted with {unfinished} trials unfinished; "
                                    f"run the same command again to resume it from {stores.join(storage, name)}")
        result = summarize(grid, family, name, runs.parent_run_id, settings, params.train.max_steps)
        log_search(client, result)
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        with_retries(lambda: client.set_terminated(runs.parent_run_id, status))


def _tuner(settings: SearchSettings, params: Params, setup: TrialSetup, location: str) -> ray.tune.Tuner:
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, setup=setup), DRIVER_RESOURCES)
    path, filesystem = stores.ray_storage(location)  # filesystem: None for a local folder
    if ray.tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        # Finished and failed trials stay as they were; unfinished ones resume from their Train checkpoints.
        return ray.tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                      storage_filesystem=filesystem)
    searcher = OptunaSearch(SearchSpace(settings.space), metric=settings.metric, mode=settings.mode,
                            points_to_evaluate=settings.points_to_evaluate or None, seed=settings.seed)
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            num_samples=settings.trials,
            search_alg=ConcurrencyLimiter(searcher, settings.max_concurrent or trial_slots(params, settings)),
            scheduler=ASHAScheduler(time_attr="step", max_t=params.train.max_steps,
                                    grace_period=settings.grace_period, reduction_factor=settings.reduction_factor),
        ),
        run_config=ray.tune.RunConfig(
            name=stores.name(path),
            storage_path=path.rsplit("/", 1)[0],
            storage_filesystem=filesystem,
            failure_config=ray.tune.FailureConfig(max_failures=settings.max_failures),
            callbacks=[TrialRuns(setup.runs, settings.metric, params.train.max_steps)],
        ),
    )


def unfinished_trials(path: str, settings: SearchSettings, filesystem=None) -> int:
    """Trials an interrupted search has left to run, as its saved state says (`path` in `filesystem`,
    a store's, or a local folder). (After Ctrl+C Tune saves the state, then stops the running trials
    and marks them terminated in memory, not on disk.)"""
    trials = ray.tune.ExperimentAnalysis(path, storage_filesystem=filesystem).trials
    ended = sum(trial.status in ("TERMINATED", "ERROR") for trial in trials)
    return settings.trials - ended


def trial_slots(params: Params, settings: SearchSettings) -> int:
    """How many trials' Train workers the cluster holds at once (its CPUs, and GPUs if used).

    The cluster's size is its largest where its autoscaler reports that (Ray's cluster config),
    else what it has now. A cluster genflow connected to (not the local Ray it started) that holds no
    trial now may be one that grows: the shipped clusters start their GPU groups at 0 nodes, and
    the autoscaler adds one only when a trial's workers ask for it. Such a search runs one trial at
    a time (tune.FAMILY.max_concurrent sets more); only a local Ray, which cannot grow, is refused.
    """
    need = {"CPU": params.train.workers * settings.cpus_per_worker}
    if params.train.gpu:
        need["GPU"] = params.train.workers
    try:
        largest = ray._private.state.state.get_max_resources_from_cluster_config()  # None: not reported
    except ray.exceptions.RaySystemError:  # a Ray Client connection (ray://) has no GCS state here
        largest = None
    resources = largest or ray.cluster_resources()
    slots = min(math.floor(resources.get(name, 0) / amount) for name, amount in need.items())
    if slots >= 1:
        return slots
    have = {name: resources.get(name, 0) for name in need}
    if largest is None and (params.ray.address or os.environ.get("RAY_ADDRESS")):
        print(f"genflow: tune: the Ray cluster has {have} now and a trial's Train workers need {need}: running one "
              "trial at a time, for which its autoscaler adds nodes (a cluster that cannot grow keeps the trial "
              f"waiting; see `ray status`). -S tune.FAMILY.max_concurrent=N runs N at once", file=sys.stderr)
        return 1
    what = "at most" if largest is not None else "(a local Ray, which cannot grow)"
    raise ValueError(f"a trial's Train workers need {need} but the Ray cluster has {what} {have}; "
                     "lower tune.FAMILY.cpus_per_worker (trials train with train.workers, as the final run does)")


def search_name(family: str, params: Params, settings: SearchSettings, dataset_digest: str) -> str:
    """`tune-FAMILY-DIGEST`: the digest of what decides the search's result, so that the same
    params find (and resume) the same search, and changed ones start a new one."""
    content = {
        "run": run_key(family, params, dataset_digest),  # max_steps and the workers included
        "search": settings.model_dump(mode="json", exclude=OPERATIONAL_SETTINGS),
        # Operational for one run, not for a search: trials report (and ASHA compares them) at checkpoints.
        "reports_every": params.train.checkpoint_every,
    }
    return f"tune-{family}-{hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]}"


def parent_run(experiment_id: str, family: str, name: str, params: Params, settings: SearchSettings) -> str:
    """The search's parent run: the one of the same name when resuming, else a new one."""
    client = MlflowClient()
    found = with_retries(lambda: client.search_runs([experiment_id], filter_string=f"tags.`{SEARCH_TAG}` = '{name}'",
                                                    max_results=1))
    if found:
        run_id = found[0].info.run_id
        with_retries(lambda: client.update_run(run_id, status="RUNNING"))
        return run_id
    run_id = with_retries(lambda: client.create_run(experiment_id, run_name=name,
                                                    tags={SEARCH_TAG: name, tracking.FAMILY_TAG: family,
                                                          **provenance_tags()})).info.run_id
    logged = flatten({"tune": settings.model_dump(mode="json", exclude={"space", "points_to_evaluate"}),
                      "model": params.family_config(family), "train": params.train})
    _log_params(client, run_id, logged)
    space = {key: d.model_dump(exclude_defaults=True) for key, d in settings.space.items()}
    with_retries(lambda: client.log_dict(run_id, {"space": space, "points_to_evaluate": settings.points_to_evaluate},
                                         "search_space.yaml"))
    return run_id


def _log_params(client: MlflowClient, run_id: str, values: dict[str, Any]) -> None:
    batch = [Param(key, str(value)) for key, value in values.items()]
    for start in range(0, len(batch), 100):  # MLflow takes at most 100 params per call
        with_retries(lambda: client.log_batch(run_id, params=batch[start : start + 100]))


def summarize(grid, family: str, name: str, parent_run_id: str, settings: SearchSettings,
              max_steps: int) -> SearchResult:
    rows, errors = report.trial_rows(grid, family, settings, max_steps)
    if all(row["objective"] is None for row in rows):
        raise RuntimeError(f"all {len(rows)} trials of the {family} search {name} failed:\n"
                           + "\n".join(f"  {trial}: {error}" for trial, error in errors.items()))
    best_result = best_of(grid, settings, max_steps)
    best = next(row for row in rows if row["trial"] == best_result.metrics["trial_id"])
    return SearchResult(family, name, grid.experiment_path, parent_run_id, settings.metric, settings.mode, max_steps,
                        rows, best, dict(best_result.config), errors, report.plot_axes(settings, family))


def best_of(grid, settings: SearchSettings, max_steps: int):
    """The winning trial's Result: the best last objective among the trials that ran the whole
    budget (a trial ASHA stopped reports from an earlier step: not comparable), else among all."""
    full = [r for r in grid if r.error is None and r.metrics.get("step", 0) >= max_steps
            and math.isfinite(r.metrics.get(settings.metric, math.nan))]
    if not full:
        return grid.get_best_result(settings.metric, settings.mode)
    pick = min if settings.mode == "min" else max
    return pick(full, key=lambda result: result.metrics[settings.metric])


def log_search(client: MlflowClient, result: SearchResult) -> None:
    """The search's outcome on its parent run: counts, the best objective, the table, the plot, the winner."""
    run_id = result.mlflow_run_id
    counts = result.counts()
    metrics = {f"best/{result.metric}": float(result.best["objective"]), "trials": len(result.trials),
               **{f"trials_{status}": n for status, n in counts.items()}}
    now = report.now_ms()
    with_retries(lambda: client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()]))
    with_retries(lambda: client.set_tag(run_id, "genflow.tune.best_trial", result.best["trial"]))
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        report.write_tuned(result, directory / f"{result.family}.yaml")
        report.write_table(result, directory / f"{result.family}.csv")
        report.plot_search(result, directory / f"{result.family}.png")
        for path in directory.iterdir():
            with_retries(lambda: client.log_artifact(run_id, str(path), report.ARTIFACTS))
