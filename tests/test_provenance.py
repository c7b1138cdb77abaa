"""Stores anchored to the project under DVC (also in `dvc exp run --temp`), and the provenance tags
every MLflow run carries: the git commit, uncommitted changes, the DVC experiment and stage."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from genflow.config import load_params
from genflow.provenance import (DVC_EXPERIMENT_TAG, DVC_STAGE_TAG, GIT_COMMIT_TAG, GIT_DIRTY_TAG, StoreOutsideProject,
                                anchor_stores, anchored, provenance_tags)

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture
def temp_copy(tmp_path, monkeypatch):
    """A project and, inside it, a folder where DVC runs a --temp experiment; the cwd is that copy."""
    project = tmp_path / "project"
    copy = project / ".dvc/tmp/exps/tmpab12"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    for name in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    return project


def test_relative_stores_go_to_the_project_dvc_root_names(temp_copy, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(temp_copy))
    params = anchor_stores(load_params(None))
    assert params.train.storage_path == str(temp_copy / "ray_results")
    assert params.tracking.uri == f"sqlite:///{temp_copy}/mlflow.db"
    assert anchored("/shared/ray", "train.storage_path") == "/shared/ray"
    remote = anchor_stores(load_params(None, ["tracking.uri=http://mlflow:5000", "train.storage_path=/mnt/ray"]))
    assert remote.tracking.uri == "http://mlflow:5000" and remote.train.storage_path == "/mnt/ray"


def test_a_relative_tracking_uri_in_the_environment_is_anchored_too(temp_copy, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(temp_copy))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "mlruns")
    anchor_stores(load_params(None))
    assert os.environ["MLFLOW_TRACKING_URI"] == str(temp_copy / "mlruns")


def test_outside_dvc_relative_stores_stay_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert anchor_stores(load_params(None)).train.storage_path == "ray_results"


def test_a_temp_copy_that_dvc_root_does_not_lead_out_of_is_refused(temp_copy, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", os.getcwd())  # a DVC that does not point its executors at the project
    with pytest.raises(StoreOutsideProject, match=r"train.storage_path=ray_results is relative.*deleted when it ends"):
        anchor_stores(load_params(None))


def git(*args, cwd):
    return subprocess.run(["git", "-c", "user.email=t@genflow", "-c", "user.name=t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_tags_name_the_commit_uncommitted_changes_and_the_dvc_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)
    assert provenance_tags() == {}  # no repository: nothing is claimed
    git("init", "-q", cwd=tmp_path)
    (tmp_path / "params.yaml").write_text("a: 1\n")
    git("add", "params.yaml", cwd=tmp_path)
    git("commit", "-qm", "x", cwd=tmp_path)
    head = git("rev-parse", "HEAD", cwd=tmp_path)
    assert provenance_tags() == {GIT_COMMIT_TAG: head, GIT_DIRTY_TAG: "false"}
    (tmp_path / "params.yaml").write_text("a: 2\n")
    monkeypatch.setenv("DVC_EXP_NAME", "wispy-gulf")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f" * 40)  # the experiment's baseline, not the copy's HEAD
    monkeypatch.setenv("DVC_STAGE", "train@vae")
    assert provenance_tags() == {GIT_COMMIT_TAG: "f" * 40, GIT_DIRTY_TAG: "true", DVC_EXPERIMENT_TAG: "wispy-gulf",
                                 DVC_STAGE_TAG: "train@vae"}


@pytest.mark.slow
def test_a_temp_experiment_writes_into_the_project_and_names_itself(tmp_path):
    """`dvc exp run --temp` for real: its stage runs in a copy under .dvc/tmp/exps, yet what it
    anchors lands in the project, tagged with the experiment's name and baseline commit."""
    stage = ("python -c \"import json, pathlib; from genflow.provenance import anchored, provenance_tags; "
             "pathlib.Path(anchored('stores/run.json', 'x')).parent.mkdir(exist_ok=True); "
             "pathlib.Path(anchored('stores/run.json', 'x')).write_text(json.dumps({'cwd': str(pathlib.Path.cwd()), "
             "**provenance_tags()}))\"")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"probe": {"cmd": stage, "params": ["n"]}}}))
    (tmp_path / "params.yaml").write_text("n: 1\n")
    (tmp_path / ".gitignore").write_text("/stores/\n")
    git("init", "-q", cwd=tmp_path)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True)
    git("add", "-A", cwd=tmp_path)
    git("commit", "-qm", "baseline", cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["dvc", "exp", "run", "--temp", "-n", "probe-exp", "-S", "n=2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    recorded = json.loads((tmp_path / "stores/run.json").read_text())
    assert ".dvc/tmp/exps" in recorded["cwd"]  # it ran in the throwaway copy...
    assert recorded[DVC_EXPERIMENT_TAG] == "probe-exp" and recorded[DVC_STAGE_TAG] == "probe"
    assert recorded[GIT_COMMIT_TAG] == git("rev-parse", "HEAD", cwd=tmp_path)  # ...from this baseline


def test_uris_are_never_anchored_to_the_project(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    params = anchor_stores(load_params(tmp_path / "none.yaml", [
        "train.storage_path=s3://bucket/ray", "tracking.artifact_location=gs://bucket/mlflow"]))
    assert params.train.storage_path == "s3://bucket/ray" and params.tracking.artifact_location == "gs://bucket/mlflow"
    relative = anchor_stores(load_params(tmp_path / "none.yaml", ["tracking.artifact_location=mlartifacts"]))
    assert relative.tracking.artifact_location == str(tmp_path / "mlartifacts") and relative.train.storage_path == str(
        tmp_path / "ray_results")


def test_a_submitted_checkout_with_untracked_files_is_dirty(tmp_path):
    # The job's upload carries untracked files (a new model file runs there): not "clean".
    from genflow.provenance import SUBMITTED_COMMIT, SUBMITTED_DIRTY, git_env

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("")
    git("add", "a.py")
    git("commit", "-qm", "a")
    assert git_env(tmp_path)[SUBMITTED_DIRTY] == "false" and len(git_env(tmp_path)[SUBMITTED_COMMIT]) == 40
    (tmp_path / "new_model.py").write_text("")
    assert git_env(tmp_path)[SUBMITTED_DIRTY] == "true"
