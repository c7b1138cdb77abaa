"""genflow submit: the Ray Jobs API client, against no cluster and against a local Ray head."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from genflow._telemetry import TELEMETRY_OFF
from genflow.submit import EXCLUDES, SubmitError, runtime_env, submit

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


def test_runtime_env_turns_telemetry_off_and_passes_the_tracking_server(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    env = runtime_env(str(PROJECT))
    assert env["env_vars"] == {**TELEMETRY_OFF, "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert env["working_dir"] == str(PROJECT) and env["excludes"] == EXCLUDES
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "sqlite:////home/me/mlflow.db", "file:///tmp/mlruns", "mlruns"])
def test_local_tracking_store_is_warned_about(monkeypatch, capsys, uri):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    runtime_env(str(PROJECT))
    err = capsys.readouterr().err
    assert repr(uri) in err and "MLFLOW_TRACKING_URI=http://" in err


def test_tracking_uri_from_params_when_the_environment_has_none(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("tracking:\n  uri: http://mlflow:5000\n")
    # The job reads params.yaml itself; nothing to pass, nothing to warn about.
    assert "MLFLOW_TRACKING_URI" not in runtime_env(str(tmp_path))["env_vars"]
    assert capsys.readouterr().err == ""
    (tmp_path / "params.yaml").unlink()
    runtime_env(str(tmp_path))
    assert "'sqlite:///mlflow.db' is a local store" in capsys.readouterr().err


def test_excludes_keep_the_package_and_drop_local_data():
    from ray._private.thirdparty.pathspec import PathSpec  # what Ray matches "excludes" with

    spec = PathSpec.from_lines("gitwildmatch", EXCLUDES)
    for dropped in ["data/shards/train/0.tar", "mlflow.db", "mlartifacts/1/a", "ray_results/vae/x", ".dvc/cache/files/md5/ab"]:
        assert spec.match_file(dropped), dropped
    for kept in ["genflow/data/shards.py", "tests/data/test_shards.py", "params.yaml", "dvc.yaml", ".dvc/config"]:
        assert not spec.match_file(kept), kept


# ---- end to end: a local Ray head with its dashboard on loopback -----------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head --block` in its own temp dir and on free ports, so that it neither
    meets nor is found by another Ray on the machine; stopped (SIGTERM to `ray start --block`
    stops the node's processes) whatever the tests do."""
    temp_dir = tempfile.mkdtemp(prefix="gfray")  # short: Ray puts Unix sockets under it
    dashboard_port = _free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    command = [
        str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", "--block",
        "--port=0", "--num-cpus=1", "--include-dashboard=true", "--disable-usage-stats",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
        f"--temp-dir={temp_dir}",
    ]
    log_path = Path(temp_dir) / "ray_start.log"
    # Ray 2.60 turns token authentication on when ~/.ray/auth_token exists (a local ray.init()
    # writes one); this loopback-only head does without, whatever the machine has.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    with open(log_path, "w") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{address}/api/version", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start its dashboard (needs ray[default]):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield address
    finally:
        head.terminate()
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submit_runs_the_command_on_the_cluster_and_streams_its_logs(ray_head, tmp_path, monkeypatch, capsys):
    # An explicit address wins over RAY_ADDRESS, which Ray's client would otherwise prefer.
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")
    out = tmp_path / "sample"
    job_id = submit(ray_head, ["data", "synth", str(out), "--n", "10"], working_dir=str(PROJECT))
    printed = capsys.readouterr().out
    assert f"ray job logs -f {job_id} --address {ray_head}" in printed
    assert f"genflow data synth {out} --n 10" in printed  # the job's log, streamed back
    assert f"job {job_id} SUCCEEDED" in printed
    assert any(path.is_file() for path in out.rglob("*"))


@pytest.mark.slow
def test_failed_job_raises_with_its_id_and_status(ray_head, capsys):
    with pytest.raises(SubmitError, match=r"job raysubmit_\w+ FAILED.*\n  logs: ray job logs raysubmit_\w+ --address"):
        submit(ray_head, ["train", "no-such-family"], working_dir=str(PROJECT))
    assert "invalid choice: 'no-such-family'" in capsys.readouterr().out


@pytest.mark.slow
def test_no_wait_returns_once_submitted(ray_head, capsys):
    from ray.job_submission import JobSubmissionClient

    job_id = submit(ray_head, ["--help"], wait=False, working_dir=str(PROJECT))
    assert f"submitted {job_id}: genflow --help" in capsys.readouterr().out
    assert JobSubmissionClient(ray_head).get_job_info(job_id).entrypoint == "genflow --help"
