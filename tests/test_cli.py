"""The `genflow` command's expected failures: one line naming what and the fix, non-zero exit;
a genuine bug keeps its traceback."""

import argparse
import errno
import os
import re
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from genflow import cli
from genflow.data import shards as shards_module
from genflow.data.loader import read_stats
from genflow.data.synth import write_sample
from tests.data.conftest import _prepare_into


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder as the working directory, with its own MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("GENFLOW_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}))
    return tmp_path


def fails_in_one_line(capsys, argv, code=2) -> str:
    assert cli.main(argv) == code
    # MLflow's own INFO log lines (creating a new store's tables) aside: genflow says one line.
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if " INFO mlflow." not in line]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if Ray is started: these errors must come before it."""
    import genflow.train.trainer as trainer

    def refuse(*args):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(trainer, "ensure_ray", refuse)


def test_params_naming_a_missing_file_is_an_error(project, capsys):
    err = fails_in_one_line(capsys, ["train", "vae", "--params", "paramz.yaml"])
    assert err.startswith("genflow: error: --params paramz.yaml: no such file")


@pytest.mark.parametrize("argv, source", [
    (["--max-steps", "0"], "from --max-steps 0"),
    (["-S", "train.batch_size=0"], "from -S train.batch_size=0"),
    (["--workers", "0"], "from --workers 0"),
])
def test_a_bad_flag_value_is_reported_as_the_flags_not_params_yaml(project, capsys, argv, source):
    err = fails_in_one_line(capsys, ["train", "vae", *argv])
    assert source in err and "params.yaml" not in err


def test_a_bad_value_in_params_yaml_names_the_file(project, capsys):
    (project / "params.yaml").write_text(yaml.safe_dump({"train": {"lr": -1}}))
    assert "train.lr: Input should be greater than 0 (got -1), from params.yaml" in fails_in_one_line(capsys, ["train", "vae"])


@pytest.mark.parametrize("reference, n, message", [
    ("celeba64-nope@staging", 4, "no registered model 'celeba64-nope'; see `genflow registry list`"),
    ("celeba64-vae@staging", 4, "celeba64-vae no version has alias 'staging'; promote one"),
    ("celeba64-vae/3", 4, "celeba64-vae has no version 3"),
    ("celeba64-vae@staging", 0, "--n 0: the number of images must be at least 1"),
    ("celeba64-vae@staging", -3, "--n -3: the number of images must be at least 1"),
])
def test_sample_of_something_not_there_is_one_line(project, capsys, reference, n, message):
    MlflowClient(f"sqlite:///{project}/mlflow.db").create_registered_model("celeba64-vae")
    err = fails_in_one_line(capsys, ["sample", reference, "--n", str(n), "--out", "grid.png"])
    assert message in err
    assert not (project / "grid.png").exists()


def test_unreachable_tracking_server_is_one_line(project, capsys):
    err = fails_in_one_line(capsys, ["registry", "list", "-S", "tracking.uri=http://127.0.0.1:9"])
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in err


def test_an_unwritable_store_fails_fast_naming_it(project, capsys, no_ray):
    (project / "blocker").write_text("a file where the store's folder would be")
    uri = f"sqlite:///{project}/blocker/mlflow.db"
    for argv in (["registry", "list"], ["registry", "promote", "celeba64-vae", "1", "--to", "staging"]):
        err = fails_in_one_line(capsys, [*argv, "-S", f"tracking.uri={uri}"])
        assert f"MLflow SQLite database {project}/blocker/mlflow.db: {project}/blocker is a file, not a folder" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_store_in_a_read_only_folder_fails_fast_naming_it(project, capsys):
    (project / "ro").mkdir()
    MlflowClient(f"sqlite:///{project}/ro/mlflow.db").search_experiments()  # an existing database
    (project / "ro").chmod(0o555)
    try:
        err = fails_in_one_line(capsys, ["registry", "list", "-S", f"tracking.uri=sqlite:///{project}/ro/mlflow.db"])
    finally:
        (project / "ro").chmod(0o755)
    assert f"MLflow SQLite database {project}/ro/mlflow.db: the folder it is in is not writable" in err


@pytest.fixture
def tiny_shards(project):
    write_sample(project / "sample", n=40, seed=1)
    _prepare_into(project / "sample", project / "shards")
    return project / "shards"


TINY = ["-S", "data.shards=shards", "-S", "models.vae.hidden_channels=[8,16,32,32]", "-S", "models.vae.latent_dim=8",
        "-S", "models.vae.norm_groups=4", "--workers", "1"]


def test_a_corrupted_shard_stops_training_before_ray_starts(tiny_shards, capsys, no_ray):
    shard = tiny_shards / read_stats(tiny_shards)["shards"]["train"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[2000:6000] = bytes(4000)  # pixels zeroed, size kept
    shard.write_bytes(bytes(data))
    assert cli.main(["train", "vae", *TINY]) == 2
    err = capsys.readouterr().err
    assert f"{shard}: content differs from the sha256 stats.json records" in err and "Traceback" not in err


def test_a_missing_shard_stops_training_before_ray_starts(tiny_shards, capsys, no_ray):
    shard = tiny_shards / read_stats(tiny_shards)["shards"]["test"][0]["file"]
    shard.unlink()
    assert cli.main(["train", "vae", *TINY]) == 2
    err = capsys.readouterr().err
    assert f"{shard}: missing" in err and "genflow data prepare" in err and "Traceback" not in err


def test_a_batch_larger_than_the_data_is_refused_before_ray_starts(tiny_shards, capsys, no_ray):
    err = fails_in_one_line(capsys, ["train", "vae", *TINY, "-S", "train.batch_size=64"])
    # 28 train images (40 * 0.7), of which the last 2 are held out for validation.
    assert "train.batch_size=64 (per worker) is more than the 26 training images each of 1 worker(s)" in err
    assert "(26 training images: the train split minus its 2 validation images)" in err


def test_ctrl_c_during_prepare_is_one_line_and_leaves_nothing(project, capsys, monkeypatch):
    write_sample(project / "sample", n=12)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards_module, "_write_splits", interrupted)
    assert cli.main(["data", "prepare", "--source", "./sample", "--out", "shards"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("genflow: data: interrupted; nothing half-written was kept; "
                                            "run the same command again") and "Traceback" not in err
    assert sorted(p.name for p in project.iterdir()) == ["params.yaml", "sample"]


def test_a_full_disk_is_one_line(project, capsys, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device", str(project / "shards" / "train"))

    monkeypatch.setattr(shards_module, "prepare", full)
    err = fails_in_one_line(capsys, ["data", "prepare"])
    assert f"the disk is full writing {project}/shards/train (No space left on device); free space" in err


def test_a_genuine_bug_keeps_its_traceback(project, monkeypatch):
    def bug(*args):
        raise KeyError("a bug")

    monkeypatch.setattr(shards_module, "prepare", bug)
    with pytest.raises(KeyError):
        cli.main(["data", "prepare"])


# --- the surface: help, version -------------------------------------------------------------------


def _parsers(parser, path=("genflow",)):
    """(command path, parser) for the root and every subcommand, however deep."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, (*path, name))


