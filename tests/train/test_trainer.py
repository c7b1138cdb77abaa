"""Ray Train end to end on CPU with in-memory data: DDP equivalence, failure recovery, resume,
and the non-finite-loss stop."""

import math
import os
import sys
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import ray.cloudpickle
import torch

from genflow.config import ParamsError
from genflow.models.saved import load_model
from genflow.track.system_metrics import node_id
from genflow.train.loop import InMemoryBatches, NonFiniteLossError, ShardBatches
from genflow.train.trainer import train
from tests.conftest import S3_SECRET, objects_holding

pytestmark = pytest.mark.slow

# The batch sources below travel to the Ray workers, which cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def data(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=generator), (torch.rand(n, 40, generator=generator) > 0.5).float()


class PosteriorMeanBatches(InMemoryBatches):
    """In-memory batches that also make the VAE's reparameterisation noise zero in the worker.

    DDP's claim is about gradients: the two ranks' averaged gradients equal the gradient of the
    combined batch. The ranks draw different noise from their own seeds, so the comparison is
    made where there is none (z = μ).
    """

    def __call__(self, rank, world_size, seed, image_range):
        torch.randn_like = torch.zeros_like
        return super().__call__(rank, world_size, seed, image_range)


class NaNAfter(InMemoryBatches):
    """Batches that turn to NaN from batch `bad` of each epoch on."""

    def __init__(self, images, attrs, batch_size, bad):
        super().__init__(images, attrs, batch_size)
        self.bad = bad

    def __call__(self, rank, world_size, seed, image_range):
        epochs = super().__call__(rank, world_size, seed, image_range)
        plain_epoch = epochs.epoch

        def epoch(index):
            for i, (images, attrs) in enumerate(plain_epoch(index)):
                yield (images * float("nan") if i >= self.bad else images), attrs

        epochs.epoch = epoch
        return epochs


class StallOnce(InMemoryBatches):
    """In-memory batches; rank 0 stalls at batch `index` of epoch `epoch` the first time it gets
    there, until its worker is killed: the kill then lands mid-run, however fast the steps before
    it run. A marker file, holding the stalled worker's process id, makes it once per test, across
    Ray's restart of the workers."""

    def __init__(self, images, attrs, batch_size, epoch, index, marker):
        super().__init__(images, attrs, batch_size)
        self.epoch_number, self.index, self.marker = epoch, index, Path(marker)

    def __call__(self, rank, world_size, seed, image_range):
        epochs = super().__call__(rank, world_size, seed, image_range)
        plain_epoch = epochs.epoch

        def epoch(number):
            for i, batch in enumerate(plain_epoch(number)):
                if rank == 0 and (number, i) == (self.epoch_number, self.index) and not self.marker.exists():
                    self.marker.write_text(str(os.getpid()))
                    time.sleep(300)  # the test kills a worker long before this ends
                yield batch

        epochs.epoch = epoch
        return epochs


class CrashOnce:
    """The shards' batches, but rank 0 crashes (raises) the first time it reaches batch `index`
    of epoch `epoch`; a marker file makes it once per test, across Ray's restart of the workers."""

    def __init__(self, shards, train, epoch, index, marker):
        self.inner, self.epoch, self.index, self.marker = ShardBatches(str(shards), train), epoch, index, Path(marker)

    def __call__(self, rank, world_size, seed, image_range):
        epochs = self.inner(rank, world_size, seed, image_range)
        plain_epoch = epochs.epoch

        def epoch(index):
            for i, batch in enumerate(plain_epoch(index)):
                if rank == 0 and (index, i) == (self.epoch, self.index) and not self.marker.exists():
                    self.marker.touch()
                    raise RuntimeError("a worker crash, staged by the test")
                yield batch

        epochs.epoch = epoch
        return epochs


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())


def final_weights(result):
    return load_model(result.checkpoint_path).state_dict()


def start_steps(run_id):
    return [int(m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, "train/start_step")]


