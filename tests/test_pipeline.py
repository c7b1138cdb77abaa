"""`dvc repro` in a fresh copy of the project: the whole pipeline, as a new user runs it, on a
smaller sample and a tiny model (the same stages and code paths as the default run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from genflow.models.families import FAMILY_NAMES
from tests.models.tiny import TINY_CONFIGS

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1]
# Two families stand for all ten in CI (the stages are one foreach); GENFLOW_PIPELINE_FAMILIES=all
# (or a comma list) runs more, e.g. before a release: all ten take ~5x as long.
_CHOSEN = os.environ.get("GENFLOW_PIPELINE_FAMILIES", "vae,dcgan")
PIPELINE_FAMILIES = FAMILY_NAMES if _CHOSEN == "all" else tuple(_CHOSEN.split(","))
TIMEOUT_S = 900 * max(1, len(PIPELINE_FAMILIES) // 2)


def run(command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def mlflow_params(project: Path, run_id: str) -> dict:
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{project}/mlflow.db").get_run(run_id).data.params


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git repo holding the project's files as they are now (committed or not)."""
    copy = tmp_path_factory.mktemp("project")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        source = PROJECT / name
        if source.is_file():
            target = copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["data"]["sample"]["n"] = 120
    params["train"].update(max_steps=6, checkpoint_every=3, batch_size=8, log_every=1)
    for family, section in params["models"].items():  # every family in dvc.yaml runs: each at its tiny size
        section.update(TINY_CONFIGS[family])
    params["evaluate"].update(batches=2, batch_size=16, sample_n=4, cpu_samples=8, kid_subsets=3)
    params["evaluate"]["featurizer"].update(steps=5, width=8)
    for settings in params["tune"].values():
        settings.update(trials=2, grace_period=3, max_concurrent=1)
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # vae and dcgan by default: one with a single optimizer and a likelihood, one with two
    # optimizers scored on sample quality. Every family's own 2-worker train and resume runs in
    # tests/models/test_families_train.py.
    pipeline = yaml.safe_load((copy / "dvc.yaml").read_text())
    pipeline["vars"] = [{"families": list(PIPELINE_FAMILIES)}]
    (copy / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    run(["git", "init", "-q"], copy)
    run(["git", "-c", "user.email=ci@genflow", "-c", "user.name=ci", "commit", "-qam", "x", "--allow-empty"], copy)
    run(["git", "add", "-A"], copy)
    run(["git", "-c", "user.email=ci@genflow", "-c", "user.name=ci", "commit", "-qm", "project"], copy)
    return copy


def test_dvc_repro_runs_every_stage_and_registers_a_candidate(project):
    output = run(["dvc", "repro"], project)
    for stage in ("synth", "prepare", "featurizer", "report"):
        assert f"Running stage '{stage}'" in output
    report = (project / "reports/index.html").read_text()
    for family in PIPELINE_FAMILIES:
        for stage in ("tune", "train", "evaluate", "register"):
            assert f"Running stage '{stage}@{family}'" in output
        registered = json.loads((project / f"metrics/register/{family}.json").read_text())
        assert registered == {"alias": "candidate", "model": f"celeba64-{family}", "version": 1}
        evaluation = json.loads((project / f"metrics/evaluate/{family}.json").read_text())
        assert evaluation["fd_effnet"] > 0 and evaluation["fd_effnet_n"] == 8
        assert f"<td>{family}</td>" in report
    assert "NOT CelebA" in output  # prepare says loudly that the sample is synthetic
    stats = json.loads((project / "data/shards/stats.json").read_text())
    assert stats["counts"]["train"] == 84 and stats["counts"]["test"] == 36
    evaluation = json.loads((project / "metrics/evaluate/vae.json").read_text())
    assert evaluation["bits_per_dim"] > 0 and evaluation["images"] == 32
    assert evaluation["fd_effnet"] > 0 and evaluation["fd_effnet_n"] == 8 and "recall_effnet" in evaluation
    assert 0 <= json.loads((project / "metrics/featurizer.json").read_text())["accuracy"] <= 1
    assert "<td>vae</td>" in (project / "reports/index.html").read_text()
    tuned = yaml.safe_load((project / "tuned/vae.yaml").read_text())
    assert tuned["models"]["vae"]["kl"]["kind"] in {"constant", "linear", "cyclical", "capacity"}
    trained_with = mlflow_params(project, json.loads((project / "metrics/train/vae.json").read_text())["run_id"])
    assert trained_with["model.kl.kind"] == tuned["models"]["vae"]["kl"]["kind"]  # train@vae used the winner
    registered = json.loads((project / "metrics/register/vae.json").read_text())
    assert registered == {"alias": "candidate", "model": "celeba64-vae", "version": 1}
    curves = (project / "plots/train/vae.csv").read_text().splitlines()
    assert curves[0].startswith("step,") and len(curves) == 7  # header + one row per step
    listing = run([sys.executable, "-m", "genflow.cli", "registry", "list"], project)
    assert "celeba64-vae" in listing and "candidate" in listing

    again = run(["dvc", "repro"], project)
    assert "Data and pipelines are up to date" in again

    # After dvc repro, the CLI finds the run train@vae trained (it applies tuned/vae.yaml, as the stages do).
    evaluated = run([sys.executable, "-m", "genflow.cli", "evaluate", "vae"], project)
    assert "genflow: evaluate vae: applying tuned/vae.yaml" in evaluated
    assert f"(run {json.loads((project / 'metrics/train/vae.json').read_text())['run_id']})" in evaluated
    # Issue 13: what DVC records is what ran. The sample is prepare's hashed dependency; the MLflow
    # runs name the commit and the stage; params that do not decide a result rerun nothing; and
    # register, run again for the same training run, adds no version.
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert any(dep["path"] == "data/sample" and dep["md5"].endswith(".dir") for dep in lock["stages"]["prepare"]["deps"])
    run_id = json.loads((project / "metrics/train/vae.json").read_text())["run_id"]
    import mlflow

    tags = mlflow.MlflowClient(f"sqlite:///{project}/mlflow.db").get_run(run_id).data.tags
    assert tags["genflow.dvc.stage"] == "train@vae"
    assert tags["mlflow.source.git.commit"] == run(["git", "rev-parse", "HEAD"], project).strip()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(log_every=2, checkpoint_every=2, grid_size=4)
    params["data"]["processes"] = 1
    params["evaluate"]["stats_cache"] = "data/other_stats"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = run(["dvc", "status"], project)
    assert all(f"{stage}:" not in status for stage in ("prepare", "train@vae", "evaluate@vae", "register@vae")), status
    forced = run(["dvc", "repro", "--force", "--single-item", "register@vae"], project)
    assert "already holds run" in forced
    assert json.loads((project / "metrics/register/vae.json").read_text())["version"] == 1