def test_every_subcommand_option_and_argument_has_help():
    missing = []
    for path, parser in _parsers(cli.build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions if choice.help}
                missing += [f"{' '.join(path)} {name}" for name in action.choices if name not in helped]
            elif not (action.help or "").strip():
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"without help text: {missing}"


def test_version_prints_the_package_version(capsys):
    from importlib.metadata import version

    import genflow

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"genflow {version('genflow')}"
    # The version is declared twice (pyproject.toml for the package, genflow.__version__ for a checkout).
    declared = re.search(r'^version = "(.+)"$', (Path(__file__).parents[1] / "pyproject.toml").read_text(), re.M)[1]
    assert genflow.__version__ == declared


# --- tuned params, --run ------------------------------------------------------------------------


def test_tune_writes_the_winner_that_the_family_commands_apply(project, capsys, monkeypatch):
    from genflow.tune import search
    from tests.tune.test_space import fake_result

    monkeypatch.setattr(search, "tune", lambda family, params: fake_result(project))
    assert cli.main(["tune", "vae"]) == 0
    out = capsys.readouterr().out
    for path in ("tuned/vae.yaml", "plots/tune/vae.csv", "plots/tune/vae.png", "metrics/tune/vae.json"):
        assert f"wrote {path}" in out and (project / path).is_file()
    assert cli.main(["tune", "vae"]) == 0
    assert "replaced the earlier tuned/vae.yaml" in capsys.readouterr().out  # its own earlier output, said so
    assert yaml.safe_load((project / "tuned/vae.yaml").read_text())["models"]["vae"]["kl"]["kind"] == "linear"


