"""Run a genflow subcommand on a Ray cluster through the Ray Jobs API.

    genflow submit --address http://localhost:8265 -- train vae --workers 8 --gpu

The address is the Ray dashboard's HTTP address (port 8265). For a cluster started with
`ray up infra/ray/cluster.yaml`, `ray dashboard infra/ray/cluster.yaml` forwards it to
http://localhost:8265; on Kubernetes, `kubectl port-forward svc/genflow-head-svc 8265`.

The job's driver runs `genflow <command>` on the cluster, in a copy of this project that
the client uploads (runtime_env working_dir; data, local MLflow stores and Ray results stay
here). The copy comes first on the job's PYTHONPATH, so the cluster runs the code you have
here. No `pip` runtime_env: the cluster's image (infra/docker/Dockerfile) already has genflow
and its dependencies, and installing torch for every job would take minutes.

The job cannot read or write this machine's files: shards and checkpoints go on a file system
every node mounts (`-S data.shards=/mnt/genflow/shards -S train.storage_path=/mnt/genflow/ray_results`
with infra/), runs to an MLflow tracking server (MLFLOW_TRACKING_URI=http://HOST:5000, which
is passed on to the job).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path
from urllib.parse import urlparse

import yaml

from genflow._telemetry import TELEMETRY_OFF
from genflow.config import PARAMS_FILE, TrackingParams

# Big or local-only things the job has no use for ("/" anchors a pattern at the project root,
# so the package genflow/data/ is kept). Ray itself also skips .git, .venv, __pycache__ and
# what .gitignore files list.
EXCLUDES = ["/data/", "/mlflow.db", "/mlartifacts/", "/mlruns/", "/ray_results/", "/.dvc/cache/"]
CONNECT_TIMEOUT_S = 10


class SubmitError(RuntimeError):
    """The cluster cannot be reached, refused the job, or the job did not succeed."""


def submit(address: str, command: list[str], wait: bool = True, working_dir: str = ".") -> str:
    """Submit `genflow <command...>` to the Ray cluster whose dashboard is at `address`.

    Prints the job id and how to follow it; with `wait`, streams the job's logs until it
    ends and raises `SubmitError` unless it succeeded. Returns the job id.
    """
    from ray.job_submission import JobStatus

    address = address.rstrip("/")
    entrypoint = shlex.join(["genflow", *command])
    client = _connect(address)
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(working_dir))
    except RuntimeError as err:
        raise SubmitError(f"the Ray cluster at {address} refused the job: {err}") from None

    ray_job = f"ray job {{}} {job_id} --address {address}"
    print(f"submitted {job_id}: {entrypoint}")
    print(f"  follow: {ray_job.format('logs -f')}")
    print(f"  stop:   {ray_job.format('stop')}")
    if not wait:
        return job_id

    try:
        asyncio.run(_print_logs(client, job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. To stop it: {ray_job.format('stop')}", file=sys.stderr)
        raise
    info = client.get_job_info(job_id)
    if info.status != JobStatus.SUCCEEDED:
        # The message's first line says why; the log lines Ray appends were streamed above.
        reason = f": {info.message.splitlines()[0]}" if info.message else ""
        raise SubmitError(f"job {job_id} {info.status}{reason}\n  logs: {ray_job.format('logs')}")
    print(f"job {job_id} SUCCEEDED")
    return job_id


def runtime_env(working_dir: str = ".") -> dict:
    """The job's runtime_env: the project (minus EXCLUDES), telemetry off, the tracking URI."""
    env_vars = dict(TELEMETRY_OFF)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env_vars["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    uri = _tracking_uri(Path(working_dir))
    if urlparse(uri).scheme in ("", "file", "sqlite"):
        print(
            f"genflow submit: warning: the MLflow tracking URI {uri!r} is a local store: the job "
            "writes it on the cluster, where you will not see it. Run a tracking server "
            "(infra/mlflow) and set MLFLOW_TRACKING_URI=http://HOST:5000 before submitting.",
            file=sys.stderr,
        )
    return {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env_vars}


def _tracking_uri(working_dir: Path) -> str:
    # The URI the job will use, by genflow.config's rule (the environment wins over params.yaml);
    # params.yaml is read directly: load_params would import every model family.
    params_file = working_dir / PARAMS_FILE
    raw = (yaml.safe_load(params_file.read_text()) if params_file.exists() else None) or {}
    return TrackingParams(**(raw.get("tracking") or {})).resolved_uri()


def _connect(address: str):
    """A JobSubmissionClient for `address`, or a SubmitError that says how to fix the address."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if urlparse(address).scheme not in ("http", "https"):
        raise SubmitError(f"address {address!r}: give the Ray dashboard's URL, e.g. http://HEAD:8265")
    fix = (
        f"cannot reach the Ray dashboard at {address}. Check the address and port (the dashboard "
        "listens on 8265; a cluster started with `ray up` is reachable through `ray dashboard "
        "CLUSTER.yaml` at http://localhost:8265), and that the head was started with "
        "`ray start --head --dashboard-host 0.0.0.0` so that it listens beyond localhost"
    )
    # Ray's client has no timeout: a firewall that drops packets would hang it for minutes.
    try:
        requests.get(f"{address}/api/version", timeout=CONNECT_TIMEOUT_S)
    except requests.RequestException as err:
        raise SubmitError(f"{fix} ({type(err).__name__})") from None

    # Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS replace the address it is given; here the
    # address the user typed wins.
    shadowing = {name: os.environ.pop(name) for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if name in os.environ}
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as err:
        raise SubmitError(f"{fix}: {err}") from None
    except AuthenticationError:
        raise SubmitError(
            f"the Ray cluster at {address} requires its authentication token: set RAY_AUTH_MODE=token "
            "and RAY_AUTH_TOKEN (`ray get-auth-token` on the head node prints it)"
        ) from None
    finally:
        os.environ.update(shadowing)


async def _print_logs(client, job_id: str) -> None:
    # The stream ends when the job does; a dropped connection ends it early, and the
    # status check that follows still tells whether the job succeeded.
    try:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)
    except RuntimeError as err:
        print(f"genflow submit: lost the log stream ({err}); waiting for the job to end", file=sys.stderr)
        await _wait_until_done(client, job_id)


async def _wait_until_done(client, job_id: str) -> None:
    while not client.get_job_status(job_id).is_terminal():
        await asyncio.sleep(2)
