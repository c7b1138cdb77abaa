"""The logged pyfunc: its signature lets through every column `predict` reads; it is code plus a
weights file (no pickle), and its requirements are what loading it imports; it loads and samples
in a fresh virtual environment built from its own requirements.txt, without genflow installed."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from packaging.requirements import Requirement

from genflow.models.families import FAMILY_NAMES, get_family
from genflow.models.saved import save_model
from genflow.models.vae import VAE, VAEConfig
from genflow.track.pyfunc import LOAD_REQUIREMENTS, log_sampler, model_spec, pinned_requirements, signature
from tests.models.tiny import TINY_CONFIGS

ATTRS = [float(i % 2) for i in range(40)]  # a condition for conditional families


class RecordingModel:
    """Stands in for a conditional family: records the condition `sample` receives."""

    def __init__(self):
        self.conds = []

    def sample(self, n, cond=None, generator=None):
        self.conds.append(cond)
        return torch.zeros(n, 3, 64, 64, dtype=torch.uint8)


def request(family: str, n: int, seed: int = 0) -> pd.DataFrame:
    """A predict request for `family`: with a condition where the family needs one."""
    return pd.DataFrame({"n": [n], "seed": [seed], **({"attrs": [ATTRS]} if get_family(family).conditional else {})})


def tiny_model_file(folder: Path, family: str) -> Path:
    torch.manual_seed(0)
    model_class = get_family(family)
    path = folder / f"{family}.pt"
    save_model(path, family, model_class(model_class.config_class(**TINY_CONFIGS[family])))
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would put genflow (or this checkout) on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, **extra}


@pytest.mark.slow
def test_pyfunc_signature_keeps_the_optional_attrs_column(tmp_path, monkeypatch):
    # Issue 8 #12: MLflow drops input columns the signature does not name, so `attrs` never
    # reached predict and a conditional model could not be conditioned through the pyfunc.
    # set_tracking_uri exports MLFLOW_TRACKING_URI, which genflow's params then obey: scoped to
    # this test, or every later test's commands would talk to this store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("pyfunc", artifact_location=(tmp_path / "artifacts").as_uri())
    save_model(tmp_path / "model.pt", "vae", VAE(VAEConfig(**TINY_CONFIGS["vae"])))
    with mlflow.start_run(experiment_id=experiment):
        info = log_sampler(tmp_path / "model.pt", 64)
    # Issue 13: code plus weights, no pickled object: it loads with pickle deserialisation refused.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    assert loaded.predict(pd.DataFrame({"n": [2], "seed": [0]})).shape == (2, 3, 64, 64)  # attrs is optional
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "downloaded")))
    assert not list(local.rglob("*.pkl")) and (local / "sampler_code.py").is_file()
    assert (local / "requirements.txt").read_text().split() == pinned_requirements()

    recorder = RecordingModel()
    loaded.unwrap_python_model().model = recorder
    loaded.predict(pd.DataFrame({"n": [3], "seed": [0], "attrs": [ATTRS]}))
    (cond,) = recorder.conds
    assert cond is not None and cond.shape == (3, 40)
    assert np.array_equal(cond[0].numpy(), np.array(ATTRS, dtype=np.float32))


def test_signature_lists_the_optional_sampler_columns():
    inputs = {spec.name: spec for spec in signature(64).inputs.inputs}
    assert [inputs[name].required for name in ("n", "seed", "sampler", "steps", "eta")] == [True, True, False, False, False]


def test_requirements_are_pinned_without_local_build_labels():
    pinned = dict(line.split("==") for line in pinned_requirements())
    assert list(pinned) == list(LOAD_REQUIREMENTS)
    assert pinned["torch"] == torch.__version__.split("+")[0] and pinned["mlflow-skinny"] == mlflow.__version__


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def with_dependencies(names) -> set[str]:
    """The distributions `names` and everything pip installs with them (no extras)."""
    found, todo = set(), [normalized(name) for name in names]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(normalized(requirement.name))
    return found


def site_packages_of(distributions: set[str], folder: Path) -> Path:
    """A site-packages folder that holds only `distributions`: a link to each of their installed
    files (as their RECORD lists them), so that importlib and importlib.metadata see those alone."""
    for name in distributions:
        distribution = metadata.distribution(name)
        root = Path(distribution.locate_file(""))
        for file in distribution.files:
            if file.parts[0] == ".." or not (root / file).is_file():  # scripts in bin/; pycache not written
                continue
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            if not (folder / file).exists():
                (folder / file).symlink_to(root / file)
    return folder


# Loads each model given on the command line as a user would (MLflow's loader) and samples the
# input example logged with it where asked, then prints the top-level modules the process imported
# and where genflow came from.
LOAD_EVERY_FAMILY = """
import json, sys
import mlflow
for path, sample in zip(sys.argv[1::2], sys.argv[2::2]):
    model = mlflow.pyfunc.load_model(path)
    if sample == "sample":
        assert model.predict(model.input_example).shape == (2, 3, 64, 64)
