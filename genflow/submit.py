"""Run a genflow subcommand on a Ray cluster through the Ray Jobs API, list its jobs, stop one.

    genflow submit --address http://localhost:8265 -- train vae --workers 8 --gpu \
        -S data.shards=/mnt/genflow/shards -S train.storage_path=/mnt/genflow/ray_results
    genflow submit --address http://localhost:8265 --list
    genflow submit --address http://localhost:8265 --stop raysubmit_XYZ

The address is the Ray dashboard's HTTP address (port 8265). For a cluster started with
`ray up infra/ray/cluster.yaml`, `ray dashboard infra/ray/cluster.yaml` forwards it to
http://localhost:8265; on Kubernetes, `kubectl port-forward svc/genflow-head-svc 8265`.
A cluster with token authentication (Ray 2.60: `ray get-auth-token` on the head prints the
token) takes it from the environment, as Ray's own clients do: RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN=... (or RAY_AUTH_TOKEN_PATH).

The job's driver runs `genflow <command>` on the cluster, in a copy of this project that
the client uploads (runtime_env working_dir; data, local MLflow stores and Ray results stay
here). The copy comes first on the job's PYTHONPATH, so the cluster runs the code you have
here, and its params.yaml is the job's. No `pip` runtime_env: the cluster's image
(infra/docker/Dockerfile) already has genflow and its dependencies, and installing torch for
every job would take minutes.

The job cannot read or write this machine's files: shards and checkpoints go on a file system
every node mounts (`-S data.shards=/mnt/genflow/shards -S train.storage_path=/mnt/genflow/ray_results`
with infra/) or in an object store (`s3://BUCKET/shards`, `s3://BUCKET/ray_results`: genflow/storage.py;
the endpoint and region set here are passed on, the credentials are the nodes' own), runs to an
MLflow tracking server (MLFLOW_TRACKING_URI=http://HOST:5000, which is passed on to the job). A
relative path there would name a folder in the job's throwaway copy of the project, so the command
is checked here first (its arguments, its params, those paths) and refused before anything is
uploaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from genflow._telemetry import TELEMETRY_OFF
from genflow.config import PARAMS_FILE, Params, ParamsError

# Ray's switch for its .gitignore reading when it uploads a working_dir (ray._private.ray_constants).
RAY_RUNTIME_ENV_IGNORE_GITIGNORE = "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"

# Big or local-only things the job has no use for ("/" anchors a pattern at the project root,
# so the package genflow/data/ is kept; /sample is the link to data/sample); the git history
# too (the commit travels as GENFLOW_GIT_COMMIT, see genflow/provenance.py). What the
# .gitignore files list is skipped as well, except the tuned params (upload_excludes).
EXCLUDES = ["/data/", "/sample", "/mlflow.db", "/mlartifacts/", "/mlruns/", "/ray_results/", "/.dvc/cache/", "/.git"]
CONNECT_TIMEOUT_S = 10
LOG_TAIL_LINES = 15  # of a failed job's log, repeated in the error: its own error is at the end

# The params naming places that each subcommand reads or writes (data.source: its folder).
PLACES = {
    "data prepare": ("data.source", "data.shards"),
    "train": ("data.shards", "train.storage_path", "tracking.uri"),
    "tune": ("data.shards", "train.storage_path", "tracking.uri"),
    "evaluate": ("data.shards", "tracking.uri"),
    "register": ("data.shards", "tracking.uri"),  # finds its run by the data's digest
    "registry": ("tracking.uri",),
    "sample": ("tracking.uri",),
    "report": ("tracking.uri",),
}


class SubmitError(RuntimeError):
    """The cluster cannot be reached, refused the job, or the job did not succeed."""


def submit(address: str, command: list[str], wait: bool = True, working_dir: str = ".") -> str:
    """Submit `genflow <command...>` to the Ray cluster whose dashboard is at `address`.

    The command is checked first (see check_command). Prints the job id and how to follow it;
    with `wait`, streams the job's logs until it ends and raises `SubmitError` (with the end of
    its log) unless it succeeded. Returns the job id.
    """
    from ray.job_submission import JobStatus

    tracking_uri = check_command(command, Path(working_dir))
    address = address.rstrip("/")
    entrypoint = shlex.join(["genflow", *command])
    client = _connect(address)
    # The .gitignore files are in the excludes already (upload_excludes), less the tuned params.
    ignoring = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE)
    os.environ[RAY_RUNTIME_ENV_IGNORE_GITIGNORE] = "1"
    try:
        job_env = runtime_env(working_dir)
        servers = dict(job_env["env_vars"])
        if tracking_uri and "MLFLOW_TRACKING_URI" not in servers:  # the params' tracking.uri (-S, params.yaml)
            servers["tracking.uri"] = tracking_uri
        warn_of_this_machine(servers, address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=job_env)
    except RuntimeError as err:
        raise SubmitError(f"the Ray cluster at {address} refused the job: {err}") from None
    finally:
        if ignoring is None:
            os.environ.pop(RAY_RUNTIME_ENV_IGNORE_GITIGNORE)
        else:
            os.environ[RAY_RUNTIME_ENV_IGNORE_GITIGNORE] = ignoring

    ray_job = f"ray job {{}} {job_id} --address {address}"
    print(f"submitted {job_id}: {entrypoint}")
    print(f"  follow: {ray_job.format('logs -f')}")
    print(f"  stop:   genflow submit --address {address} --stop {job_id}")
    if not wait:
        return job_id

    try:
        asyncio.run(_print_logs(client, job_id))
    except KeyboardInterrupt:
        # Not the CLI's "interrupted; run the same command again": that would submit a second job.
        print(f"\nstopped following; the job goes on. To stop it: genflow submit --address {address} --stop {job_id}",
              file=sys.stderr)
        raise SystemExit(130) from None
    info = client.get_job_info(job_id)
    if info.status != JobStatus.SUCCEEDED:
        # Ray's message says why in its first line ("...failed with exit code 2"), then appends the
        # whole log; the log's last lines hold the command's own error.
        reason = f": {info.message.splitlines()[0].split(', last available logs')[0]}" if info.message else ""
        tail = "\n".join(f"    {line}" for line in client.get_job_logs(job_id).rstrip().splitlines()[-LOG_TAIL_LINES:])
        raise SubmitError(f"job {job_id} {info.status}{reason}\n  the end of its log:\n{tail}\n"
                          f"  the whole log: {ray_job.format('logs')}")
    print(f"job {job_id} SUCCEEDED")
    if command[:1] == ["tune"] and len(command) > 1 and not command[1].startswith("-"):
        # The job wrote the winner into its throwaway copy of the project; it is also on the
        # search's MLflow run, from where `genflow tuned pull` writes it here.
        tracking = [arg for flag, arg in zip(command, command[1:]) if flag in ("-S", "--set") and arg.startswith("tracking.")]
        pull = ["genflow", "tuned", "pull", command[1], *[part for arg in tracking for part in ("-S", arg)]]
        print(f"the winner is on the search's MLflow run; to apply it to {command[1]} commands here, "
              f"write tuned/{command[1]}.yaml: {shlex.join(pull)}")
    return job_id


def list_jobs(address: str) -> str:
    """The jobs of the cluster at `address`, oldest first, as a table (what `ray job list` lists)."""
    address = address.rstrip("/")
    jobs = sorted(_connect(address).list_jobs(), key=lambda job: job.start_time or 0)
    if not jobs:
        return f"no jobs on the Ray cluster at {address}"
    rows = [("JOB", "STATUS", "STARTED (UTC)", "DURATION", "ENTRYPOINT")]
    for job in jobs:
        started = datetime.fromtimestamp(job.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if job.start_time else "-"
        seconds = ((job.end_time or time.time() * 1000) - job.start_time) / 1000 if job.start_time else None
        duration = "-" if seconds is None else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
        rows.append((job.submission_id or job.job_id or "-", str(job.status), started, duration, job.entrypoint or ""))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows)


def stop_job(address: str, job_id: str, wait: bool = True) -> str:
    """Stop job `job_id` (as `ray job stop`); with `wait`, until it has stopped. Returns what happened."""
    address = address.rstrip("/")
    client = _connect(address)
    try:
        status = client.get_job_status(job_id)
    except RuntimeError:
        raise SubmitError(f"no job {job_id} on the Ray cluster at {address}; "
                          f"`genflow submit --address {address} --list` lists its jobs") from None
    if status.is_terminal():
        return f"job {job_id} already ended ({status}); nothing to stop"
    client.stop_job(job_id)
    if not wait:
        return f"job {job_id}: stop requested"
    asyncio.run(_wait_until_done(client, job_id))
    return f"job {job_id} {client.get_job_status(job_id)}"


def check_command(command: list[str], project: Path) -> str | None:
    """Refuse, before anything is uploaded, a command that would fail or lose its results there;
    return the tracking URI the job will use (None for a command that uses none).

    The command is parsed as `genflow` parses it and its params are loaded as the job will load
    them (the project's params file, its -S overrides and flags, MLFLOW_TRACKING_URI); a relative
    path among the places it uses (PLACES) would name a folder in the job's copy of the project,
    where data/ is not uploaded and what is written is lost with the copy.
    """
    from genflow.cli import build_parser, data_prepare_flags

    parsed = io.StringIO()
    try:
        with contextlib.redirect_stdout(parsed), contextlib.redirect_stderr(parsed):
            args = build_parser().parse_args(command)
    except SystemExit as done:
        if done.code == 0:  # --help: nothing to check
            return None
        raise SubmitError(f"`genflow {shlex.join(command)}` is not a genflow command; nothing was submitted:\n"
                          f"{parsed.getvalue().rstrip()}") from None
    name = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    if name == "data synth" and not Path(args.out).is_absolute():
        _refuse_relative({"OUT": args.out})
    if name not in PLACES:
        return None
    params_file = project / (args.params or PARAMS_FILE)
    if args.params is not None and not params_file.is_file():
        raise SubmitError(f"--params {args.params}: no such file in {project}, which the job runs in a copy of")
    flags = data_prepare_flags(args) if name == "data prepare" else {}
    params = _load(params_file, [*flags, *(args.set or [])], flags)
    places = {key: _place(params, key) for key in PLACES[name]}
    local = {key: _local_path(value) for key, value in places.items()}
    _refuse_relative({key: places[key] for key, path in local.items() if path is not None and not Path(path).is_absolute()})
    uri = places.get("tracking.uri")
    if local.get("tracking.uri"):
        print(f"genflow submit: warning: the MLflow tracking URI {uri!r} is a local store: the job writes it on the "
              "cluster node it runs on, where you will not see it unless every node and this machine share that "
              "folder. Run a tracking server (infra/mlflow) and set MLFLOW_TRACKING_URI=http://HOST:5000 before "
              "submitting.", file=sys.stderr)
    return uri


def _load(params_file: Path, overrides: list[str], flags: dict[str, str]) -> Params:
    from genflow.config import load_params

    try:
        return load_params(params_file, overrides, flags=flags)
    except ParamsError as err:
        raise SubmitError(f"{err}; nothing was submitted") from None


def _place(params: Params, key: str) -> str:
    """The place a params key names (the data source `sample` is data.sample.dir's)."""
    if key == "data.source":
        return str(params.data.source_path())
    if key == "tracking.uri":
        return params.tracking.resolved_uri()
    section, name = key.split(".")
    return getattr(getattr(params, section), name)


def _local_path(place: str) -> str | None:
    """The folder or file a path or local store URI (sqlite:///, file:) names; None for a server's URI."""
    scheme = urlparse(place).scheme
    if scheme == "sqlite":
        return place.removeprefix("sqlite://").removeprefix("/")  # sqlite:///rel.db, sqlite:////abs.db
    if scheme == "file":
        return urlparse(place).path
    return place if scheme == "" else None


def _refuse_relative(relative: dict[str, str]) -> None:
    if relative:
        named = ", ".join(f"{key}={value}" for key, value in relative.items())
        raise SubmitError(
            f"{named}: relative, so on the cluster it names a place in the job's temporary copy of this project, "
            "which holds no data/ and is discarded with what is written there. Give places every node reaches: "
            "-S data.shards=/mnt/genflow/shards -S train.storage_path=/mnt/genflow/ray_results (a mount every node "
            "shares, or an absolute path on a one-machine cluster), or s3://BUCKET/shards and s3://BUCKET/ray_results, "
            "and a tracking server: "
            "MLFLOW_TRACKING_URI=http://HOST:5000 (or -S tracking.uri=...); nothing was submitted")


def runtime_env(working_dir: str = ".") -> dict:
    """The job's runtime_env: the project (minus upload_excludes), telemetry off, the tracking URI,
    the checkout's git commit, which object stores (their endpoint and region: genflow.storage.worker_env,
    MLflow's MLFLOW_S3_ENDPOINT_URL) and the names (never the values) of the MLflow credential
    variables the job's processes need: they take those, and the object stores' credentials, from
    their nodes (genflow/track/mlflow.py, genflow/storage.py)."""
    from genflow.provenance import git_env
    from genflow.storage import worker_env
    from genflow.track.mlflow import CREDENTIALS_NEEDED, credentials_in_use

    env_vars = {**TELEMETRY_OFF, **git_env(working_dir), **worker_env()}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(name):
            env_vars[name] = os.environ[name]
    if credentials_in_use():
        env_vars[CREDENTIALS_NEEDED] = ",".join(credentials_in_use())
    return {"working_dir": str(working_dir), "excludes": upload_excludes(Path(working_dir)), "env_vars": env_vars}


def names_this_machine(url: str) -> bool:
    """Whether `url` names a server by a host that is whichever machine uses it: a loopback name or
    address (localhost, *.localhost, 127.x, ::1 in any spelling) or the unspecified 0.0.0.0 or ::,
    which a connection takes as this machine's. A local store's URI (file:, sqlite:) names a path."""
    try:
        parts = urlparse(url)
        host = parts.hostname or ""
    except ValueError:  # malformed ("http://[::1:9000"): the job reports it where it is used
        return False
    if parts.scheme in ("file", "sqlite") or not host:
        return False
    if host in ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback") or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a name, not an address
        return False
    address = getattr(address, "ipv4_mapped", None) or address  # ::ffff:127.0.0.1
    return address.is_loopback or address.is_unspecified


def warn_of_this_machine(env_vars: dict[str, str], address: str) -> None:
    """Warn of a server address the job is given (the tracking server, an S3 endpoint) that names
    this machine by a loopback name while the cluster is elsewhere: on the cluster it names the node
    the job runs on. Only a warning: a tunnel or a server on every node makes it right."""
    if names_this_machine(address):
        return  # a cluster on this machine: loopback is the same machine for its jobs
    for name, value in env_vars.items():
        if "://" in value and names_this_machine(value):
            print(f"genflow submit: warning: {name}={value} names this machine, but the job runs on the Ray cluster at "
                  f"{address}, where {urlparse(value).hostname} is the node it runs on; give an address the cluster's "
                  "nodes reach", file=sys.stderr)


def upload_excludes(project: Path) -> list[str]:
    """EXCLUDES, then every pattern of the project's .gitignore files anchored at the project's
    root, then the tuned params let back in: DVC lists tuned/FAMILY.yaml in tuned/.gitignore (it
    is a DVC output), and a job without it would train without the tuned params, saying nothing.

    Ray's own .gitignore reading cannot let a file back in, so `submit` turns it off
    (RAY_RUNTIME_ENV_IGNORE_GITIGNORE) and Ray applies these patterns instead."""
    from ray._private.thirdparty.pathspec import PathSpec  # what Ray matches "excludes" with

    from genflow.tune.tuned import TUNED_DIR

    patterns = list(EXCLUDES)
    for folder, subfolders, files in os.walk(project):
        relative = Path(folder).relative_to(project).as_posix()
        here = "" if relative == "." else relative  # (not removeprefix("."): .dvc would become dvc)
        if ".gitignore" in files:
            lines = (Path(folder) / ".gitignore").read_text().splitlines()
            patterns += [_rooted(line.rstrip(), here) for line in lines if line.strip() and not line.startswith("#")]
        skipped = PathSpec.from_lines("gitwildmatch", patterns)
        subfolders[:] = [name for name in subfolders if not skipped.match_file(f"{here}/{name}/".lstrip("/"))]
    return patterns + [f"!/{TUNED_DIR.as_posix()}/", f"!/{TUNED_DIR.as_posix()}/*.yaml"]


def _rooted(pattern: str, folder: str) -> str:
    """A .gitignore pattern of `folder` (relative to the project; "" at its root) as a pattern
    anchored at the project's root, with git's meaning: one with a slash before its end is
    relative to its folder, one without matches at any depth below it."""
    if not folder:
        return pattern
    negated, pattern = pattern.startswith("!"), pattern.removeprefix("!")
    anchored = "/" in pattern.rstrip("/")
    return ("!" if negated else "") + f"/{folder}/" + (pattern.lstrip("/") if anchored else f"**/{pattern}")


def project_root(start: Path) -> Path:
    """The folder the job runs a copy of: `start`, unless it is a folder inside a project."""
    start = start.resolve()
    if not any((start / name).exists() for name in (PARAMS_FILE, "dvc.yaml")):
        for parent in start.parents:
            if any((parent / name).exists() for name in (PARAMS_FILE, "dvc.yaml")):
                raise SubmitError(f"run genflow submit from the project's root, {parent}: the job runs in a copy of "
                                  f"the folder it is started from, and reads its {PARAMS_FILE}")
    return start


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
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            raise SubmitError(
                f"the Ray cluster at {address} refused the authentication token this machine gave it (RAY_AUTH_TOKEN, "
                "else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token): set RAY_AUTH_TOKEN to what "
                "`ray get-auth-token` prints on the head node"
            ) from None
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
