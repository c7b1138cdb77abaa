"""genflow submit: the Ray Jobs API client, against no cluster and against a local Ray head with
token authentication on."""

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import requests

from genflow._telemetry import TELEMETRY_OFF
from genflow.data.synth import write_sample
from genflow.provenance import GIT_COMMIT_TAG, GIT_DIRTY_TAG, SUBMITTED_COMMIT, SUBMITTED_DIRTY, provenance_tags
from genflow.storage import STORE_SETTINGS
from genflow.submit import EXCLUDES, SubmitError, check_command, project_root, runtime_env, submit
from genflow.track.mlflow import CREDENTIALS, CREDENTIALS_NEEDED

PROJECT = Path(__file__).resolve().parents[1]


def test_unreachable_address_is_a_clear_error_quickly():
    start = time.monotonic()
    with pytest.raises(SubmitError, match=r"cannot reach the Ray dashboard at http://127\.0\.0\.1:1\b.*8265.*--dashboard-host 0\.0\.0\.0"):
        submit("http://127.0.0.1:1", ["--help"])
    assert time.monotonic() - start < 10


def test_silent_address_times_out(monkeypatch):
    # A port that accepts connections and never answers, as a firewall or a wrong service would.
    monkeypatch.setattr("genflow.submit.CONNECT_TIMEOUT_S", 0.5)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"http://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(SubmitError, match="cannot reach the Ray dashboard"):
            submit(address, ["--help"])


def test_cluster_with_token_authentication_says_how_to_pass_the_token(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)

    class TokenRequired(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b"Unauthorized: Missing authentication token")

        def log_message(self, *args):
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), TokenRequired) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        address = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            with pytest.raises(SubmitError, match=f"{address} requires its authentication token: set RAY_AUTH_MODE=token"):
                submit(address, ["--help"])
        finally:
            server.shutdown()


def test_address_must_be_the_dashboard_url():
    with pytest.raises(SubmitError, match=r"e\.g\. http://HEAD:8265"):
        submit("127.0.0.1:8265", ["--help"])


