"""The driver side of training: one MLflow run around one Ray Train TorchTrainer.

    genflow train vae --workers 2 --max-steps 300          (or: dvc repro train@vae)

The Ray run's name is the family plus a digest of everything that decides the result (the
family's config, the training params, max_steps and the workers included, the data: see
genflow/track/identity.py). Starting a run whose name already has checkpoints resumes from the
latest one, in Ray and in the same MLflow run; changing a param starts a new run. `train.run_name`
names a run explicitly; reused with changed params it is refused, naming the changed keys.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray
import ray.train
from ray.train.torch import TorchTrainer

from genflow import storage as stores
from genflow._telemetry import TELEMETRY_OFF
from genflow.config import Params, RayParams, flatten
from genflow.data.loader import read_stats
from genflow.models.families import get_family
from genflow.models.saved import MODEL_FILE
from genflow.provenance import provenance_tags
from genflow.train.interrupt import CheckpointLedger, TrainingInterrupted, fit_stoppably, interrupted_message
from genflow.train.loop import BatchSource, NonFiniteLossError, WorkerConfig, train_worker
from genflow.track import mlflow as tracking
from genflow.track.identity import IDENTITY_TAG, check_same_run, identity_key, run_identity
from genflow.track.pyfunc import log_sampler


@dataclass
class TrainResult:
    family: str
    mlflow_run_id: str
    ray_run_name: str
    checkpoint_path: str
    metrics: dict

    def summary(self) -> str:
        return f"{self.family} trained to step {self.metrics.get('step')} (loss {self.metrics.get('loss', float('nan')):.4g}), checkpoint {self.checkpoint_path}"


# The Ray dashboard's address, as ray.init reported it when ensure_ray connected (None: no dashboard).
_dashboard_url: str | None = None


def ensure_ray(ray_params: RayParams) -> None:
    """Connect to the configured cluster, or start Ray locally; a no-op when already connected."""
    global _dashboard_url
    if ray.is_initialized():
        return
    address = ray_params.address or os.environ.get("RAY_ADDRESS") or None
    # Which object store (genflow/storage.py; its credentials are each node's own, and a local
    # Ray's processes inherit this one's) reaches every process of the job: Tune's trials open the
    # Train storage and read the shards' stats themselves.
    env = {**TELEMETRY_OFF, **stores.worker_env()}
    # Every worker is told where its cluster is. Ray's state API, which Train V2's placement-group
    # cleaner calls from a worker, otherwise looks for the cluster among the machine's processes
    # and fails when another Ray runs there: the placement group of a trial that Tune stops
    # (ASHA, Ctrl+C) is then never released.
    if address is None:
        # A local Ray: its GCS port is fixed here, so that it is known before it starts.
        port = _free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        env["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    elif "://" not in address and address != "auto":
        # A GCS address HOST:PORT, as Ray's job supervisor sets RAY_ADDRESS for a submitted job.
        env["RAY_ADDRESS"] = address
    env = without_job_env_vars(env)
    # ray.init installs a SIGTERM handler of its own (sys.exit); genflow's (a SIGTERM is a Ctrl+C:
    # the run is marked KILLED and resumable) must stay in force for the rest of the command.
    users_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        # The dashboard stays on: Ray Train's controller watches its actors through the state API.
        context = ray.init(address=address, runtime_env={"env_vars": env}, logging_level="WARNING")
        url = getattr(context, "dashboard_url", None)
        _dashboard_url = (url if "://" in url else f"http://{url}") if url else None
    except ConnectionError as err:
        raise ConnectionError(f"cannot reach the Ray cluster at {address} ({err}); check ray.address / RAY_ADDRESS, "
                              "or leave it empty to start Ray locally") from None
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, users_sigterm)


def without_job_env_vars(env: dict[str, str]) -> dict[str, str]:
    """`env` less the keys that the Ray job this driver runs in sets already (`genflow submit`
    sets the telemetry switches in the job's runtime_env); all of `env` outside a job.

    Ray merges a job's runtime_env with its driver's ray.init(runtime_env=...) and refuses the
    job when both set the same env var key, even to the same value ("Failed to merge the Job's
    runtime env"); the job's value reaches every worker of the job already.
    """
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR  # set by Ray's job supervisor

    job_config = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    set_by_job = ((job_config.get("runtime_env") or {}).get("env_vars") or {}).keys()
    return {name: value for name, value in env.items() if name not in set_by_job}


def say(line: str) -> None:
    """A line for the person at the console (stderr: stdout carries the command's result)."""
    print(f"genflow: {line}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def train(family: str, params: Params, batch_source: BatchSource | None = None, dataset_digest: str | None = None,
          validation_source: BatchSource | None = None) -> TrainResult:
    """Train `family` with Ray Train, tracked in one MLflow run; returns where the result is.

    batch_source replaces the shards (benchmarks, tests); dataset_digest then names its data;
    validation_source, the held-out batches scored at checkpoints (none with a batch_source alone).
    """
    params.family_config(family)  # bad hyperparameters fail here, before Ray starts
    shards = stores.resolved(params.data.shards)
    if batch_source is None:
        from genflow.data.loader import dataset_digest as shards_digest
        from genflow.data.verify import check_batch_fits

        dataset_digest = shards_digest(shards)  # verified: a bad shard fails here, before Ray starts
        check_batch_fits(shards, params.train.batch_size, params.train.workers)
    identity = run_identity(family, params, dataset_digest or "in-memory")
    key = identity_key(identity)
    name = params.train.run_name or f"{family}-{key}"
    storage = stores.resolved(params.train.storage_path)  # a folder or a URI (s3://, gs://)
    stores.check_bucket(storage, "train.storage_path")
    run_dir = stores.join(storage, name)

    experiment_id = tracking.configure(params.tracking)
    tracking_uri = mlflow.get_tracking_uri()
    earlier = stores.exists(run_dir)
    if earlier:
        check_same_run(experiment_id, name, identity, run_dir)  # Ray would restore it, whatever the params
    # The MLflow run of this Ray run (its checkpoints are what Ray restores), found by the Ray run's
    # name: two names can share params, and the run key alone would reopen the other one's record.
    previous = tracking.find_run_named(experiment_id, name) if earlier else None
    resuming = previous is not None
    # No system metrics from here: on a cluster this is the CPU head, which trains nothing; each
    # node's local rank 0 worker logs its own (genflow/track/system_metrics.py).
    with mlflow.start_run(run_id=previous.info.run_id if resuming else None, run_name=None if resuming else name,
                          experiment_id=experiment_id, log_system_metrics=False) as run:
        if resuming and tracking.FAILURE_TAG in previous.data.tags:
            # The failure an earlier attempt recorded (a non-finite loss) was that attempt's: a clean
            # resume must not read it as its own.
            tracking.with_retries(lambda: mlflow.MlflowClient().delete_tag(run.info.run_id, tracking.FAILURE_TAG))
        if not resuming:
            mlflow.set_tags({tracking.FAMILY_TAG: family, tracking.RUN_KEY_TAG: key, tracking.RAY_RUN_TAG: name,
                             IDENTITY_TAG: json.dumps(identity, sort_keys=True),
                             "genflow.data_source": data_source(shards if batch_source is None else None, params),
                             **provenance_tags()})
            mlflow.log_params(flatten({"model": params.family_config(family), "train": params.train, "data": params.data}))
            if batch_source is None:
                log_dataset(shards, params, dataset_digest)
        ledger = CheckpointLedger(tracking_uri, run.info.run_id, tracking.worker_env(tracking_uri))
        say(f"{family}: {'resuming' if resuming else 'starting'} Ray run {name}; MLflow run "
            + tracking.run_location(tracking_uri, experiment_id, run.info.run_id))
        try:
            ensure_ray(params.ray)
            if _dashboard_url:
                say(f"{family}: Ray dashboard {_dashboard_url}")
            trainer = torch_trainer(family, params, name=name, storage=storage, tracking_uri=tracking_uri,
                                    mlflow_run_id=run.info.run_id, batch_source=batch_source,
                                    validation_source=validation_source, callbacks=[ledger], progress=True)
            with controller_storage_refusals(storage):
                result = fit_stoppably(trainer)
        except KeyboardInterrupt:  # Ctrl+C or SIGTERM: the checkpoints Ray registered are kept
            mlflow.end_run(status="KILLED")
            tags = mlflow.get_run(run.info.run_id).data.tags
            raise TrainingInterrupted(interrupted_message(family, tags, params.train.max_steps)) from None
        failure = mlflow.get_run(run.info.run_id).data.tags.get(tracking.FAILURE_TAG)
        if failure:
            mlflow.end_run(status="FAILED")
            raise NonFiniteLossError(f"{family} run {name}: {failure}; no checkpoint was written after it. "
                                     "Lower train.lr or set train.grad_clip")
        if result.checkpoint is None:
            raise RuntimeError(f"{family} run {name} finished without a checkpoint")
        with result.checkpoint.as_directory() as directory:
            log_sampler(Path(directory) / MODEL_FILE, params.data.size)
            mlflow.log_metrics({f"final/{k}": float(v) for k, v in result.metrics.items()})
        checkpoint = stores.in_ray_storage(result.checkpoint.path, storage)
        return TrainResult(family, run.info.run_id, name, checkpoint, dict(result.metrics))


@contextlib.contextmanager
def controller_storage_refusals(storage: str) -> Iterator[None]:
    """A store's refusal in Ray Train's controller as genflow's StorageError.

    The controller opens train.storage_path first. Ray 2.60 starts it on the driver's node (a
    trial's, under Tune), as a Ray worker process: its credentials are those of the environment Ray
    was started in there, not the driver's shell (genflow passes on no keys: genflow/storage.py).
    Without them the controller dies in its __init__, which reaches the driver as Ray's
    ActorDiedError, pyarrow's message at the end of a long traceback; a driver that has the keys
    itself would not see why."""
    try:
        yield
    except ray.exceptions.ActorDiedError as err:
        message = str(err).strip()
        last = message.splitlines()[-1] if message else ""
        if not (stores.is_remote(storage) and "TrainController.__init__" in message and last.startswith("OSError:")):
            raise
        raise stores.StorageError(f"Ray Train's controller, on a node of the Ray cluster, could not open "
                                  f"train.storage_path: {stores.refusal(storage, OSError(last.removeprefix('OSError:').strip()))}") from None


# Ray 2.60's Train workers patch print() to log each line to Train's logger and, as a Ray worker's
# sys.stdout is not sys.__stdout__, to print it as well: every line on the console twice (the
# progress line of `genflow train` included). Unpatched, a worker's print is Ray's ordinary one.
PRINT_ONCE = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def torch_trainer(family: str, params: Params, *, name: str, storage: str, tracking_uri: str, mlflow_run_id: str,
                  batch_source: BatchSource | None = None, validation_source: BatchSource | None = None,
                  callbacks: list | None = None, progress: bool = False) -> TorchTrainer:
    """The Ray Train TorchTrainer of one run (used by `train`, which asks for rank 0's `progress`
    lines, and by each Tune trial)."""
    worker = WorkerConfig(
        family=family,
        model_class=get_family(family),
        model_config=params.family_config(family),
        train=params.train,
        shards=stores.resolved(params.data.shards),
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
        batch_source=batch_source,
        validation_source=validation_source,
        progress=progress,
    )
    storage_path, storage_filesystem = stores.ray_storage(storage)
    return TorchTrainer(
        functools.partial(train_worker, worker),
        scaling_config=ray.train.ScalingConfig(
            num_workers=params.train.workers,
            use_gpu=params.train.gpu,
            resources_per_worker={"CPU": params.train.cpus_per_worker, **({"GPU": 1} if params.train.gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=params.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Which object store too (never its credentials: each node has its own; genflow/storage.py):
            # the workers read the shards, write the checkpoints and log to MLflow's artifact store.
            worker_runtime_env={"env_vars": {**TELEMETRY_OFF, **tracking.worker_env(tracking_uri), **stores.worker_env(),
                                             **PRINT_ONCE}},
            callbacks=callbacks,
        ),
    )


def data_source(shards: str | None, params: Params) -> str:
    """"sample" or "celeba": what the shards were prepared from, as their stats.json records it
    (data.source may name something else than what prepared the shards training reads); without
    shards (in-memory batches), what the params say."""
    if shards is not None:
        recorded = read_stats(shards).get("source", {}).get("is_sample")
        if recorded is not None:
            return "sample" if recorded else "celeba"
    return "sample" if params.data.is_sample() else "celeba"


def log_dataset(shards: str, params: Params, digest: str) -> None:
    """Record which shards trained the model (MLflow's dataset tracking): a folder, or a URI."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    prepared_from = read_stats(shards).get("source", {})
    is_sample = prepared_from.get("is_sample", params.data.is_sample())
    source = "sample (synthetic, not CelebA)" if is_sample else str(prepared_from.get("path") or params.data.source_path().resolve())
    # A URI's source by its scheme (S3ArtifactDatasetSource, ...); a folder's named as such (the
    # registry would take it for two sources at once, and warn).
    located = resolve_dataset_source(shards) if stores.is_remote(shards) else LocalArtifactDatasetSource(shards)
    dataset = MetaDataset(located, name=f"celeba64 [{source}]", digest=digest[:36])
    mlflow.log_input(dataset, context="training", tags={"source": source})
