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

from genflow.config import Params, ParamsError, TrainParams, flatten
from genflow.models import families  # noqa: F401  (registers the family configs that run_identity reads)
from genflow.sources import PROJECT_ROOT, code_digest, imported_modules
from genflow.track import mlflow as tracking

# Params that change how a run is executed or watched, not what it computes: a run resumed
# with other values of these is the same run.
OPERATIONAL_KEYS = {"cpus_per_worker", "max_failures", "log_every", "checkpoint_every", "storage_path", "run_name",
                    "grid_every", "grid_size", "validation_fd"}

IDENTITY_TAG = "genflow.run_identity"

# The module whose import graph trains every family (the driver, the worker loop, the loader...).
TRAINING_ENTRY = "genflow.train.trainer"


def identity_train_keys() -> list[str]:
    """The train.* params that decide a trained model (dvc.yaml's train stage lists exactly these)."""
    return [key for key in TrainParams.model_fields if key not in OPERATIONAL_KEYS]


def run_identity(family: str, params: Params, dataset_digest: str) -> dict[str, Any]:
    """What decides the trained model, as plain data (also recorded on the MLflow run)."""
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


def finished_training_run(family: str, params: Params):
    """The finished MLflow run that trained `family` with the current params and data."""
    from genflow.data.loader import dataset_digest

    experiment_id = tracking.configure(params.tracking)
    key = run_key(family, params, dataset_digest(Path(params.data.shards)))
    return tracking.find_finished_run(experiment_id, family, key)