@pytest.mark.slow
def test_after_training_with_tuned_params_evaluate_and_register_need_no_repeated_overrides(
        tiny_shards, capsys, ray_local):
    project = tiny_shards.parent
    params = yaml.safe_load((project / "params.yaml").read_text())
    params.update(
        data={"shards": "shards"},
        models={"vae": {"hidden_channels": [8, 16, 32, 32], "latent_dim": 8, "norm_groups": 4}},
        train={"workers": 1, "max_steps": 2, "checkpoint_every": 2, "batch_size": 8, "log_every": 1,
               "storage_path": str(project / "ray"), "max_failures": 0},
        evaluate={"batches": 1, "batch_size": 8, "sample_n": 4, "cpu_samples": 6, "kid_subsets": 2,
                  "stats_cache": str(project / "stats")})
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    (project / "tuned").mkdir()
    (project / "tuned/vae.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.002},
                                                            "models": {"vae": {"kl": {"weight": 0.01}}}}))
    assert cli.main(["train", "vae"]) == 0
    captured = capsys.readouterr()
    run_id = re.search(r"^run (\w+): vae trained to step 2", captured.out, re.M)[1]
    assert ("genflow: train vae: applying tuned/vae.yaml: models.vae.kl.weight=0.01, train.lr=0.002; --no-tuned "
            "leaves it out") in captured.err
    assert f"MLflow run {run_id} in sqlite:///{project}/mlflow.db; browse it: mlflow ui" in captured.err
    assert "Ray dashboard http://" in captured.err
    logged = MlflowClient(f"sqlite:///{project}/mlflow.db").get_run(run_id).data.params
    assert (logged["train.lr"], logged["model.kl.weight"]) == ("0.002", "0.01")

    # After `genflow train` (or dvc repro), the next commands find the run with no -S repeated.
    assert cli.main(["evaluate", "vae"]) == 0
    assert cli.main(["register", "vae"]) == 0
    captured = capsys.readouterr()
    assert "genflow: evaluate vae: applying tuned/vae.yaml" in captured.err
    assert "registered celeba64-vae version 1" in captured.out

    # Without the tuned file the params name no run: the error lists the finished ones, with what sets them apart.
    assert cli.main(["register", "vae", "--no-tuned"]) == 2
    err = capsys.readouterr().err
    assert "no finished training run of vae with the current params" in err and "--run RUN_ID" in err
    assert f"  {run_id}  " in err and "train.lr=0.002 (now: 0.0005)" in err and "models.vae.kl.weight=0.01" in err

    # Data that is not here: the runs are listed all the same, and --run names one.
    assert cli.main(["register", "vae", "-S", "data.shards=gone"]) == 2
    err = capsys.readouterr().err
    assert "gone: no such shard folder" in err and f"  {run_id}  " in err and "data.shards=shards (its data" in err
    assert cli.main(["register", "vae", "--no-tuned", "-S", "data.shards=gone", "--run", run_id]) == 0

    # evaluate --run scores the run on the data it trained on, whatever params.yaml now says.
    params["data"]["shards"] = "elsewhere"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli.main(["evaluate", "vae", "--no-tuned", "--run", run_id]) == 0
    assert f"run {run_id} trained on data.shards=shards: evaluating on its test split" in capsys.readouterr().err