def test_two_ddp_workers_match_one_worker_on_the_combined_batch_and_log_their_nodes_system_metrics(
        ray_local, tiny_params):
    images, attrs = data()
    common = ["train.max_steps=6", "train.checkpoint_every=6", "train.lr=0.001"]
    two = train("vae", tiny_params(*common, "train.workers=2", "train.batch_size=4", "train.run_name=ddp2",
                                   "train.system_metrics_every=0.2"),
                batch_source=PosteriorMeanBatches(images, attrs, 4), dataset_digest="ddp")
    # System metrics (in this test to spare the suite another Ray Train start): both workers run on
    # this one node, whose local rank 0 samples it under the node's name; the driver logs none.
    system = [key for key in mlflow.MlflowClient().get_run(two.mlflow_run_id).data.metrics if key.startswith("system/")]
    node = node_id(0)
    assert f"system/{node}/cpu_utilization_percentage" in system
    assert f"system/{node}/system_memory_usage_megabytes" in system
    assert all(key.startswith(f"system/{node}/") for key in system), system
    one = train("vae", tiny_params(*common, "train.workers=1", "train.batch_size=8", "train.run_name=ddp1"),
                batch_source=PosteriorMeanBatches(images, attrs, 8), dataset_digest="ddp")
    untrained = load_model(two.checkpoint_path).__class__(load_model(two.checkpoint_path).config)
    a, b = final_weights(two), final_weights(one)
    moved = max((a[k] - untrained.state_dict()[k]).abs().max().item() for k in a if a[k].is_floating_point())
    assert moved > 1e-3  # the check below means something only if training moved the weights
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_killed_worker_resumes_from_its_last_checkpoint(ray_local, tiny_params, tmp_path):
    images, attrs = data(256)
    # 256 images, 2 ranks, batches of 8: 16 steps an epoch. Checkpoints at steps 10 and 20; rank 0
    # stalls fetching step 26's batch (epoch 1, batch 9), once, and its worker process is killed
    # (SIGKILL) there, as the OOM killer or a lost node would end it.
    params = tiny_params("train.workers=2", "train.max_steps=30", "train.checkpoint_every=10", "train.log_every=10",
                         "train.max_failures=2", "train.run_name=killed")
    stalled = tmp_path / "stalled"
    killed = []

    def kill_the_stalled_worker():
        deadline = time.time() + 120
        while time.time() < deadline and not (stalled.exists() and stalled.read_text()):
            time.sleep(0.05)
        # The controller collects reports by polling the workers: give it time to register the
        # checkpoint before the worker holding the report dies.
        time.sleep(2)
        process = psutil.Process(int(stalled.read_text()))
        assert any("RayTrainWorker" in part for part in process.cmdline()), process.cmdline()
        process.kill()
        killed.append(process.pid)

    killer = threading.Thread(target=kill_the_stalled_worker)
    killer.start()
    result = train("vae", params, batch_source=StallOnce(images, attrs, 8, epoch=1, index=9, marker=stalled),
                   dataset_digest="kill")
    killer.join()
    assert killed, "no worker was found to kill"
    starts = start_steps(result.mlflow_run_id)
    assert starts[0] == 0 and len(starts) == 2, starts
    assert starts[1] > 0 and starts[1] % 10 == 0  # resumed at a checkpoint, not from 0
    assert result.metrics["step"] == 30


