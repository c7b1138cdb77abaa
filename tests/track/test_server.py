"""genflow against an MLflow tracking server with basic authentication on, as a team runs it
(infra/mlflow): `mlflow server --app-name basic-auth` on loopback, SQLite stores and an artifact
root in a temporary folder, its own admin login. Training logs to it with the login from the
environment (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD; the URI carries no secret), the
registry commands and `genflow sample` work against it, a wrong or missing login is one clear line,
and the registry page, opened logged in by a headless Chromium, shows the alias, the card and the
test metrics.
"""

from __future__ import annotations

import asyncio
import base64
import configparser
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import yaml
from PIL import Image

from genflow._telemetry import TELEMETRY_OFF
from genflow.cli import main
from genflow.data.shards import prepare
from genflow.data.synth import write_sample
from genflow.track.mlflow import LOGIN_VARIABLES
from tests.conftest import TINY_VAE
from tests.track.test_registry import OVERRIDES

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]
ADMIN = "genflow-admin"
MODEL = "celeba64-vae"
# Set GENFLOW_SCREENSHOTS=docs/images to keep the browser test's picture of the registry page (README's).
SCREENSHOTS = os.environ.get("GENFLOW_SCREENSHOTS")


@dataclass
class Server:
    uri: str
    password: str
    root: Path
    log: Path

    def login(self, monkeypatch, password: str | None = "the server's") -> None:
        """Point genflow at this server with the admin's login (`password`: another one; None: no login)."""
        monkeypatch.setenv("MLFLOW_TRACKING_URI", self.uri)
        for name in LOGIN_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        if password is not None:
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", self.password if password == "the server's" else password)

    def client(self) -> mlflow.MlflowClient:
        """A client logged in as the admin (for checks; genflow's commands take the login from the environment)."""
        return _LoggedIn(mlflow.MlflowClient(self.uri), self.password)