def test_runtime_env_turns_telemetry_off_and_passes_the_tracking_server(monkeypatch, tmp_path):
    for name in (*CREDENTIALS, *STORE_SETTINGS, "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    env = runtime_env(str(tmp_path))  # not a git checkout: no commit to pass
    assert env["env_vars"] == {**TELEMETRY_OFF, "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert env["working_dir"] == str(tmp_path) and env["excludes"][: len(EXCLUDES)] == EXCLUDES
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert runtime_env(str(tmp_path))["env_vars"] == TELEMETRY_OFF  # the job reads params.yaml itself


def test_runtime_env_passes_the_checkouts_commit_which_the_jobs_runs_record(tmp_path, monkeypatch):
    # The job runs in an uploaded copy without .git: its MLflow runs' git tags come from here.
    from tests.test_provenance import git

    project = tmp_path / "project"
    project.mkdir()
    git("init", "-q", cwd=project)
    (project / "params.yaml").write_text("a: 1\n")
    git("add", "params.yaml", cwd=project)
    git("commit", "-qm", "x", cwd=project)
    head = git("rev-parse", "HEAD", cwd=project)
    env = runtime_env(str(project))["env_vars"]
    assert env[SUBMITTED_COMMIT] == head and env[SUBMITTED_DIRTY] == "false"
    (project / "params.yaml").write_text("a: 2\n")
    assert runtime_env(str(project))["env_vars"][SUBMITTED_DIRTY] == "true"

    job_copy = tmp_path / "job"  # what the job runs in: no repository
    job_copy.mkdir()
    monkeypatch.chdir(job_copy)
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in runtime_env(str(project))["env_vars"].items():
        monkeypatch.setenv(name, value)
    assert provenance_tags() == {GIT_COMMIT_TAG: head, GIT_DIRTY_TAG: "true"}


def test_no_credential_travels_in_the_jobs_runtime_env_only_their_names(monkeypatch, tmp_path):
    # The Ray dashboard shows a job's runtime_env to anyone who reaches it.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-password")
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.delenv(CREDENTIALS_NEEDED, raising=False)
    env = runtime_env(str(tmp_path))["env_vars"]
    assert "s3cret-password" not in str(env) and "alice" not in str(env)
    assert env[CREDENTIALS_NEEDED] == "MLFLOW_TRACKING_PASSWORD,MLFLOW_TRACKING_USERNAME"


def test_a_server_address_naming_this_machine_is_warned_of_when_the_cluster_is_elsewhere(capsys):
    from genflow.submit import warn_of_this_machine

    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "AWS_ENDPOINT_URL": "http://localhost:9000",
           "AWS_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": "http://minio.internal:9000"}
    warn_of_this_machine(env, "http://ray-head.internal:8265")
    said = capsys.readouterr().err
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000 names this machine" in said
    assert "AWS_ENDPOINT_URL=http://localhost:9000 names this machine" in said
    assert "minio.internal" not in said and "AWS_REGION" not in said
    warn_of_this_machine(env, "http://127.0.0.1:8265")  # a cluster on this machine
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("url", ["http://0.0.0.0:5000", "http://[::]:5000", "http://[0:0:0:0:0:0:0:1]:5000",
                                 "http://[::ffff:127.0.0.1]:5000", "http://localhost.localdomain:5000",
                                 "http://mlflow.localhost:5000", "http://127.1.2.3:9000"])
def test_every_loopback_or_unspecified_host_names_this_machine(url):
    # 0.0.0.0 (what `mlflow server --host 0.0.0.0` prints), "::", and any loopback spelling reach
    # the machine they are used on, as localhost does.
    from genflow.submit import names_this_machine

    assert names_this_machine(url)


@pytest.mark.parametrize("url", ["http://10.0.0.5:5000", "http://minio.internal:9000", "http://[fd00::1]:9000",
                                 "http://localhost-mlflow:5000", "file://localhost/abs/mlruns",
                                 "sqlite:////abs/mlflow.db", "http://[::1:9000"])
def test_another_machine_or_a_local_store_is_not_named_this_machine(url):
    # A local store's URI (file:, sqlite:) is a path, not a server: check_command warns of it. A
    # malformed one is the job's own error to report, not a crash of the warning.
    from genflow.submit import names_this_machine

    assert not names_this_machine(url)


def test_the_job_is_told_which_object_store_never_its_credentials(monkeypatch, tmp_path):
    # The job's processes on the cluster use their nodes' credentials (genflow/storage.py); the
    # endpoint and region say which store, and a job's driver leaves what the job sets to the job.
    import json

    from genflow.storage import worker_env
    from genflow.train.trainer import without_job_env_vars

    for name in STORE_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    settings = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_ENDPOINT_URL_S3": "http://minio:9000",
                "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1",
                "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000"}  # MLflow's artifact client's own
    secrets_here = {"AWS_ACCESS_KEY_ID": "key-id-value", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
                    "AWS_SESSION_TOKEN": "t0ken-value", "AWS_PROFILE": "my-profile",
                    "GOOGLE_APPLICATION_CREDENTIALS": "/home/me/gcs-key.json"}
    for name, value in {**settings, **secrets_here}.items():
        monkeypatch.setenv(name, value)
    env = runtime_env(str(tmp_path))["env_vars"]
    assert {name: env.get(name) for name in settings} == settings
    assert not any(value in str(env) for value in secrets_here.values())
    # The job's driver then starts its Ray work with none of them set again (Ray would refuse the job).
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": env}}))
    assert without_job_env_vars({**TELEMETRY_OFF, **worker_env()}) == {}


