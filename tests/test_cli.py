"""The `genflow` command's expected failures: one line naming what and the fix, non-zero exit;
a genuine bug keeps its traceback."""

import errno
import os

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
