"""The one rule for tuned params: params.yaml, then tuned/FAMILY.yaml, then the command's own
flags and -S, which win; --no-tuned leaves the file out; an absent file changes nothing."""

import pytest
import yaml

from genflow.config import ParamsError
from genflow.tune.report import output_paths, write_outputs
from genflow.tune.tuned import family_params
from tests.tune.test_space import fake_result


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.0005, "max_steps": 50}}))
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned/vae.yaml").write_text(yaml.safe_dump(
        {"train": {"lr": 0.002, "weight_decay": 0.01}, "models": {"vae": {"latent_dim": 16, "kl": {"kind": "linear"}}}}))
    return tmp_path


def test_the_tuned_file_sits_between_params_yaml_and_the_commands_own_overrides(project):
    params, tuned = family_params("vae", None, ["train.lr=0.003", "train.max_steps=7"])
    assert params.train.lr == 0.003  # -S wins over the tuned file
    assert params.train.weight_decay == 0.01 and params.train.max_steps == 7
    config = params.family_config("vae")
    assert config.latent_dim == 16 and config.kl.kind == "linear"
    assert tuned.overridden == ["train.lr"]
    line = tuned.describe("train vae")
    assert line.startswith("genflow: train vae: applying tuned/vae.yaml: ")
    for shown in ("train.weight_decay=0.01", "models.vae.latent_dim=16", 'models.vae.kl.kind="linear"'):
        assert shown in line
    assert "train.lr=0.002" not in line and "your -S/flags set train.lr instead" in line and "--no-tuned" in line


def test_a_section_override_wins_over_every_tuned_key_inside_it(project):
    params, tuned = family_params("vae", None, ['models.vae={"latent_dim": 4}'])
    assert params.family_config("vae").latent_dim == 4 and params.family_config("vae").kl.kind != "linear"
    assert sorted(tuned.overridden) == ["models.vae.kl.kind", "models.vae.latent_dim"]


def test_no_tuned_and_a_missing_file_leave_params_yaml_alone(project):
    params, tuned = family_params("vae", None, [], use_tuned=False)
    assert tuned is None and params.train.lr == 0.0005 and params.train.weight_decay == 0.0
    params, tuned = family_params("ae", None, [])  # no tuned/ae.yaml
    assert tuned is None and params.train.lr == 0.0005


def test_a_bad_value_in_the_tuned_file_is_reported_as_the_files(project):
    (project / "tuned/vae.yaml").write_text(yaml.safe_dump({"train": {"lr": -1}}))
    with pytest.raises(ParamsError, match=r"train.lr: .* from tuned/vae.yaml"):
        family_params("vae", None, [])


def test_the_cli_and_the_dvc_stage_write_the_same_outputs(tmp_path):
    # pipelines/tune.py and `genflow tune` both call write_outputs: the DVC stage's outs.
    result = fake_result(tmp_path)
    written = write_outputs(result, tmp_path)
    assert written == output_paths("vae", tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "tuned/vae.yaml", "plots/tune/vae.csv", "plots/tune/vae.png", "metrics/tune/vae.json"]
    assert all(p.stat().st_size > 0 for p in written)
    assert yaml.safe_load((tmp_path / "tuned/vae.yaml").read_text())["train"]["lr"] == 1e-3


def finished_vae_search(uri: str, tmp_path):
    """(client, experiment id, its result) of a finished vae search logged in the celeba64
    experiment of the MLflow store at `uri` as `genflow tune` logs one (its parent run:
    result.mlflow_run_id, named tune-vae-x)."""
    from mlflow import MlflowClient

    from genflow.track.mlflow import FAMILY_TAG
    from genflow.tune.report import SEARCH_TAG
    from genflow.tune.search import log_search

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("celeba64").experiment_id
    parent = client.create_run(experiment, tags={SEARCH_TAG: "tune-vae-x", FAMILY_TAG: "vae"}).info.run_id
    result = fake_result(tmp_path)
    result.mlflow_run_id = parent
    log_search(client, result)
    client.set_terminated(parent, "FINISHED")
    return client, experiment, result