import genflow
print(json.dumps({"genflow": genflow.__file__, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_every_family_loads_with_its_requirements_alone(tmp_path):
    # Issue 13: the logged requirements missed torchmetrics, which the vae module imports on load.
    # Every family's model is saved as log_sampler logs it, then loaded by MLflow and sampled with the
    # input example saved with it (conditioned for cgan) in an interpreter that sees only the
    # requirements and what pip installs with them (python -S, and a site-packages of links to their
    # files: what a virtualenv built from requirements.txt holds, without the minutes of installing),
    # from another folder and with genflow only in the model's own code. Each listed requirement
    # must be imported (the list is not padded).
    arguments = []
    for family in FAMILY_NAMES:
        mlflow.pyfunc.save_model(tmp_path / family, **model_spec(tiny_model_file(tmp_path, family), 64))
        # pixelcnn samples pixel by pixel (80 s of CPU for two tiny images); no family imports anything to sample.
        arguments += [str(tmp_path / family), "sample" if family != "pixelcnn" else "load"]
    site = site_packages_of(with_dependencies(LOAD_REQUIREMENTS), tmp_path / "site-packages")
    done = subprocess.run([sys.executable, "-S", "-c", LOAD_EVERY_FAMILY, *arguments], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=clean_env(PYTHONPATH=str(site), PYTHONDONTWRITEBYTECODE="1",
                                                                MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["genflow"]).is_relative_to(tmp_path / FAMILY_NAMES[0]), report["genflow"]  # the model's copy, not this checkout
    distributions = metadata.packages_distributions()
    imported = {normalized(name) for module in report["modules"] for name in distributions.get(module, [])}
    assert not [name for name in LOAD_REQUIREMENTS if normalized(name) not in imported]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Run by the fresh virtual environment's python: genflow is not importable before the model loads;
# each registered model (by alias, from the tracking server) samples what the test expects.
LOAD_IN_FRESH_ENV = """
import importlib.util, json, sys
assert importlib.util.find_spec("genflow") is None, "genflow is importable in the fresh environment"
import mlflow, numpy as np, pandas as pd
for uri, request, expected in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    images = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame(json.loads(request)))
    assert images.shape == (2, 3, 64, 64) and images.dtype == np.uint8, (images.shape, images.dtype)
    assert np.array_equal(images, np.load(expected)), uri + ": other images than where it was trained"
print("sampled", sys.argv[1::3])
"""


@pytest.mark.slow
def test_registered_model_samples_in_a_fresh_virtualenv_built_from_its_requirements(tmp_path, monkeypatch):
    # Issue 13: the registered model loads where genflow is not installed, from its own logged
    # requirements.txt, with pickle deserialisation refused. The environment is a plain `python -m venv`
    # (no system site packages) with `pip install -r requirements.txt` (torch from the CPU wheel that
    # pip's configuration finds on disk); it reaches the registry as a serving host would, through
    # an MLflow tracking server. Its installs take minutes (README.md, "The registered model").
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("portable", artifact_location=(tmp_path / "artifacts").as_uri())
    arguments = []
    for family in ("vae", "cgan"):  # cgan: conditioned, and the family whose module imports pyarrow
        with mlflow.start_run(experiment_id=experiment):
            info = log_sampler(tiny_model_file(tmp_path, family), 64)
        version = mlflow.register_model(info.model_uri, f"celeba64-{family}")
        mlflow.MlflowClient().set_registered_model_alias(f"celeba64-{family}", "candidate", version.version)
        uri = f"models:/celeba64-{family}@candidate"
        np.save(tmp_path / f"{family}.npy", mlflow.pyfunc.load_model(uri).predict(request(family, 2, seed=3)))
        arguments += [uri, json.dumps(request(family, 2, seed=3).to_dict("list")), str(tmp_path / f"{family}.npy")]
    requirements = mlflow.pyfunc.get_model_dependencies("models:/celeba64-vae@candidate")
    assert "torchmetrics==" in Path(requirements).read_text()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                              cwd=tmp_path, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        venv = tmp_path / "venv"
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        python = venv / "bin" / "python"
        install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check",
                                  "-r", requirements], capture_output=True, text=True, timeout=1200, env=clean_env())
        assert install.returncode == 0, install.stderr[-3000:]
        print(f"fresh environment built from requirements.txt in {time.monotonic() - started:.0f} s")
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(1)
        done = subprocess.run([str(python), "-c", LOAD_IN_FRESH_ENV, *arguments], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600,
                              env=clean_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}",
                                            MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false"))
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        server.terminate()
        server.wait(timeout=60)
