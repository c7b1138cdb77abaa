"""MLflow runs: where they live, how they are found again, and rank-0 logging from workers.

The driver (`genflow train`) owns the MLflow run: it creates or resumes it, logs params and the
dataset, and logs the final model. Rank 0 of the Ray Train workers logs per-step metrics and
sample grids into that same run by id, so no other rank ever talks to the tracking store.
"""

from __future__ import annotations

import os
import queue
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

import genflow  # noqa: F401  (telemetry off before mlflow loads)
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from genflow import storage
from genflow.config import TrackingParams

T = TypeVar("T")

FAMILY_TAG = "genflow.family"
RUN_KEY_TAG = "genflow.run_key"
FAILURE_TAG = "genflow.failure"
RAY_RUN_TAG = "genflow.ray_run"
# genflow.scored.FIELD: what a run's test metrics were scored on (data, split, settings, seed, measures).
SCORED_TAG_PREFIX = "genflow.scored."


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used; the message names the URI."""


def resolve_tracking_uri(tracking: TrackingParams) -> str:
    """The tracking URI, with a relative SQLite path made absolute.

    Ray workers run in their own working directory, so `sqlite:///mlflow.db` must name the
    project's file, not one in each worker's folder.
    """
    uri = tracking.resolved_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


# Where an MLflow client takes a tracking server's login from (also ~/.mlflow/credentials, [mlflow]
# section, the same names in lower case); never the URI, which is printed, logged and passed to jobs.
LOGIN_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _check_reachable(uri: str) -> None:
    if urlsplit(uri).password is not None:  # any scheme: a database URI travels to the workers as well
        where = (f"the login in {' and '.join(LOGIN_VARIABLES)}" if uri.startswith(("http://", "https://"))
                 else "the database's password in its client's variable (PGPASSWORD for PostgreSQL, as infra/ does)")
        raise TrackingError(
            f"the MLflow tracking URI {without_credentials(uri)} carries a password; it is printed, logged and passed "
            f"on to Ray jobs, where others read it. Give the URI without it and {where}")
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            pass
    except (urllib.error.URLError, OSError) as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({err}); start it (see infra/mlflow/) "
            "or unset MLFLOW_TRACKING_URI / tracking.uri to use the local SQLite store"
        ) from None


def check_local_store(uri: str) -> None:
    """A local store (SQLite file, or a folder for file: URIs) must be writable, with room for
    its journal and artifacts beside it: checked at once, not found by SQLAlchemy minutes later."""
    if uri.startswith("sqlite:///"):
        path, kind = Path(uri[len("sqlite:///"):]), "SQLite database"
        folder = path.parent
    elif uri.startswith(("file:", "/", "./", "../")):
        path, kind = Path(uri.removeprefix("file://").removeprefix("file:")), "file store"
        folder = path
    else:
        return
    fix = "make it writable, or point tracking.uri / MLFLOW_TRACKING_URI at a writable store"
    if path.exists() and not (path.is_dir() if kind == "file store" else path.is_file()):
        raise TrackingError(f"MLflow {kind} {path}: exists but is a {'file' if path.is_file() else 'folder'}; {fix}")
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise TrackingError(f"MLflow {kind} {path}: {existing} is a file, not a folder; {fix}")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        what = "the folder it is in" if existing == folder else f"{existing}, where its folder would be made,"
        raise TrackingError(f"MLflow {kind} {path}: {what} is not writable (SQLite writes a journal beside the "
                            f"database, MLflow its artifacts); {fix}")
    if kind == "SQLite database" and path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise TrackingError(f"MLflow {kind} {path}: the file is read-only; {fix}")


def configure(tracking: TrackingParams) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    check_credentials(f"this process (on {socket.gethostname()})")
    uri = resolve_tracking_uri(tracking)
    _check_reachable(uri)
    check_local_store(uri)
    users_choice = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; put back the user's own setting, so
    # that it keeps meaning "the user chose this" for the next params read in this process.
    if users_choice is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = users_choice
    client = MlflowClient(uri)
    chosen = artifact_location(tracking.artifact_location)
    try:  # the first call that a server with authentication checks the login of
        experiment = with_retries(lambda: client.get_experiment_by_name(tracking.experiment))
    except MlflowException as err:
        refusal = login_error(uri, err)
        if refusal is None:
            raise
        raise refusal from None
    if experiment is not None:
        if chosen and experiment.artifact_location.rstrip("/") != chosen:
            print(f"genflow: MLflow experiment {tracking.experiment!r} keeps its artifacts in {experiment.artifact_location} "
                  f"(fixed when it was created); tracking.artifact_location={tracking.artifact_location} applies to a new "
                  "experiment: set tracking.experiment to a new name to use it", file=sys.stderr)
        return experiment.experiment_id
    # With a local database, artifacts go beside it (not into each worker's directory).
    location = chosen or None
    if location is None and uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return with_retries(lambda: client.create_experiment(tracking.experiment, artifact_location=location))


def login_error(uri: str, err: Exception) -> TrackingError | None:
    """What to do about a tracking server's refusal (HTTP 401: no or a wrong login; 403: the user
    may not do that), as one line naming the server; None for any other error."""
    from mlflow.utils.credentials import read_mlflow_creds

    status = err.get_http_status_code() if isinstance(err, MlflowException) else None
    server = without_credentials(uri)
    username = read_mlflow_creds().username
    if status == 401 and not (username or os.environ.get("MLFLOW_TRACKING_TOKEN")):
        return TrackingError(f"the MLflow tracking server {server} requires a login: set {' and '.join(LOGIN_VARIABLES)} "
                             "(the server's admin creates users; see infra/mlflow/README.md)")
    if status == 401:
        return TrackingError(f"the MLflow tracking server {server} refused the login of user {username!r} (HTTP 401): "
                             f"check MLFLOW_TRACKING_PASSWORD (and MLFLOW_TRACKING_USERNAME)")
    if status == 403:
        who = f"user {username!r}" if username else "this login"
        return TrackingError(f"the MLflow tracking server {server} refused {who} that request (HTTP 403, permission "
                             f"denied): ask its admin for EDIT or MANAGE permission ({str(err).splitlines()[0]})")
    return None


def artifact_location(location: str) -> str:
    """tracking.artifact_location as MLflow takes it: a URI as it is (s3://, gs://: MLflow writes
    there with boto3 / google-cloud-storage, MLFLOW_S3_ENDPOINT_URL or AWS_ENDPOINT_URL naming an
    S3-compatible server), a folder as a file:// URI; "" for none. An unknown scheme is refused."""
    if not location:
        return ""
    if storage.is_remote(location):
        return storage.resolved(location)
    return Path(storage.resolved(location)).as_uri()