def test_tuned_pull_writes_the_winner_a_search_logged_on_its_run(tmp_path, monkeypatch, capsys):
    # `genflow submit -- tune vae` writes tuned/vae.yaml in the job's throwaway copy; the search
    # also logs it on its parent run, from where `genflow tuned pull` writes it here.
    from genflow.cli import main
    from genflow.track.mlflow import FAMILY_TAG
    from genflow.tune.report import SEARCH_TAG, write_tuned

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store = ["-S", f"tracking.uri={uri}"]
    assert main(["tuned", "pull", "vae", *store]) == 2
    assert "no finished vae search" in capsys.readouterr().err
    client, experiment, result = finished_vae_search(uri, tmp_path)
    parent = result.mlflow_run_id

    assert main(["tuned", "pull", "vae", *store]) == 0
    write_tuned(result, tmp_path / "expected.yaml")
    assert (tmp_path / "tuned/vae.yaml").read_text() == (tmp_path / "expected.yaml").read_text()
    said = capsys.readouterr().out
    assert said.startswith(f"wrote tuned/vae.yaml: the winner of the vae search tune-vae-x (MLflow run {parent}): ")
    assert "train.lr=0.001" in said
    params, tuned = family_params("vae", None, [])
    assert params.train.lr == 1e-3 and tuned is not None  # every vae command applies it now

    assert main(["tuned", "pull", "vae", "--run", parent, *store]) == 0
    assert capsys.readouterr().out.startswith("already had tuned/vae.yaml: the winner")  # the same winner
    (tmp_path / "tuned/vae.yaml").write_text((tmp_path / "tuned/vae.yaml").read_text() + "# edited\n")
    assert main(["tuned", "pull", "vae", "--run", parent, *store]) == 0
    assert capsys.readouterr().out.startswith("replaced the earlier tuned/vae.yaml")
    assert (tmp_path / "tuned/vae.yaml").read_text() == (tmp_path / "expected.yaml").read_text()
    assert main(["tuned", "pull", "dcgan", "--run", parent, *store]) == 2
    assert f"--run {parent}: a vae search; give the run of a dcgan search" in capsys.readouterr().err
    unfinished = client.create_run(experiment, tags={SEARCH_TAG: "tune-vae-y", FAMILY_TAG: "vae"}).info.run_id
    assert main(["tuned", "pull", "vae", "--run", unfinished, *store]) == 2
    assert "has no tune/vae.yaml: the search has not finished" in capsys.readouterr().err
    client.set_terminated(unfinished, "KILLED")
    assert main(["tuned", "pull", "vae", "--run", unfinished, *store]) == 2
    assert "(tune-vae-y, KILLED) has no tune/vae.yaml: the search was interrupted" in capsys.readouterr().err


def test_tuned_pull_reports_a_refusing_artifact_store_as_such_not_as_an_unfinished_search(
        tmp_path, monkeypatch, capsys, s3_bucket):
    from moto import settings

    from genflow.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store = ["-S", f"tracking.uri={uri}", "-S", f"tracking.artifact_location={s3_bucket}/mlartifacts"]
    assert main(["tuned", "pull", "vae", *store]) == 2  # creates the experiment, its artifacts in the bucket
    capsys.readouterr()
    parent = finished_vae_search(uri, tmp_path)[2].mlflow_run_id
    assert main(["tuned", "pull", "vae", *store]) == 0  # from the bucket
    pulled = (tmp_path / "tuned/vae.yaml").read_text()

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks the keys from here
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKEY")
    capsys.readouterr()
    for run in ([], ["--run", parent]):
        assert main(["tuned", "pull", "vae", *run, *store]) == 2
        said = capsys.readouterr().err
        assert f"{s3_bucket}/mlartifacts/{parent}/artifacts/tune/vae.yaml: the store refused or could not be reached" in said
        assert "AWS_ACCESS_KEY_ID" in said and "not finished" not in said
    assert (tmp_path / "tuned/vae.yaml").read_text() == pulled