def test_a_run_of_the_same_name_resumes_and_a_longer_one_is_another_run(ray_local, tiny_params):
    images, attrs = data()
    first = train("vae", tiny_params("train.workers=1", "train.max_steps=4", "train.checkpoint_every=2"),
                  batch_source=InMemoryBatches(images, attrs, 8), dataset_digest="resume")
    second = train("vae", tiny_params("train.workers=1", "train.max_steps=4", "train.checkpoint_every=2"),
                   batch_source=InMemoryBatches(images, attrs, 8), dataset_digest="resume")
    assert second.ray_run_name == first.ray_run_name
    assert second.mlflow_run_id == first.mlflow_run_id
    assert start_steps(second.mlflow_run_id) == [0, 4]
    # Issue 8 #3: another max_steps is another LR curve, so another run: from step 0, logging its
    # own max_steps, its learning rate at step 4 halfway down its cosine (not the 4-step run's ~0).
    longer = train("vae", tiny_params("train.workers=1", "train.max_steps=8", "train.checkpoint_every=2"),
                   batch_source=InMemoryBatches(images, attrs, 8), dataset_digest="resume")
    assert longer.ray_run_name != first.ray_run_name
    assert start_steps(longer.mlflow_run_id) == [0] and longer.metrics["step"] == 8
    run = mlflow.MlflowClient().get_run(longer.mlflow_run_id)
    assert run.data.params["train.max_steps"] == "8"
    (lr_key,) = [key for key in run.data.metrics if key.startswith("train/lr")]
    lr = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(longer.mlflow_run_id, lr_key)}
    # Logged at step 4 (4 steps done): the rate the 4th step (index 3) trained with.
    cosine_at_3_of_8 = 0.5 * (1 + math.cos(math.pi * 3 / 8))
    assert lr[4] == pytest.approx(cosine_at_3_of_8 * float(run.data.params["train.lr"]), rel=1e-6)


def test_explicit_run_name_with_changed_params_is_refused_naming_them(ray_local, tiny_params):
    # Issue 8 #4: Ray would restore the old checkpoint under the new params' MLflow run.
    images, attrs = data()
    common = ["train.workers=1", "train.max_steps=2", "train.checkpoint_every=2", "train.run_name=named"]
    train("vae", tiny_params(*common, "train.lr=0.001", "train.weight_decay=0.01"),
          batch_source=InMemoryBatches(images, attrs, 8), dataset_digest="named")
    with pytest.raises(ParamsError, match=r"train\.lr: 0\.001 -> 0\.005; train\.weight_decay: 0\.01 -> 0\.1"):
        train("vae", tiny_params(*common, "train.lr=0.005", "train.weight_decay=0.1"),
              batch_source=InMemoryBatches(images, attrs, 8), dataset_digest="named")


def test_non_finite_loss_stops_naming_the_step_and_keeps_checkpoints_clean_and_a_clean_resume_is_not_poisoned(
        ray_local, tiny_params):
    images, attrs = data()
    # A checkpoint every step: none may be written at the NaN step 3 or after it.
    params = tiny_params("train.workers=2", "train.max_steps=6", "train.checkpoint_every=1", "train.run_name=nan")
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train("vae", params, batch_source=NaNAfter(images, attrs, 4, bad=3), dataset_digest="nan")
    run = mlflow.search_runs(experiment_names=["celeba64"], filter_string="tags.`genflow.ray_run` = 'nan'", output_format="list")[0]
    assert run.info.status == "FAILED"
    checkpoints = checkpoint_dirs(Path(params.train.storage_path, "nan"))
    assert checkpoints
    for checkpoint in checkpoints:
        saved = torch.load(checkpoint / "optimizers.pt", weights_only=False)
        assert saved["step"] <= 3
        assert all(torch.isfinite(v).all() for v in load_model(checkpoint).state_dict().values() if v.is_floating_point())
    # Issue 8 #5: the failure tag belonged to that attempt; resumed on clean data, the run finishes.
    resumed = train("vae", params, batch_source=InMemoryBatches(images, attrs, 4), dataset_digest="nan")
    assert resumed.mlflow_run_id == run.info.run_id and resumed.metrics["step"] == 6