def with_retries(action: Callable[[], T], attempts: int = 8) -> T:
    """Run a tracking call, retrying while SQLite is locked by another writer.

    The default store is one SQLite file; the driver, rank 0 and concurrent Tune trials all
    write to it, and SQLite answers a busy writer with "database is locked".
    """
    for attempt in range(attempts):
        try:
            return action()
        except Exception as err:  # MlflowException wraps sqlalchemy's OperationalError
            if "database is locked" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * 2**attempt * (1 + random.random()))
    raise AssertionError("unreachable")


def find_run(experiment_id: str, family: str, run_key: str, client: MlflowClient | None = None):
    """The newest MLflow run of this family trained with these params (the same run key), or None."""
    client = client or MlflowClient()
    runs = with_retries(
        lambda: client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{FAMILY_TAG}` = '{family}' and tags.`{RUN_KEY_TAG}` = '{run_key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    )
    return runs[0] if runs else None


def find_run_named(experiment_id: str, ray_run: str, client: MlflowClient | None = None):
    """The newest MLflow run that tracked the Ray run `ray_run`, or None."""
    client = client or MlflowClient()
    runs = with_retries(lambda: client.search_runs([experiment_id], filter_string=f"tags.`{RAY_RUN_TAG}` = '{ray_run}'",
                                                   order_by=["attributes.start_time DESC"], max_results=1))
    return runs[0] if runs else None


def run_location(uri: str, experiment_id: str, run_id: str) -> str:
    """Where to look at a run: its page on a tracking server, or (a local store) the command that
    serves one, and the page's address there."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    uri = without_credentials(uri)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    if uri.startswith(("sqlite:", "file:", "/", "./", "../", "postgresql", "mysql")):
        return f"{run_id} in {uri}; browse it: mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/{page}"
    return f"{run_id} in {uri}"


def without_credentials(uri: str) -> str:
    """`uri` less any user:password@ (a postgresql:// store's, a server's): printed lines end up in
    job logs that others read."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=host))


def record_scoring(run_id: str, scored_on: dict[str, Any]) -> None:
    """Tag the run with what its test metrics were scored on (SCORED_TAG_PREFIX + field)."""
    client = MlflowClient()
    for field, value in scored_on.items():
        with_retries(lambda: client.set_tag(run_id, SCORED_TAG_PREFIX + field, str(value)))


def scoring_of(tags: dict[str, str]) -> dict[str, str]:
    """{field: value} of the scoring tags among a run's or a model version's tags."""
    return {k[len(SCORED_TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(SCORED_TAG_PREFIX)}


class RankZeroLogger:
    """Logs from the rank-0 training worker into the driver's MLflow run, off the training thread.

    Every call only queues the work: one background thread talks to the tracking store, so a slow
    store (SQLite locked by a Tune trial, a remote server) never stalls rank 0, and through the
    next all-reduce, every other rank. `flush()` waits until everything queued is written (the
    loop calls it before each checkpoint report and at the end, so nothing is lost); an error of
    the thread is raised in the training thread by the next call.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        # A resumed run repeats the steps between its checkpoint and the interruption: their
        # points are in the history already and are not logged twice (one value per step).
        self.logged_through = self._last_logged_steps()
        self.images_through = self._last_image_steps()
        self._queue: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="genflow-mlflow-logger", daemon=True)
        self._thread.start()

    def _last_logged_steps(self) -> dict[str, int]:
        keys = with_retries(lambda: self.client.get_run(self.run_id)).data.metrics
        return {key: max((m.step for m in with_retries(lambda: self.client.get_metric_history(self.run_id, key))), default=-1)
                for key in keys if not key.startswith("system/")}

    def _last_image_steps(self) -> dict[str, int]:
        # MLflow stores a step-keyed image as images/KEY+step+STEP+timestamp+...png.
        steps: dict[str, int] = {}
        for artifact in with_retries(lambda: self.client.list_artifacts(self.run_id, "images")):
            key, _, rest = Path(artifact.path).name.partition("+step+")
            step = rest.partition("+")[0]
            if step.isdigit():
                steps[key] = max(steps.get(key, -1), int(step))
        return steps

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Values may be tensors: they are read (and a GPU waited for) on the logging thread."""
        now = int(time.time() * 1000)
        fresh = {key: value for key, value in metrics.items() if step > self.logged_through.get(key, -1)}
        if fresh:
            self._submit(lambda: self.client.log_batch(
                self.run_id, metrics=[Metric(key, float(value), now, step) for key, value in fresh.items()]))

    def log_image(self, image: Any, key: str, step: int) -> None:
        """Log a PIL image as MLflow's step-keyed image `key` at `step` (the run page's image view,
        with a step slider), e.g. the sample grid `samples` at step 100. As with metrics, a resumed
        run does not log again a step it logged before its interruption."""
        if step <= self.images_through.get(key, -1):
            return
        self._submit(lambda: self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True))

    def say(self, line: Callable[[], str]) -> None:
        """Print `line()` on the console, in order with the logging: it runs on the logging thread,
        so reading a GPU value for it never stalls training."""
        self._submit(lambda: print(line(), flush=True))

    def set_tag(self, key: str, value: str) -> None:
        self._submit(lambda: self.client.set_tag(self.run_id, key, value))

    def flush(self) -> None:
        """Wait until every queued call is written; raise the logging thread's error, if any."""
        self._queue.join()
        self._raise_error()

    def close(self) -> None:
        """Flush, then stop the thread."""
        self._queue.put(None)
        self._thread.join()
        self._raise_error()

    def _submit(self, action: Callable[[], Any]) -> None:
        self._raise_error()
        if not self._thread.is_alive():
            raise RuntimeError("RankZeroLogger is closed")
        self._queue.put(action)

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise TrackingError(f"logging to MLflow run {self.run_id} failed: {error!r}") from error

    def _work(self) -> None:
        while True:
            action = self._queue.get()
            try:
                if action is None:
                    return
                if self._error is None:  # after an error, drop the rest: it is raised once
                    with_retries(action)
            except BaseException as error:  # noqa: BLE001 (handed to the training thread)
                self._error = error
            finally:
                self._queue.task_done()


# MLflow's credential variables. Never sent in a Ray runtime_env (the Ray dashboard shows its
# env_vars to anyone who reaches it): a local Ray's workers inherit them from the process that
# started Ray, a cluster's nodes carry them from the cluster's secret (infra/).
CREDENTIALS = (*LOGIN_VARIABLES, "MLFLOW_TRACKING_TOKEN")
# The names (never the values) of the credential variables the driver uses, so that a process
# without them fails at once, naming them, instead of at its first 401.
CREDENTIALS_NEEDED = "GENFLOW_MLFLOW_CREDENTIALS"


def credentials_in_use() -> list[str]:
    """The credential variables this process authenticates with, or was told it needs."""
    told = [name for name in os.environ.get(CREDENTIALS_NEEDED, "").split(",") if name]
    return sorted({*told, *(name for name in CREDENTIALS if os.environ.get(name))})


def check_credentials(where: str) -> None:
    """Refuse to start where the credential variables the driver uses are missing."""
    missing = [name for name in os.environ.get(CREDENTIALS_NEEDED, "").split(",") if name and not os.environ.get(name)]
    if missing:
        raise TrackingError(
            f"{where} has no {', '.join(missing)}, which the MLflow tracking server needs: genflow does not send "
            "credentials through Ray (the Ray dashboard shows a job's environment to anyone who reaches it). Set "
            f"{', '.join(missing)} on every node of the Ray cluster (the KubeRay/`ray up` configs in infra/ take them "
            "from the cluster's secret), or, for a local Ray, in the environment before Ray starts")


def worker_env(tracking_uri: str) -> dict[str, str]:
    """Environment that lets a Ray worker reach the same store (also on a remote node): where it
    is and which credential variables it needs, never their values (see CREDENTIALS)."""
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    if "MLFLOW_S3_ENDPOINT_URL" in os.environ:
        env["MLFLOW_S3_ENDPOINT_URL"] = os.environ["MLFLOW_S3_ENDPOINT_URL"]
    if credentials_in_use():
        env[CREDENTIALS_NEEDED] = ",".join(credentials_in_use())
    return env
