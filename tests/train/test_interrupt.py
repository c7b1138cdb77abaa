"""Ctrl+C and SIGTERM during `genflow train` (a real subprocess on tiny shards): the latest
checkpoint is kept, the run is marked KILLED, the user is told the step and how to resume,
and the rerun continues from that step with one clean metric history.

Needs the loop to speak the widened model protocol (named optimizers): the loop helper's work."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from genflow.data.synth import write_sample
from genflow.train.interrupt import CHECKPOINT_STEP_TAG
from tests.data.conftest import _prepare_into

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LOG_EVERY = 2


def genflow_train(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "genflow.cli", "train", "vae", "--params", "params.yaml", *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def the_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("celeba64").experiment_id])
    return client, run


def checkpoint_step(tmp_path) -> int:
    """The step of the latest checkpoint Ray registered (-1: none yet)."""
    if not (tmp_path / "mlflow.db").exists() or not list((tmp_path / "ray").glob("*/checkpoint_2*")):
        return -1
    try:
        return int(the_run(tmp_path)[1].data.tags.get(CHECKPOINT_STEP_TAG, -1))
    except Exception:  # the store is still being created
        return -1


def interrupt_after_checkpoint(tmp_path, sig, after_step: int) -> int:
    """Start `genflow train`, send `sig` once a checkpoint past `after_step` is written; the
    step it says it stopped at."""
    process = genflow_train(tmp_path)
    deadline = time.monotonic() + 300
    while checkpoint_step(tmp_path) <= after_step:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"genflow: vae: interrupted; last checkpoint at step (\d+) of 100000; run the same command to resume from there", last)
    assert match, err
    # No traceback from the driver (Ray's processes may log warnings of their own, prefixed "(pid=").
    assert not any(line.startswith("Traceback") for line in err.splitlines()), err
    client, run = the_run(tmp_path)
    assert run.info.status == "KILLED"
    return int(match.group(1))


def test_interrupted_training_resumes_from_its_checkpoint_with_one_metric_history(tmp_path):
    write_sample(tmp_path / "sample", n=40, seed=1)
    _prepare_into(tmp_path / "sample", tmp_path / "shards")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"source": str(tmp_path / "sample"), "shards": str(tmp_path / "shards")},
        # Far more steps than the test runs: both runs end by a signal.
        "train": {"workers": 1, "batch_size": 4, "max_steps": 100000, "checkpoint_every": 4, "log_every": LOG_EVERY,
                  "validation_batches": 1, "max_failures": 0, "loader_workers": 0, "storage_path": "ray",
                  "lr_schedule": "constant"},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "models": {"vae": {"hidden_channels": [8, 16, 32, 32], "latent_dim": 8, "norm_groups": 4}},
    }))

    first = interrupt_after_checkpoint(tmp_path, signal.SIGINT, after_step=0)
    # The rerun resumes from the first run's checkpoint (and is itself stopped by SIGTERM).
    second = interrupt_after_checkpoint(tmp_path, signal.SIGTERM, after_step=first)
    assert 0 < first < second

    client, run = the_run(tmp_path)
    assert [int(m.value) for m in client.get_metric_history(run.info.run_id, "train/start_step")] == [0, first]
    # Steps between the checkpoint and the interruption were trained twice and logged once.
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(steps) == len(set(steps)) and set(range(LOG_EVERY, second + 1, LOG_EVERY)) <= set(steps)