def uploaded(project: Path) -> set[str]:
    """The files Ray's own packaging puts in the job's working_dir package, as `submit` uploads it."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    package = project.parent / "package.zip"
    env = runtime_env(str(project))
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE") != "1"
    create_package(str(project), package, include_gitignore=include_gitignore, excludes=env["excludes"])
    with zipfile.ZipFile(package) as archive:
        names = {name for name in archive.namelist() if not name.endswith("/")}
    package.unlink()
    return names


def test_the_upload_carries_the_tuned_params_that_dvc_gitignores_and_skips_what_gitignore_lists(tmp_path, monkeypatch):
    project = tmp_path / "project"
    for path, text in {
        "params.yaml": "", "genflow/data/loader.py": "", "genflow/__pycache__/x.pyc": "",
        ".gitignore": "__pycache__/\n/mlflow.db\n*.log\n", "run.log": "", "genflow/deep.log": "",
        "tuned/.gitignore": "/vae.yaml\n", "tuned/vae.yaml": "train:\n  lr: 0.002\n",  # as DVC writes them
        "models/.gitignore": "/featurizer\n", "models/featurizer/celeba.pt": "weights",
        "models/keep.txt": "", "data/shards/0.tar": "", "mlflow.db": "", ".git/HEAD": "",
        # A hidden folder's own .gitignore: DVC keeps a remote's keys in .dvc/config.local.
        ".dvc/.gitignore": "/config.local\n/tmp\n/cache\n", ".dvc/config": "", ".dvc/config.local": "secret_access_key",
        ".dvc/tmp/exps/big.bin": "",
    }.items():
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text(text)
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")  # as submit sets it around the upload
    assert uploaded(project) == {"params.yaml", "genflow/data/loader.py", ".gitignore", "tuned/.gitignore",
                                 "tuned/vae.yaml", "models/.gitignore", "models/keep.txt", ".dvc/.gitignore",
                                 ".dvc/config"}


def test_submit_uploads_with_rays_gitignore_reading_off_and_puts_it_back(monkeypatch):
    seen = {}

    class Cluster:
        def submit_job(self, entrypoint, runtime_env):
            seen["ignore_gitignore"] = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE")
            raise RuntimeError("refused")

    monkeypatch.delenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", raising=False)
    monkeypatch.setattr("genflow.submit._connect", lambda address: Cluster())
    with pytest.raises(SubmitError, match="refused the job"):
        submit("http://head:8265", ["--help"], working_dir=str(PROJECT))
    assert seen == {"ignore_gitignore": "1"} and "RAY_RUNTIME_ENV_IGNORE_GITIGNORE" not in os.environ


def test_a_submitted_tune_that_succeeds_says_how_to_pull_its_winner(monkeypatch, capsys):
    from ray.job_submission import JobStatus

    class Cluster:
        def submit_job(self, entrypoint, runtime_env):
            return "raysubmit_2"

        async def tail_job_logs(self, job_id):
            yield "tuned\n"

        def get_job_info(self, job_id):
            return types.SimpleNamespace(status=JobStatus.SUCCEEDED, message="")

    monkeypatch.setattr("genflow.submit._connect", lambda address: Cluster())
    monkeypatch.setattr("genflow.submit.check_command", lambda command, project: None)
    submit("http://head:8265", ["tune", "vae", "--trials", "4", "-S", "tracking.uri=http://mlflow:5000"],
           working_dir=str(PROJECT))
    assert "genflow tuned pull vae -S tracking.uri=http://mlflow:5000" in capsys.readouterr().out


# ---- the command is checked here, before anything is uploaded ----------------------------------

SHARED = ["-S", "data.shards=/mnt/g/shards", "-S", "train.storage_path=/mnt/g/ray"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project whose params.yaml keeps the defaults (relative places), no MLFLOW_TRACKING_URI."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("train:\n  max_steps: 5\n")
    return tmp_path


def test_relative_places_are_refused_before_the_cluster_is_contacted(project):
    # The address is unreachable: the refusal comes first, and names every relative place.
    with pytest.raises(SubmitError) as refused:
        submit("http://127.0.0.1:1", ["train", "vae"], working_dir=str(project))
    message = str(refused.value)
    assert message.startswith("data.shards=data/shards, train.storage_path=ray_results, tracking.uri=sqlite:///mlflow.db: relative")
    assert "-S data.shards=/mnt/genflow/shards" in message and "MLFLOW_TRACKING_URI=http://HOST:5000" in message
    assert message.endswith("nothing was submitted")


@pytest.mark.parametrize("command,refused", [
    (["train", "vae", *SHARED[:2]], "train.storage_path=ray_results, tracking.uri"),
    (["tune", "vae", *SHARED, "-S", "tracking.uri=mlruns"], "tracking.uri=mlruns: relative"),
    (["evaluate", "vae", "-S", "tracking.uri=http://mlflow:5000"], "data.shards=data/shards: relative"),
    (["register", "vae"], "data.shards=data/shards, tracking.uri=sqlite:///mlflow.db: relative"),
    (["data", "prepare"], "data.source=data/sample, data.shards=data/shards: relative"),  # "sample" is data.sample.dir
    (["data", "prepare", "--source", "/celeba", "--out", "shards"], "data.shards=shards: relative"),
    (["data", "synth", "out", "--n", "4"], "OUT=out: relative"),
])
def test_each_command_is_checked_for_the_places_it_uses(project, command, refused):
    with pytest.raises(SubmitError, match=f"^{re.escape(refused)}"):
        check_command(command, project)


@pytest.mark.parametrize("command", [
    ["train", "vae", *SHARED, "-S", "tracking.uri=http://mlflow:5000"],
    ["data", "prepare", "--source", "/celeba", "--out", "/mnt/g/shards"],
    ["registry", "list", "-S", "tracking.uri=http://mlflow:5000"],  # lists the registry: data.shards is not used
    ["data", "synth", "/mnt/g/sample", "--n", "4"],
    ["--help"],
])
def test_commands_with_places_every_node_reaches_pass(project, capsys, command):
    check_command(command, project)
    assert capsys.readouterr().err == ""


def test_the_tracking_server_in_the_environment_counts_as_the_job_will_see_it(project, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")  # passed on to the job, and wins there
    check_command(["train", "vae", *SHARED, "-S", "tracking.uri=sqlite:///mlflow.db"], project)


def test_a_tracking_server_given_by_the_params_naming_this_machine_is_warned_of_too(project, capsys, monkeypatch):
    # Without MLFLOW_TRACKING_URI the job's server is the params' tracking.uri (-S or params.yaml).
    class Cluster:
        def submit_job(self, entrypoint, runtime_env):
            return "raysubmit_3"

    monkeypatch.setattr("genflow.submit._connect", lambda address: Cluster())
    submit("http://ray-head.internal:8265", ["train", "vae", *SHARED, "-S", "tracking.uri=http://127.0.0.1:5000"],
           wait=False, working_dir=str(project))
    assert "tracking.uri=http://127.0.0.1:5000 names this machine" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")  # the environment wins: warned of once
    submit("http://ray-head.internal:8265", ["train", "vae", *SHARED], wait=False, working_dir=str(project))
    said = capsys.readouterr().err
    assert "MLFLOW_TRACKING_URI=http://localhost:5000 names this machine" in said and "tracking.uri=" not in said


@pytest.mark.parametrize("uri", ["sqlite:////home/me/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns"])
def test_an_absolute_local_tracking_store_is_warned_about(project, capsys, uri):
    # Right on a one-machine cluster or a shared mount; elsewhere the runs stay on the node.
    check_command(["train", "vae", *SHARED, "-S", f"tracking.uri={uri}"], project)
    err = capsys.readouterr().err
    assert repr(uri) in err and "is a local store" in err and "MLFLOW_TRACKING_URI=http://" in err


@pytest.mark.parametrize("command,error", [
    (["train", "nope"], "argument family: invalid choice: 'nope'"),
    (["train", "vae", "-S", "train.nope=1"], "train.nope"),
    (["evaluate", "vae", "--params", "other.yaml"], "--params other.yaml: no such file in"),
])
def test_a_command_that_cannot_run_is_refused_with_its_own_error(project, command, error):
    with pytest.raises(SubmitError, match=re.escape(error)) as refused:
        check_command(command, project)
    assert "nothing was submitted" in str(refused.value) or "--params" in error


def test_submit_runs_the_project_from_its_root(tmp_path):
    (tmp_path / "params.yaml").write_text("")
    (tmp_path / "genflow").mkdir()
    assert project_root(tmp_path) == tmp_path.resolve()
    with pytest.raises(SubmitError, match=f"run genflow submit from the project's root, {tmp_path.resolve()}"):
        project_root(tmp_path / "genflow")
    (tmp_path / "params.yaml").unlink()
    assert project_root(tmp_path / "genflow") == (tmp_path / "genflow").resolve()  # no project: the folder itself


def test_submit_takes_one_of_a_command_list_or_stop(capsys):
    from genflow.cli import main

    for argv in (["--list", "--", "train", "vae"], ["--list", "--stop", "raysubmit_x"], []):
        assert main(["submit", "--address", "http://127.0.0.1:1", *argv]) == 2
        assert "or --list, or --stop JOB" in capsys.readouterr().err


def test_ctrl_c_while_following_leaves_the_job_running_and_says_how_to_stop_it(monkeypatch, capsys):
    class Following:  # a cluster that took the job; the user presses Ctrl+C while its log streams
        def submit_job(self, entrypoint, runtime_env):
            return "raysubmit_1"

        async def tail_job_logs(self, job_id):
            yield "step 1\n"
            raise KeyboardInterrupt

    monkeypatch.setattr("genflow.submit._connect", lambda address: Following())
    with pytest.raises(SystemExit) as ended:  # not the CLI's "run the same command again": a second job
        submit("http://head:8265", ["--help"], working_dir=str(PROJECT))
    assert ended.value.code == 130
    assert "the job goes on. To stop it: genflow submit --address http://head:8265 --stop raysubmit_1" in capsys.readouterr().err


def test_excludes_keep_the_package_and_drop_local_data():
    from ray._private.thirdparty.pathspec import PathSpec  # what Ray matches "excludes" with

    spec = PathSpec.from_lines("gitwildmatch", EXCLUDES)
    for dropped in ["data/shards/train/0.tar", "mlflow.db", "mlartifacts/1/a", "ray_results/vae/x", ".dvc/cache/files/md5/ab"]:
        assert spec.match_file(dropped), dropped
    for kept in ["genflow/data/shards.py", "tests/data/test_shards.py", "params.yaml", "dvc.yaml", ".dvc/config"]:
        assert not spec.match_file(kept), kept



# ---- end to end: `genflow submit` against a local Ray head with token authentication on -------
#
# The head runs on loopback, in its own temp dir and on free ports, so that it neither meets nor is
# found by the test session's own local Ray (ray_local). `genflow submit` runs as a user runs it, in
# a subprocess with the token in its environment; the test process never holds the token, so its
# own Ray keeps its authentication as it was.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(**extra: str) -> dict[str, str]:
    # Nothing of a Ray this process may have started or joined leaks into the head or the client.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT", "RAY_JOB_CONFIG_JSON_ENV_VAR", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")])), **extra}


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` with token authentication on (Ray 2.60: RAY_AUTH_MODE=token and
    the token in RAY_AUTH_TOKEN, as `ray get-auth-token` would print it), stopped at the end by
    SIGTERM to `ray start --block`, which stops the node's processes (and only them); yields the
    dashboard address and the environment a client needs."""
    temp_dir = tempfile.mkdtemp(prefix="gfray")  # short: Ray puts Unix sockets under it
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    dashboard_port = _free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    command = [
        str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", "--block",
        "--port=0", "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
        f"--temp-dir={temp_dir}",
    ]
    log_path = Path(temp_dir) / "ray_start.log"
    with open(log_path, "w") as log:
        # No drain on SIGTERM: Ray's default waits up to 30 s for the node to drain (for Ray Serve's
        # proxies, which this cluster has none of) before it stops the node's processes.
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env=_environment(**token, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"),
                                start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{address}/api/version", timeout=2).status_code == 401:  # up, and wants the token
                    break
            except requests.RequestException:
                pass
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start its dashboard (needs ray[default]):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield address, _environment(**token)
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        _kill_the_clusters_leftovers(token["RAY_AUTH_TOKEN"])
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_the_clusters_leftovers(token: str) -> None:
    """Ray's workers and job drivers can outlive `ray start --block` (other process groups): a
    job's training left running would take the CPUs, and the RayTrainWorker processes that later
    tests look for. Each of this cluster's processes holds its own token in its environment."""
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and process.environ().get("RAY_AUTH_TOKEN") == token:
                process.kill()
        except psutil.Error:
            pass


def genflow(env: dict[str, str], *argv: str, background: bool = False):
    """`genflow ARGV...` from the project's root, as a user runs it."""
    command = [sys.executable, "-m", "genflow.cli", *argv]
    if background:
        return subprocess.Popen(command, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)


def job_id_of(output: str) -> str:
    return re.search(r"^submitted (raysubmit_\w+): ", output, re.MULTILINE).group(1)


TINY_RUN = ["-S", "models.vae.hidden_channels=[8,16,32,32]", "-S", "models.vae.latent_dim=8", "-S", "models.vae.norm_groups=4",
            "-S", "train.batch_size=8", "-S", "train.workers=1", "-S", "train.max_steps=2", "-S", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def jobs(ray_head, tmp_path_factory):
    """Tiny shards prepared by a job; then a tiny `train vae`, a tiny `tune vae` (2 trials at once)
    and a job that fails, submitted at once and waited for, each with its own tracking store and
    Ray storage."""
    address, env = ray_head
    root = tmp_path_factory.mktemp("jobs")
    write_sample(root / "sample", n=40, seed=1)
    prepared = genflow(env, "submit", "--address", address, "--", "data", "prepare", "--source", str(root / "sample"),
                       "--out", str(root / "shards"), "-S", "data.processes=1")
    assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]
    assert "28 train, 12 test" in prepared.stdout

    def places(name: str, shards: Path = root / "shards") -> list[str]:
        return ["-S", f"data.shards={shards}", "-S", f"train.storage_path={root / name}",
                "-S", f"tracking.uri=sqlite:///{root / name}.db"]

    commands = {
        "train": ["train", "vae", *TINY_RUN, *places("train")],
        "tune": ["tune", "vae", "--trials", "2", *TINY_RUN, *places("tune"), "-S", "tune.vae.max_concurrent=2",
                 "-S", "tune.vae.cpus_per_worker=0.5", "-S", "tune.vae.grace_period=2"],
        # Fine here, but the cluster has no such folder: the job itself fails.
        "fails": ["train", "vae", *TINY_RUN, *places("fails", shards=root / "not-on-the-cluster")],
    }
    running = {name: genflow(env, "submit", "--address", address, "--", *command, background=True)
               for name, command in commands.items()}
    done = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return root, done


def mlflow_runs(store: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow
def test_a_submitted_train_succeeds_streams_its_log_and_records_its_run(jobs):
    root, done = jobs
    train = done["train"]
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    job_id = job_id_of(train.stdout)
    assert "vae trained to step 2" in train.stdout  # the job's own output, streamed back
    assert f"job {job_id} SUCCEEDED" in train.stdout
    [run] = mlflow_runs(root / "train.db")
    assert run.info.status == "FINISHED" and run.data.tags["genflow.family"] == "vae"
    assert run.data.metrics["final/step"] == 2
    assert any((root / "train").rglob("checkpoint_*"))
    # The job ran in an uploaded copy without .git; its run names the commit submitted from here.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True).stdout.strip()
    assert run.data.tags[GIT_COMMIT_TAG] == head and run.data.tags[GIT_DIRTY_TAG] in ("true", "false")


@pytest.mark.slow
def test_a_submitted_tune_succeeds_with_a_parent_run_and_a_run_per_trial(jobs):
    root, done = jobs
    tune = done["tune"]
    assert tune.returncode == 0, tune.stdout[-3000:] + tune.stderr[-3000:]
    assert "2 trials: 2 completed" in tune.stdout
    assert "genflow tuned pull vae -S tracking.uri=sqlite:///" in tune.stdout  # the winner stayed in the job's copy
    runs = mlflow_runs(root / "tune.db")
    [parent] = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    trials = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(trials) == 2 == len(runs) - 1
    # The trials' workers found their cluster by the address the job's driver gave them, not by
    # looking among the machine's Rays (the test session's own is one): Train's placement-group
    # cleaner then works.
    assert "Found multiple active Ray instances" not in tune.stdout + tune.stderr


@pytest.mark.slow
def test_a_failed_job_exits_non_zero_with_its_error(ray_head, jobs):
    address, _ = ray_head
    root, done = jobs
    fails = done["fails"]
    assert fails.returncode == 2
    job_id = job_id_of(fails.stdout)
    # The job's error, at the end of the message (as well as in the streamed log).
    message = fails.stderr[fails.stderr.index(f"genflow: error: job {job_id} FAILED"):]
    assert "exit code 2\n  the end of its log:\n" in message
    assert f"genflow: error: {root / 'not-on-the-cluster'}: no such shard folder" in message
    assert message.rstrip().endswith(f"the whole log: ray job logs {job_id} --address {address}")


@pytest.mark.slow
def test_list_shows_the_jobs_and_stop_stops_a_running_one(ray_head, jobs, tmp_path):
    address, env = ray_head
    # A job that runs until it is stopped: a sample far larger than the test waits for.
    submitted = genflow(env, "submit", "--address", address, "--no-wait", "--", "data", "synth", str(tmp_path / "big"),
                        "--n", "200000")
    assert submitted.returncode == 0, submitted.stderr
    job_id = job_id_of(submitted.stdout)
    # Waited for through the Jobs REST API (a `genflow` per look would cost seconds each).
    bearer = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    deadline = time.monotonic() + 120
    while (status := requests.get(f"{address}/api/jobs/{job_id}", headers=bearer, timeout=10).json()["status"]) != "RUNNING":
        assert status == "PENDING" and time.monotonic() < deadline, status
        time.sleep(0.5)
    listed = genflow(env, "submit", "--address", address, "--list").stdout
    assert re.search(rf"^{job_id}\s+RUNNING\s.*  genflow data synth ", listed, re.MULTILINE), listed
    done = jobs[1]
    for name, status, command in (("train", "SUCCEEDED", "train"), ("tune", "SUCCEEDED", "tune"), ("fails", "FAILED", "train")):
        assert re.search(rf"^{job_id_of(done[name].stdout)}\s+{status}\s.*  genflow {command} vae ", listed, re.MULTILINE), listed

    stopped = genflow(env, "submit", "--address", address, "--stop", job_id)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"job {job_id} STOPPED", stopped.stdout + stopped.stderr
    again = genflow(env, "submit", "--address", address, "--stop", job_id)
    assert again.stdout.strip() == f"job {job_id} already ended (STOPPED); nothing to stop"
    unknown = genflow(env, "submit", "--address", address, "--stop", "raysubmit_nope")
    assert unknown.returncode == 2 and f"no job raysubmit_nope on the Ray cluster at {address}" in unknown.stderr


@pytest.mark.slow
def test_a_wrong_or_missing_token_is_a_clear_error(ray_head):
    address, env = ray_head
    wrong = genflow({**env, "RAY_AUTH_TOKEN": "wrong"}, "submit", "--address", address, "--list")
    assert wrong.returncode == 2 and "refused the authentication token this machine gave it" in wrong.stderr
    missing = genflow({k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"HOME": "/nonexistent"},
                      "submit", "--address", address, "--list")
    assert missing.returncode == 2 and "requires its authentication token: set RAY_AUTH_MODE=token" in missing.stderr