def test_resume_mid_epoch_after_a_crash_is_bit_exact(ray_local, tiny_params, shards, tmp_path):
    # 70 images, 2 ranks of 35, batches of 4: 9 batches an epoch (the last of 3). Checkpoints at
    # steps 5 and 10; rank 0 crashes fetching step 12's batch (epoch 1, batch 3), so the run
    # resumes at step 10: mid-epoch (epoch 1, batch 1), between checkpoints, with a DataLoader
    # worker per rank and the VAE drawing noise from every rank's own RNG.
    common = ["train.workers=2", "train.batch_size=4", "train.max_steps=14", "train.checkpoint_every=5",
              "train.loader_workers=1", "train.max_failures=1"]
    straight = train("vae", tiny_params(*common, "train.run_name=straight"),
                     batch_source=ShardBatches(str(shards), tiny_params(*common).train), dataset_digest="exact")
    # The crashed run also scores its checkpoints (val/* and val/fd_effnet, whose network is built
    # again in the resumed workers): scoring is forked off training's random stream, so the
    # weights must still equal those of the run that scored nothing.
    scored = tiny_params(*common, "train.run_name=crashed", "train.validation_fd=true", "train.validation_batches=1")
    crashed = train("vae", scored,
                    batch_source=CrashOnce(shards, tiny_params(*common).train, 1, 3, tmp_path / "crashed"),
                    dataset_digest="exact", validation_source=InMemoryBatches(*data(8, seed=3), 4))
    assert (tmp_path / "crashed").exists()
    assert start_steps(crashed.mlflow_run_id) == [0, 10]
    fd = mlflow.MlflowClient().get_metric_history(crashed.mlflow_run_id, "val/fd_effnet")
    assert [m.step for m in fd] == [5, 10, 14] and all(m.value > 0 for m in fd)
    a, b = final_weights(straight), final_weights(crashed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_driver_inside_a_ray_job_leaves_the_jobs_env_vars_to_the_job(monkeypatch):
    # Ray refuses a job whose driver's ray.init(runtime_env=...) sets an env var the job's runtime_env
    # sets too ("Failed to merge the Job's runtime env"); `genflow submit` sets the telemetry switches.
    import json

    from genflow._telemetry import TELEMETRY_OFF
    from genflow.train.trainer import without_job_env_vars

    env = {**TELEMETRY_OFF, "RAY_ADDRESS": "10.0.0.1:6379"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert without_job_env_vars(env) == env  # not in a job: every worker needs them all
    job_env = {"DO_NOT_TRACK": "true", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip",
                                                                                  "env_vars": job_env}}))
    assert without_job_env_vars(env) == {k: v for k, v in env.items() if k != "DO_NOT_TRACK"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))  # a job without env vars
    assert without_job_env_vars(env) == env


def weights_at(checkpoint: str, folder: Path) -> dict:
    """The model weights of a checkpoint in a store, downloaded to `folder`."""
    from genflow import storage
    from genflow.models.saved import MODEL_FILE

    folder.mkdir()
    (folder / MODEL_FILE).write_bytes(storage.read_bytes(storage.join(checkpoint, MODEL_FILE)))
    return load_model(folder).state_dict()


