"""`genflow sample MODEL --attr NAME=0|1`: attributes reach a conditional model, bad ones are one clear line.

The store holds registered names, versions and aliases (what `sample` checks before it downloads
anything), but the model itself is a tiny in-memory one (mlflow.pyfunc.load_model patched): what is
under test is the command, not the registry (tests/track/test_registry.py covers that).
"""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from genflow.cli import main
from genflow.data.celeba import ATTRIBUTE_NAMES
from genflow.models.gan import CGAN, DCGAN, CGANConfig, DCGANConfig
from tests.data.test_attributes import write_manifest
from tests.models.tiny import TINY_CONFIGS


class Loaded:
    """What mlflow.pyfunc.load_model returns, as far as `genflow sample` uses it."""

    def __init__(self, model):
        self.model = model

    def unwrap_python_model(self):
        return self

    def predict(self, frame):
        row = frame.iloc[0]
        return self.model.sample(int(row["n"]), generator=torch.Generator().manual_seed(int(row["seed"]))).numpy()


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One store for the module (creating MLflow's tables costs seconds), holding the references
    the tests sample: celeba64-cgan@staging and celeba64-dcgan@staging (version 1 of each)."""
    import mlflow

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name in ("celeba64-cgan", "celeba64-dcgan"):
        client.create_registered_model(name)
        version = client.create_model_version(name, source=str(folder / name))  # never read: load_model is patched
        client.set_registered_model_alias(name, "staging", version.version)
    return uri


@pytest.fixture
def registered(monkeypatch, tmp_path, tracking_uri):
    """Make `genflow sample` find `model` as any registered model; returns the CLI's common args."""

    def install(model):
        import mlflow.pyfunc  # the module itself: `mlflow.pyfunc` starts as a lazy stand-in that replaces itself

        monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda uri: Loaded(model))
        return ["-S", f"tracking.uri={tracking_uri}", "-S", f"data.shards={tmp_path}/shards"]

    return install


def tiny_cgan() -> CGAN:
    torch.manual_seed(0)
    return CGAN(CGANConfig(**TINY_CONFIGS["cgan"]))


def test_named_attributes_reach_the_model_and_the_others_come_from_training_rows(registered, tmp_path):
    train = np.random.default_rng(0).integers(0, 2, (6, len(ATTRIBUTE_NAMES)))
    write_manifest(tmp_path / "shards", train, np.zeros((2, len(ATTRIBUTE_NAMES))))
    model = tiny_cgan()
    conditions = []
    sample = model.sample
    model.sample = lambda n, cond=None, generator=None: conditions.append(cond) or sample(n, cond=cond, generator=generator)
    common = registered(model)
    out = tmp_path / "grid.png"
    assert main(["sample", "celeba64-cgan@staging", "--attr", "Smiling=1", "--attr", "Eyeglasses=1", "--n", "16",
                 "--out", str(out), *common]) == 0
    assert Image.open(out).size == (4 * 66 + 2, 4 * 66 + 2)  # 16 images of 64 px, 2 px apart
    cond = conditions[0]
    named = [ATTRIBUTE_NAMES.index("Smiling"), ATTRIBUTE_NAMES.index("Eyeglasses")]
    assert cond.shape == (16, len(ATTRIBUTE_NAMES)) and (cond[:, named] == 1).all()
    others = [i for i in range(len(ATTRIBUTE_NAMES)) if i not in named]
    assert {tuple(r) for r in cond[:, others].int().tolist()} <= {tuple(r) for r in train[:, others].tolist()}


def test_the_grid_shows_the_requested_attribute(registered, tmp_path):
    write_manifest(tmp_path / "shards", np.zeros((4, len(ATTRIBUTE_NAMES))), np.zeros((1, len(ATTRIBUTE_NAMES))))
    common = registered(tiny_cgan())
    grids = {}
    for value in ("0", "1"):
        out = tmp_path / f"smiling{value}.png"
        assert main(["sample", "celeba64-cgan@staging", "--attr", f"Smiling={value}", "--n", "4", "--out", str(out), *common]) == 0
        grids[value] = np.asarray(Image.open(out))
    assert not np.array_equal(grids["0"], grids["1"])  # same seed, same noise: only Smiling differs


@pytest.mark.parametrize(
    ("attr", "message"),
    [("Smling=1", "'Smling' is not a CelebA attribute.*one of: 5_o_Clock_Shadow"),
     ("Smiling=2", "must be 0 .absent. or 1 .present., got '2'")],
)
def test_bad_attributes_are_one_clear_line(registered, tmp_path, capsys, monkeypatch, attr, message):
    from genflow.track import registry

    common = registered(tiny_cgan())

    def looked_up(reference):
        raise AssertionError(f"{reference} was looked up before --attr was checked")

    monkeypatch.setattr(registry, "check_model_reference", looked_up)  # a typo fails before the model is looked up
    assert main(["sample", "celeba64-cgan@staging", "--attr", attr, "--n", "4", "--out", str(tmp_path / "g.png"), *common]) == 2
    error = capsys.readouterr().err
    assert error.startswith("genflow: error: ") and len(error.strip().splitlines()) == 1
    assert re.search(message, error)
    assert not (tmp_path / "g.png").exists()


def test_attr_on_an_unconditional_model_is_an_error(registered, tmp_path, capsys):
    torch.manual_seed(0)
    common = registered(DCGAN(DCGANConfig(**TINY_CONFIGS["dcgan"])))
    out = tmp_path / "g.png"
    assert main(["sample", "celeba64-dcgan@staging", "--attr", "Smiling=1", "--n", "4", "--out", str(out), *common]) == 2
    assert re.search(r"celeba64-dcgan@staging is unconditional: it takes no --attr \(conditional families: .*cgan", capsys.readouterr().err)
    assert not out.exists()
    assert main(["sample", "celeba64-dcgan@staging", "--n", "4", "--out", str(out), *common]) == 0
    assert out.exists()


def test_a_conditional_model_without_the_manifest_says_so(registered, tmp_path, capsys):
    common = registered(tiny_cgan())
    assert main(["sample", "celeba64-cgan@staging", "--attr", "Smiling=1", "--n", "4", "--out", str(tmp_path / "g.png"), *common]) == 2
    assert "manifest.parquet is missing" in capsys.readouterr().err
