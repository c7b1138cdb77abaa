"""Params: the embedded defaults, -S overrides, and clear errors; config.py's place in the layers."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import genflow.models.families  # noqa: F401  (the family table: models.* sections are validated)
from genflow.config import Params, ParamsError, flatten, load_params
from genflow.models.families import FAMILY_NAMES


def test_params_yaml_repeats_the_embedded_defaults(tmp_path):
    shipped = load_params("params.yaml")
    embedded = load_params(tmp_path / "missing.yaml")
    for section in ("train", "tracking", "ray", "evaluate"):
        assert getattr(shipped, section) == getattr(embedded, section), section
    # The sample by its path in params.yaml (prepare's DVC dependency), by name embedded: the same folder.
    assert shipped.data.model_dump(exclude={"source"}) == embedded.data.model_dump(exclude={"source"})
    assert shipped.data.source == shipped.data.sample.dir and embedded.data.source == "sample"
    assert shipped.data.is_sample() and embedded.data.is_sample()
    assert shipped.data.source_path() == embedded.data.source_path()
    # A family's schedule lengths in params.yaml fit the short sample run; its class defaults
    # are the papers'. Everything else is the same.
    shipped_vae, embedded_vae = shipped.family_config("vae"), embedded.family_config("vae")
    assert shipped_vae.model_dump(exclude={"kl"}) == embedded_vae.model_dump(exclude={"kl"})
    assert shipped_vae.kl.kind == embedded_vae.kl.kind and shipped_vae.kl.weight == embedded_vae.kl.weight


def test_overrides_are_yaml_values_on_dotted_keys(tmp_path):
    params = load_params(tmp_path / "none.yaml", ["train.max_steps=7", "train.gpu=true", "models.vae.hidden_channels=[8,16]",
                                                  "data.source=/data/celeba.zip"])
    assert params.train.max_steps == 7 and params.train.gpu is True
    assert params.family_config("vae").hidden_channels == (8, 16)
    assert params.data.source_path().as_posix() == "/data/celeba.zip" and not params.data.is_sample()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_stepz=3", "train.max_stepz: Extra inputs are not permitted"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("models.vae.kl.kind=sigmoid", "models.vae.kl.kind"),
        ("models.nope.x=1", "models.nope: unknown family"),
        ("train.max_steps", "expected key=value"),
        ("train.max_steps.x=1", "max_steps is a value, not a section"),
    ],
)
def test_bad_params_name_the_key(tmp_path, override, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 5}}))
    with pytest.raises(ParamsError, match=message.replace("(", r"\(")):
        load_params(path, [override])


def test_malformed_params_file_is_a_clear_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="params.yaml: not valid YAML"):
        load_params(path)


def test_tracking_uri_from_the_environment_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert Params().tracking.resolved_uri() == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert Params().tracking.resolved_uri() == "sqlite:///mlflow.db"


def test_flatten_gives_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}}) == {"a.b": 1, "a.c.d": [1, 2]}


def test_reading_params_imports_no_model():
    code = ("import sys; from genflow.config import load_params; load_params('params.yaml'); "
            "print(sorted(m for m in sys.modules if m.startswith('genflow.models') or m == 'torch'))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_dvc_foreach_lists_exactly_the_family_table():
    families = next(v["families"] for v in yaml.safe_load(Path("dvc.yaml").read_text())["vars"] if "families" in v)
    assert families == list(FAMILY_NAMES)


def test_a_familys_checks_against_training_params_wait_until_that_family_is_configured():
    # Review finding: sae's phase lengths (150 steps by default) were checked against
    # train.max_steps on every command, so `genflow train vae -S train.max_steps=100` failed.
    params = load_params(None, ["train.max_steps=100", "models.sae.layer_steps=[30,30,30,30,30]"])
    assert params.family_config("vae").latent_dim >= 1
    with pytest.raises(ParamsError, match=r"models\.sae\.layer_steps: the greedy phases take 150 steps"):
        params.family_config("sae")
