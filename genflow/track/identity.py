"""Run identity: what decides a trained model, the key that names it, and finding its run again.

A training run's identity is everything that changes what it computes: the family and its
config, the training params (the operational ones aside), the data and the code (the digest of
the modules that train the family: a changed model file trains afresh, where it would otherwise
resume, and return, the run trained with the old code). Its digest, the run key,
names the Ray run (`FAMILY-KEY`) and tags the MLflow run: the same params find, and resume, the
same run; any changed param starts another. So `train.max_steps` is part of it (the cosine
schedule ends at max_steps: a longer run is another curve, not a continuation), and so are
`train.workers` and `train.loader_workers` (the global batch and the data order).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException

from genflow.config import Params, ParamsError, TrainParams, flatten
from genflow.models import families  # noqa: F401  (registers the family configs that run_identity reads)
from genflow.sources import PROJECT_ROOT, code_digest, imported_modules
from genflow.track import mlflow as tracking

# Params that change how a run is executed or watched, not what it computes: a run resumed
# with other values of these is the same run.
OPERATIONAL_KEYS = {"cpus_per_worker", "max_failures", "log_every", "checkpoint_every", "storage_path", "run_name",
                    "grid_every", "grid_size", "validation_fd", "system_metrics_every"}

IDENTITY_TAG = "genflow.run_identity"

# The module whose import graph computes every family's training (the worker loop, its step, the
# loader...): not the driver's plumbing (tracking, messages), whose edits must not retrain anything.
TRAINING_ENTRY = "genflow.train.loop"


def identity_train_keys() -> list[str]:
    """The train.* params that decide a trained model (dvc.yaml's train stage lists exactly these)."""
    return [key for key in TrainParams.model_fields if key not in OPERATIONAL_KEYS]


def run_identity(family: str, params: Params, dataset_digest: str | None) -> dict[str, Any]:
    """What decides the trained model, as plain data (also recorded on the MLflow run); a digest of
    None stands for data that is not there (to compare with the runs that had theirs)."""
    train = {k: v for k, v in params.train.model_dump(mode="json").items() if k in identity_train_keys()}
    return {"family": family, "model": params.family_config(family).model_dump(mode="json"), "train": train,
            "data": dataset_digest, "code": training_code(family)}


@lru_cache(maxsize=None)
def training_code(family: str, root: Path = PROJECT_ROOT) -> str:
    """The digest (12 hex digits) of the code that trains `family`: the trainer's import graph and the
    family's own model module with its imports, not the other families' modules that the family
    table names (editing ddpm.py does not retrain the VAE)."""
    model_module = families.get_family(family).__module__
    modules = imported_modules(TRAINING_ENTRY, root, string_imports=False) | imported_modules(model_module, root)
    return code_digest(modules, root)[:12]


def identity_key(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def run_key(family: str, params: Params, dataset_digest: str) -> str:
    """The digest of `run_identity`: the same params and data give the same key."""
    return identity_key(run_identity(family, params, dataset_digest))


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """`key: old -> new` for each dotted key whose value differs between two identities."""
    old, new = flatten(before), flatten(after)
    return [f"{key}: {old.get(key, '(absent)')} -> {new.get(key, '(absent)')}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def check_same_run(experiment_id: str, name: str, identity: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume the Ray run `name` (checkpoints in `run_dir`) with params other than those
    it was trained with: Ray would restore the old weights under the new params' MLflow run."""
    previous = tracking.find_run_named(experiment_id, name)
    if previous is None:
        raise ParamsError(f"{run_dir} holds checkpoints of a run named {name!r} that no MLflow run in this store "
                         f"accounts for, so its params are unknown; choose another train.run_name, or remove {run_dir} "
                         "to start afresh")
    if previous.data.tags.get(tracking.RUN_KEY_TAG) == identity_key(identity):
        return
    recorded = previous.data.tags.get(IDENTITY_TAG)
    changes = changed_keys(json.loads(recorded), identity) if recorded else ["(not recorded)"]
    raise ParamsError(f"train.run_name={name!r} names a run trained with other params or code ({'; '.join(changes)}); "
                     "resuming it would train the old checkpoint under the new params. Choose another "
                     f"train.run_name, leave it empty (the run is then named after its params), or remove {run_dir} "
                     "to start afresh")


def finished_training_run(family: str, params: Params, run_id: str | None = None):
    """The finished MLflow run that trained `family`: the run `run_id` names (`--run`), else the one
    trained with the current params and data. When none matches, the error lists the family's
    finished runs with the params that set each apart, so the user can pick one."""
    experiment_id = tracking.configure(params.tracking)
    if run_id:
        return named_training_run(family, run_id)
    from genflow.data.loader import dataset_digest

    try:
        digest = dataset_digest(params.data.shards)
    except FileNotFoundError as missing:  # no data here: the runs are still worth listing (one may be --run)
        identity = run_identity(family, params, None)
        raise FileNotFoundError(f"{missing}\n" + describe_finished_runs(experiment_id, family, identity)) from None
    identity = run_identity(family, params, digest)
    key = identity_key(identity)
    run = tracking.find_run(experiment_id, family, key)
    if run is not None and run.info.status == RunStatus.to_string(RunStatus.FINISHED):
        return run
    state = f"its run {run.info.run_id} is {run.info.status}" if run is not None else "none"
    raise FileNotFoundError(f"no finished training run of {family} with the current params (run key {key}; {state}) "
                            f"in {mlflow.get_tracking_uri()}; " + describe_finished_runs(experiment_id, family, identity))


def named_training_run(family: str, run_id: str):
    """The MLflow run `run_id`, checked to be a finished training run of `family`."""
    try:
        run = tracking.with_retries(lambda: MlflowClient().get_run(run_id))
    except MlflowException:
        raise FileNotFoundError(f"--run {run_id}: no such MLflow run in {mlflow.get_tracking_uri()}; "
                                f"see `mlflow ui` or run `genflow evaluate {family}` without --run for the list") from None
    tags = run.data.tags
    if tracking.RUN_KEY_TAG not in tags:
        raise ValueError(f"--run {run_id}: not a training run (a search's or a trial's?); give a run that "
                         f"`genflow train {family}` made")
    if tags.get(tracking.FAMILY_TAG) != family:
        raise ValueError(f"--run {run_id}: a {tags.get(tracking.FAMILY_TAG)} run, not {family}")
    if run.info.status != RunStatus.to_string(RunStatus.FINISHED):
        raise ValueError(f"--run {run_id}: its training is {run.info.status}, not finished; run the same "
                         f"`genflow train {family}` again to resume it")
    return run


def describe_finished_runs(experiment_id: str, family: str, identity: dict[str, Any], limit: int = 10) -> str:
    """The family's finished training runs, newest first, each with the params in which it differs
    from `identity` (the current params): what to give -S, or --run, to pick it."""
    client = MlflowClient()
    runs = tracking.with_retries(lambda: client.search_runs(
        [experiment_id], filter_string=f"tags.`{tracking.FAMILY_TAG}` = '{family}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"]))
    runs = [run for run in runs if tracking.RUN_KEY_TAG in run.data.tags]
    if not runs:
        return f"the store holds no finished {family} training run: run `genflow train {family}` (or `dvc repro train@{family}`) first"
    current = flatten(identity)
    lines = [f"the finished {family} training runs in the store (pick one with --run RUN_ID, or give the -S that "
             "match it):"]
    for run in runs[:limit]:
        recorded = run.data.tags.get(IDENTITY_TAG)
        if recorded is None:
            lines.append(f"  {run.info.run_id}  {run.info.run_name}: (its params were not recorded)")
            continue
        theirs = flatten(json.loads(recorded))
        differences = [_difference(key, theirs.get(key, "(absent)"), current.get(key, "(absent)"), run)
                       for key in sorted(set(theirs) | set(current)) if theirs.get(key) != current.get(key)]
        lines.append(f"  {run.info.run_id}  {run.info.run_name}: " + "; ".join(differences))
    if len(runs) > limit:
        lines.append(f"  ... and {len(runs) - limit} older")
    return "\n".join(lines)


def _difference(key: str, theirs: Any, current: Any, run) -> str:
    """`key=their value (now: current value)`, as params keys: an identity's `model.*` is `models.FAMILY.*`,
    its `data` the digest of the shards (named by the data.shards the run trained on)."""
    if key == "data":
        shards = run.data.params.get("data.shards", "?")
        now = "none here" if current is None else f"now {str(current)[:12]}"
        return f"data.shards={shards} (its data: digest {str(theirs)[:12]}; {now})"
    if key.startswith("model."):
        key = f"models.{run.data.tags.get(tracking.FAMILY_TAG)}.{key[len('model.'):]}"
    return f"{key}={json.dumps(theirs)} (now: {json.dumps(current)})"
