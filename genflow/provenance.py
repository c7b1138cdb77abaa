"""Where a run comes from, and where its stores are when DVC runs it.

DVC runs every stage with DVC_ROOT set to the project. `dvc exp run --temp` and `--queue` run the
stage in a throwaway copy of the project (.dvc/tmp/exps/...) that is deleted afterwards, with
DVC_ROOT still naming the project the experiment was started from, DVC_EXP_NAME its name and
DVC_EXP_BASELINE_REV the commit it starts from (dvc/repo/experiments/queue/base.py, DVC 3.67).
So the stores that DVC does not track (the MLflow database beside the project, Ray's checkpoints)
are anchored to DVC_ROOT: relative, they would be made in the copy and deleted with it.
What DVC tracks (shards, tuned params, the featurizer, metrics) stays relative: DVC collects it.

Every MLflow run genflow starts carries `provenance_tags()`: the git commit (MLflow's own
`mlflow.source.git.commit`, which the UI shows), whether the work tree had uncommitted changes,
and the DVC experiment and stage when DVC ran it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from genflow.config import Params
from genflow.storage import scheme

GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_DIRTY_TAG = "genflow.git.dirty"
DVC_EXPERIMENT_TAG = "genflow.dvc.experiment"
DVC_STAGE_TAG = "genflow.dvc.stage"
# Set by `genflow submit` in the job's environment: the submitting checkout's commit and dirty flag.
SUBMITTED_COMMIT = "GENFLOW_GIT_COMMIT"
SUBMITTED_DIRTY = "GENFLOW_GIT_DIRTY"

_TEMP_EXPERIMENTS = (".dvc", "tmp", "exps")  # where DVC makes the copies it runs experiments in


class StoreOutsideProject(ValueError):
    """A relative store would be written into DVC's throwaway experiment copy."""


def project_root() -> Path | None:
    """The DVC project this process runs a stage of (DVC_ROOT), or None outside DVC."""
    root = os.environ.get("DVC_ROOT")
    return Path(root) if root else None


def anchored(path: str, what: str) -> str:
    """`path` made absolute against the DVC project when it is relative and DVC runs this stage;
    unchanged otherwise. Refuses a relative path in a temporary experiment copy that DVC_ROOT
    does not lead out of (a DVC that does not set it for its executors). A URI (s3://, gs://,
    file://) names its own place: it is never anchored."""
    if Path(path).is_absolute() or scheme(path):
        return path
    root = project_root()
    if root is not None and not _in_temp_copy(root.resolve()):
        return str(root.resolve() / path)
    if _in_temp_copy(Path.cwd().resolve()):
        raise StoreOutsideProject(
            f"{what}={path} is relative, and this stage runs in DVC's temporary experiment copy {Path.cwd()} "
            "(dvc exp run --temp / --queue), which is deleted when it ends: it would take the runs or checkpoints "
            f"with it. Give {what} an absolute path (dvc exp run -S {what}=/abs/path), or run the experiment in "
            "the workspace (dvc exp run without --temp/--queue)")
    return path


def _in_temp_copy(path: Path) -> bool:
    parts = path.parts
    return any(parts[i : i + 3] == _TEMP_EXPERIMENTS for i in range(len(parts) - 2))


def anchor_stores(params: Params) -> Params:
    """`params` with the stores DVC does not track anchored to the project (see the module doc):
    train.storage_path, tracking.artifact_location, and a local tracking store (a relative SQLite file or folder) named by
    tracking.uri or MLFLOW_TRACKING_URI (which wins, and is anchored in this process's environment)."""
    params = params.model_copy(deep=True)
    params.train.storage_path = anchored(params.train.storage_path, "train.storage_path")
    if params.tracking.artifact_location:
        params.tracking.artifact_location = anchored(params.tracking.artifact_location, "tracking.artifact_location")
    params.tracking.uri = _anchored_uri(params.tracking.uri, "tracking.uri")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = _anchored_uri(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")
    return params


def _anchored_uri(uri: str, what: str) -> str:
    sqlite = "sqlite:///"
    if uri.startswith(sqlite):
        return sqlite + anchored(uri[len(sqlite):], what)
    if "://" not in uri and not uri.startswith("file:"):  # a plain folder: MLflow's file store
        return anchored(uri, what)
    return uri


def provenance_tags() -> dict[str, str]:
    """The git commit (the experiment's baseline commit in a DVC experiment: its own commit is made
    after the stages run; the submitting checkout's in a Ray job, see git_env), whether tracked
    files had uncommitted changes, and the DVC experiment and stage; each only when known."""
    tags: dict[str, str] = {}
    baseline, submitted = os.environ.get("DVC_EXP_BASELINE_REV"), os.environ.get(SUBMITTED_COMMIT)
    commit = baseline or submitted or _git("rev-parse", "HEAD")
    if commit:
        tags[GIT_COMMIT_TAG] = commit
        if submitted and not baseline:
            dirty = os.environ.get(SUBMITTED_DIRTY)
        else:
            changes = _git("status", "--porcelain", "--untracked-files=no")
            dirty = None if changes is None else "true" if changes else "false"
        if dirty in ("true", "false"):
            tags[GIT_DIRTY_TAG] = dirty
    for variable, tag in (("DVC_EXP_NAME", DVC_EXPERIMENT_TAG), ("DVC_STAGE", DVC_STAGE_TAG)):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return tags


def git_env(project: str | Path = ".") -> dict[str, str]:
    """The checkout's commit and whether tracked files have uncommitted changes, as environment
    variables for a Ray job (`genflow submit`): the job runs in an uploaded copy of the project
    without .git, where provenance_tags reads them instead. Empty outside a git checkout."""
    commit = _git("rev-parse", "HEAD", cwd=project)
    if not commit:
        return {}
    # Untracked files count: the job's upload carries them (a new model file runs there).
    changes = _git("status", "--porcelain", "--untracked-files=normal", cwd=project)
    if changes is None:  # git answered rev-parse and then failed: the state is unknown, not clean
        return {SUBMITTED_COMMIT: commit}
    return {SUBMITTED_COMMIT: commit, SUBMITTED_DIRTY: "true" if changes else "false"}


def _git(*args: str, cwd: str | Path | None = None) -> str | None:
    """git's output in `cwd` (the current folder), or None where there is no git or no repository."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