def test_shards_checkpoints_and_artifacts_in_a_bucket_and_a_second_run_resumes_from_there(
        ray_local, tiny_params, s3_bucket, tmp_path):
    from genflow import storage
    from genflow.config import DataParams
    from genflow.data.shards import prepare
    from genflow.data.synth import write_sample
    from genflow.data.verify import verified_digest

    write_sample(tmp_path / "sample", n=60, seed=2)
    shards = f"{s3_bucket}/shards"
    prepare(DataParams(source=str(tmp_path / "sample"), shards=shards, processes=1, shard_size=8))
    # 38 training images (42 less 4 held out), batches of 8: 4 batches an epoch; checkpoints at steps 1 and 2.
    common = ["train.workers=1", "train.max_steps=2", "train.checkpoint_every=1", "train.validation_batches=1",
              f"data.shards={shards}", f"train.storage_path={s3_bucket}/ray",
              f"tracking.artifact_location={s3_bucket}/mlartifacts"]
    straight = train("vae", tiny_params(*common, "train.run_name=straight"))
    # The first attempt crashes fetching step 2's batch (max_failures=0: the command fails), after
    # its step-1 checkpoint reached the bucket.
    crashing = tiny_params(*common, "train.run_name=crashed")
    with pytest.raises(Exception, match="a worker crash, staged by the test"):
        train("vae", crashing, batch_source=CrashOnce(shards, crashing.train, 0, 1, tmp_path / "crashed"),
              dataset_digest=verified_digest(shards))
    listed = storage.listdir(f"{s3_bucket}/ray/crashed")
    assert len([name for name, is_folder in listed if is_folder and name.startswith("checkpoint_")]) == 1
    # The same command again: Ray restores the run from the bucket, at step 1, into the same MLflow run.
    resumed = train("vae", tiny_params(*common, "train.run_name=crashed"))
    assert start_steps(resumed.mlflow_run_id) == [0, 1] and resumed.metrics["step"] == 2
    assert resumed.checkpoint_path.startswith(f"{s3_bucket}/ray/crashed/checkpoint_")
    # Bit-exact with the run that never stopped: the restored weights, optimizer state and data
    # position were the checkpoint's.
    a, b = weights_at(straight.checkpoint_path, tmp_path / "a"), weights_at(resumed.checkpoint_path, tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    run = mlflow.MlflowClient().get_run(resumed.mlflow_run_id)
    assert run.info.artifact_uri == f"{s3_bucket}/mlartifacts/{run.info.run_id}/artifacts"
    assert storage.listdir(run.info.artifact_uri)  # the sampler model and the grids, in the bucket
    # The run that read the shards itself (not through the crashing source) names them as its dataset.
    inputs = mlflow.MlflowClient().get_run(straight.mlflow_run_id).inputs.dataset_inputs
    assert [dataset.dataset.source for dataset in inputs] == [f'{{"uri": "{shards}"}}']
    # The workers used their node's credentials (conftest's ray_local): none was saved in the store.
    assert objects_holding(s3_bucket, S3_SECRET) == []


def test_a_storage_path_in_a_missing_bucket_is_refused_before_training(tiny_params, s3_bucket):
    from genflow.storage import StorageError

    missing = s3_bucket.replace("genflow-", "missing-")
    images, attrs = data(16)
    with pytest.raises(StorageError, match=rf"train.storage_path={missing}/ray: the store has no bucket"):
        train("vae", tiny_params(f"train.storage_path={missing}/ray"), batch_source=InMemoryBatches(images, attrs, 8),
              dataset_digest="missing")


def test_no_credential_of_the_store_travels_with_the_trainer(tiny_params, monkeypatch):
    # Ray pickles the trainer (its WorkerConfig, its RunConfig's storage filesystem) to the workers
    # and into the store (Tune's tuner.pkl), and the dashboard shows every runtime_env: each node
    # uses its own credentials; the workers are told only which store.
    from genflow.train.trainer import torch_trainer

    credentials = {"AWS_ACCESS_KEY_ID": "key-id-value", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
                   "AWS_SESSION_TOKEN": "t0ken-value", "AWS_PROFILE": "my-profile"}
    for name, value in {**credentials, "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1"}.items():
        monkeypatch.setenv(name, value)
    trainer = torch_trainer("vae", tiny_params(), name="n", storage="s3://bucket/ray_results",
                            tracking_uri="sqlite:///x.db", mlflow_run_id="r")
    env = trainer.run_config.worker_runtime_env["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000" and env["AWS_REGION"] == "eu-west-1"
    shipped = ray.cloudpickle.dumps(trainer)
    assert not any(value.encode() in shipped for value in credentials.values())
    filesystem = trainer.run_config.storage_filesystem
    assert filesystem.region == "eu-west-1" and b"http://127.0.0.1:9000" in shipped  # which store, in the pickle


def controller_died(last_line: str) -> ray.exceptions.ActorDiedError:
    """What Ray Train 2.60's driver gets when its controller's __init__ raises (as on a node whose
    credentials the store refuses: pyarrow's OSError from StorageContext)."""
    traceback = f'Traceback (most recent call last):\n  File "ray/train/v2/_internal/execution/storage.py"\n{last_line}'
    died = ray.exceptions.RayTaskError("__init__", traceback, OSError(), proctitle="ray::TrainController.__init__")
    return ray.exceptions.ActorDiedError(died)


def test_a_controller_node_the_store_refuses_is_a_storage_error_saying_where_to_set_credentials(
        tiny_params, s3_bucket, monkeypatch):
    from genflow.storage import StorageError
    from genflow.train import trainer

    refused = "OSError: When testing for existence of bucket 'b': AWS Error ACCESS_DENIED during HeadBucket operation"

    def fit(ray_trainer):
        raise controller_died(refused)

    monkeypatch.setattr(trainer, "fit_stoppably", fit)
    monkeypatch.setattr(trainer, "ensure_ray", lambda ray_params: None)
    images, attrs = data(16)
    with pytest.raises(StorageError) as refusal:
        train("vae", tiny_params(f"train.storage_path={s3_bucket}/ray"), batch_source=InMemoryBatches(images, attrs, 8),
              dataset_digest="refused")
    message = str(refusal.value)
    assert message.startswith(f"Ray Train's controller, on a node of the Ray cluster, could not open train.storage_path: "
                              f"{s3_bucket}/ray: the store refused")
    assert "ACCESS_DENIED" in message and "set them on every Ray node" in message and "Traceback" not in message
    [run] = mlflow.search_runs(experiment_names=["celeba64"], output_format="list")
    assert run.info.status == "FAILED"  # the MLflow run ends with the refusal, as with any other failure
    # Anything else the controller dies of, or a local storage's failure, stays Ray's own error.
    with pytest.raises(ray.exceptions.ActorDiedError):
        with trainer.controller_storage_refusals(f"{s3_bucket}/ray"):
            raise controller_died("ValueError: a bad callback")
    with pytest.raises(ray.exceptions.ActorDiedError):
        with trainer.controller_storage_refusals("/tmp/ray"):
            raise controller_died("OSError: disk full")


def test_a_train_workers_print_is_rays_own_so_each_line_shows_once(tiny_params, monkeypatch):
    # Ray 2.60's print patch in Train workers (ray/train/v2/_internal/logging/patch_print.py) both
    # logs and prints each line: the progress line showed twice. The workers' env turns it off.
    import builtins

    from ray.train.v2._internal.logging.patch_print import patch_print_function

    from genflow.train.trainer import torch_trainer

    trainer = torch_trainer("vae", tiny_params(), name="n", storage="ray_results", tracking_uri="sqlite:///x.db",
                            mlflow_run_id="r")
    for name, value in trainer.run_config.worker_runtime_env["env_vars"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(builtins, "print", builtins.print)  # put back after the test, patched or not
    unpatched = builtins.print
    patch_print_function()  # what a Train worker does at its start
    assert builtins.print is unpatched


def test_the_refusal_recognised_is_the_error_ray_trains_own_storage_context_raises(s3_bucket):
    # The controller's __init__ error made as Ray's worker makes it (its traceback, through the
    # pickle to the driver) from Ray Train's own StorageContext on a store that refuses it (a bucket
    # it cannot use): the shape controller_storage_refusals reads is Ray's, not this file's.
    import pickle
    import traceback

    from ray._private.utils import format_error_message
    from ray.train.v2._internal.execution.storage import StorageContext

    from genflow import storage as stores
    from genflow.train.trainer import controller_storage_refusals

    refused = s3_bucket + "-gone/ray"
    fs, path = stores.filesystem(refused)
    with pytest.raises(OSError) as refusal:
        StorageContext(storage_path=path, experiment_dir_name="run", storage_filesystem=fs)
    backtrace = format_error_message("".join(traceback.format_exception(refusal.value)), task_exception=True)
    died = ray.exceptions.ActorDiedError(ray.exceptions.RayTaskError(
        "__init__", backtrace, refusal.value, proctitle="ray::TrainController.__init__", pid=1, ip="10.0.0.2"))
    with pytest.raises(stores.StorageError, match=f"could not open train.storage_path: {refused}: the store refused"):
        with controller_storage_refusals(refused):
            raise pickle.loads(pickle.dumps(died))