class _LoggedIn:
    """An MlflowClient whose every call runs with the admin's login in the environment (MLflow reads
    the login at each request)."""

    def __init__(self, client, password):
        self._client, self._password = client, password

    def __getattr__(self, name):
        method = getattr(self._client, name)

        def call(*args, **kwargs):
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
                patch.setenv("MLFLOW_TRACKING_PASSWORD", self._password)
                return method(*args, **kwargs)

        return call


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` with basic auth: infra/mlflow's auth config with its own admin and user
    database (SQLite here, never the default in ~), the admin's password from the environment as
    infra/ gives it; stopped with its workers at the end."""
    root = tmp_path_factory.mktemp("mlflow-server")
    config = configparser.ConfigParser()
    config.read(PROJECT / "infra/mlflow/basic_auth.ini")
    config["mlflow"].update(database_uri=f"sqlite:///{root}/basic_auth.db", admin_username=ADMIN)
    with (root / "basic_auth.ini").open("w") as ini:
        config.write(ini)
    password = secrets.token_urlsafe(18)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_TRACKING_")}
    env.update(TELEMETRY_OFF, MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"), MLFLOW_AUTH_ADMIN_PASSWORD=password,
               MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # the GenAI job runner: not used here
    port = _free_port()
    log = root / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
             "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=root, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(uri, process, log)
        yield Server(uri, password, root, log)
    finally:
        # Its own session: the server and the uvicorn workers it forked, nothing else.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_until_healthy(uri: str, process: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{uri}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"mlflow server at {uri} not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def genflow(argv: list[str], capsys) -> Outcome:
    """`genflow ARGV` in this process; its exit code and what it printed."""
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return Outcome(code, out, err)


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> Path:
    """A tiny VAE's params on tiny prepared shards (the tracking URI comes from the environment)."""
    from genflow.config import apply_overrides

    root = tmp_path_factory.mktemp("project")
    # Sample quality on 8 images, not 128: the registry needs test metrics, not good ones.
    settings = apply_overrides({}, [
        *TINY_VAE, *OVERRIDES, "train.batch_size=8", "train.log_every=1", f"train.storage_path={root}/ray",
        f"data.shards={root}/shards", f"data.sample.dir={root}/sample", "evaluate.cpu_samples=8",
        "evaluate.kid_subsets=2", "evaluate.kid_subset_size=4", f"evaluate.stats_cache={root}/eval_stats"])
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(settings))
    write_sample(root / "sample", n=settings["data"]["sample"]["n"])
    from genflow.config import load_params

    prepare(load_params(path).data)
    return path


@pytest.fixture(scope="module")
def on_the_server(server, params_file):
    """train (its own `genflow` process: its local Ray's workers inherit the login), evaluate, register,
    registry list, registry promote --to staging: each against the server, with the login from the environment."""
    flags = ["--params", str(params_file)]
    env = {key: value for key, value in os.environ.items() if key not in LOGIN_VARIABLES and key != "RAY_ADDRESS"}
    env.update(TELEMETRY_OFF, MLFLOW_TRACKING_URI=server.uri, MLFLOW_TRACKING_USERNAME=ADMIN,
               MLFLOW_TRACKING_PASSWORD=server.password,
               PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")])))
    trained = subprocess.run([sys.executable, "-m", "genflow.cli", "train", "vae", "--no-tuned", *flags],
                             cwd=params_file.parent, env=env, capture_output=True, text=True, timeout=600)
    outcomes = {"train": Outcome(trained.returncode, trained.stdout, trained.stderr)}
    # The commands point MLflow at the server; conftest's per-test reset runs after this fixture,
    # so the module puts back what later tests expect itself.
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri
    with pytest.MonkeyPatch.context() as patch, _captured() as capsys:
        patch.setattr(utils, "_tracking_uri", before)
        server.login(patch)
        for name, argv in [("evaluate", ["evaluate", "vae", "--no-tuned", *flags]),
                           ("register", ["register", "vae", "--no-tuned", *flags]),
                           ("list", ["registry", "list", *flags]),
                           ("promote", ["registry", "promote", MODEL, "1", "--to", "staging", "--reason", "server test", *flags])]:
            outcomes[name] = genflow(argv, capsys)
            if outcomes[name].code != 0:
                break
    return outcomes


@contextlib.contextmanager
def _captured():
    """capsys for a module fixture: stdout and stderr of the calls inside, read with readouterr()."""
    import io

    class Capture:
        def __init__(self):
            self.out, self.err = io.StringIO(), io.StringIO()

        def readouterr(self):
            out, err = self.out.getvalue(), self.err.getvalue()
            self.out.seek(0), self.out.truncate(), self.err.seek(0), self.err.truncate()
            return out, err

    capture = Capture()
    with contextlib.redirect_stdout(capture.out), contextlib.redirect_stderr(capture.err):
        yield capture


def test_training_logs_to_the_server_with_the_login_from_the_environment(server, on_the_server):
    train = on_the_server["train"]
    assert train.code == 0, f"{train.out}\n{train.err}\n{server.log.read_text()[-2000:]}"
    assert server.password not in train.out + train.err
    client = server.client()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                filter_string="tags.`genflow.family` = 'vae'")
    assert run.info.status == "FINISHED"
    # Rank 0 logged these from a Ray worker, with the login the worker inherited.
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == 4
    assert f"{server.uri}/#/experiments/" in train.err  # where to watch it: the run's page
    # Artifacts went through the server (--serve-artifacts) to its artifact root: no store credentials here.
    assert (server.root / "artifacts").is_dir() and any((server.root / "artifacts").rglob("model.pt"))


def test_register_list_and_promote_work_against_the_server(server, on_the_server):
    for name in ("evaluate", "register", "list", "promote"):
        assert on_the_server[name].code == 0, (name, on_the_server[name])
    assert f"registered {MODEL} version 1 (alias candidate)" in on_the_server["register"].out
    assert any(line.split()[:3] == [MODEL, "1", "candidate"] for line in on_the_server["list"].out.splitlines())
    assert f"{MODEL} version 1 is now staging" in on_the_server["promote"].out
    client = server.client()
    staged = client.get_model_version_by_alias(MODEL, "staging")
    assert staged.version == "1" and staged.tags["genflow.promoted.staging.reason"] == "server test"


def test_sample_draws_from_the_model_on_the_server(server, on_the_server, params_file, tmp_path, monkeypatch, capsys):
    server.login(monkeypatch)
    out = tmp_path / "grid.png"
    done = genflow(["sample", f"{MODEL}@staging", "--n", "4", "--out", str(out), "--params", str(params_file)], capsys)
    assert done.code == 0, done
    assert Image.open(out).size[0] > 64


@pytest.mark.parametrize("password", ["wrong-password", None], ids=["wrong", "missing"])
def test_a_wrong_or_missing_login_is_one_clear_line_and_writes_nothing(server, params_file, password, tmp_path,
                                                                       monkeypatch, capsys):
    server.login(monkeypatch, password)
    client = server.client()
    before = _everything(client)
    out, storage = tmp_path / "grid.png", tmp_path / "ray"
    fix = ("refused the login of user 'genflow-admin' (HTTP 401): check MLFLOW_TRACKING_PASSWORD" if password
           else "requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    for argv in (["registry", "list"], ["registry", "promote", MODEL, "1", "--to", "production"],
                 ["evaluate", "vae", "--no-tuned"], ["register", "vae", "--no-tuned"],
                 ["sample", f"{MODEL}@staging", "--n", "4", "--out", str(out)],
                 ["train", "vae", "--no-tuned", "-S", f"train.storage_path={storage}", "-S", "train.max_steps=5"]):
        done = genflow([*argv, "--params", str(params_file)], capsys)
        assert done.code == 2, (argv, done)
        assert done.err.startswith(f"genflow: error: the MLflow tracking server {server.uri} {fix}"), (argv, done.err)
        assert "Traceback" not in done.err and len(done.err.strip().splitlines()) == 1
    assert not out.exists() and not storage.exists()
    assert _everything(client) == before


def _everything(client) -> tuple:
    """What a command could have written on the server: experiments, runs, models and their aliases."""
    experiments = sorted(e.experiment_id for e in client.search_experiments())
    runs = sorted(r.info.run_id for r in client.search_runs(experiments)) if experiments else []
    models = sorted((m.name, sorted(m.aliases.items())) for m in client.search_registered_models())
    return experiments, runs, models


def test_a_password_in_the_tracking_uri_is_refused_without_printing_it(server, params_file, monkeypatch, capsys):
    server.login(monkeypatch, None)
    secret = server.password
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri.replace("://", f"://{ADMIN}:{secret}@"))
    done = genflow(["registry", "list", "--params", str(params_file)], capsys)
    assert done.code == 2 and secret not in done.out + done.err
    assert f"the MLflow tracking URI {server.uri} carries a password" in done.err
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in done.err


# MLflow 3.17 opens its chat assistant beside every page; the picture is of the registry.
CLOSE_ASSISTANT = "document.querySelector('[data-component-id=\"mlflow.assistant.chat_panel.close\"]')?.click()"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def test_the_registry_page_shows_the_alias_the_card_and_the_test_metrics_in_a_browser(server, on_the_server, tmp_path):
    """The page a reviewer opens: MLflow 3's single-page app, rendered by headless Chromium, logged in
    with an Authorization header (a login in the URL would end up in every fetch the page makes,
    which browsers refuse)."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (CI installs Debian's chromium package)")
    assert on_the_server["promote"].code == 0, on_the_server["promote"]
    client = server.client()
    psnr = client.get_run(client.get_model_version(MODEL, "1").run_id).data.metrics["test/reconstruction_psnr"]
    shown = [
        "staging",                                  # the alias
        "Primary metric", "synthetic sample",       # the model card (the version's description)
        "reconstruction_psnr", f"{psnr:.4g}",       # a test metric and its value
    ]
    login = base64.b64encode(f"{ADMIN}:{server.password}".encode()).decode()
    text, picture = render(f"{server.uri}/#/models/{MODEL}/versions/1", {"Authorization": f"Basic {login}"},
                           shown, tmp_path / "chromium", before_picture=CLOSE_ASSISTANT)
    missing = [item for item in shown if item not in text]
    assert not missing, f"not on the page: {missing}\n--- the page's text:\n{text[:3000]}"
    assert picture[:8] == b"\x89PNG\r\n\x1a\n"
    if SCREENSHOTS:
        (PROJECT / SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        (PROJECT / SCREENSHOTS / "registry_page.png").write_bytes(picture)


def render(url: str, headers: dict[str, str], wanted: list[str], profile: Path, timeout_s: float = 120,
           before_picture: str = "") -> tuple[str, bytes]:
    """Open `url` in headless Chromium with `headers` on every request; wait until the page's text
    holds every `wanted` string (or `timeout_s` passes); return that text and a PNG of the page,
    taken after running the script `before_picture` in it."""
    profile.mkdir(parents=True)
    with (profile.parent / "chromium.log").open("w") as log:
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--disable-default-apps",
             "--hide-scrollbars", "--window-size=1400,1300", f"--user-data-dir={profile}",
             "--remote-debugging-port=0", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready = profile / "DevToolsActivePort"  # Chromium writes its debugging port here
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text().count("\n") >= 1):
            if browser.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium did not start:\n{(profile.parent / 'chromium.log').read_text()[-2000:]}")
            time.sleep(0.2)
        port = int(ready.read_text().splitlines()[0])
        return asyncio.run(_devtools(port, url, headers, wanted, timeout_s, before_picture))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser.pid, signal.SIGKILL)
        browser.wait()


async def _devtools(port: int, url: str, headers: dict[str, str], wanted: list[str], timeout_s: float,
                    before_picture: str) -> tuple[str, bytes]:
    """Chrome DevTools Protocol over the page's websocket (aiohttp, which Ray's dashboard brings)."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/json/list") as answer:
            page = next(target for target in await answer.json() if target["type"] == "page")
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as socket_:
            numbers = iter(range(1, 1_000_000))

            async def call(method: str, **params):
                number = next(numbers)
                await socket_.send_json({"id": number, "method": method, "params": params})
                async for message in socket_:  # events come in between; the answer carries our id
                    data = json.loads(message.data)
                    if data.get("id") == number:
                        if "error" in data:
                            raise RuntimeError(f"{method}: {data['error']}")
                        return data["result"]
                raise RuntimeError(f"chromium closed the DevTools connection during {method}")

            await call("Network.enable")
            await call("Network.setExtraHTTPHeaders", headers=headers)
            await call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout_s
            while True:
                evaluated = await call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                                       returnByValue=True)
                text = evaluated["result"].get("value", "")
                if all(item in text for item in wanted) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            if before_picture:
                await call("Runtime.evaluate", expression=before_picture)
            await asyncio.sleep(1)  # let images and fonts settle before the picture
            shot = await call("Page.captureScreenshot", format="png")
            return text, base64.b64decode(shot["data"])
