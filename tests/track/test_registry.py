"""Train -> evaluate -> register -> promote -> sample, on tiny shards and a real MLflow store."""

import subprocess

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from genflow.cli import main
from genflow.data.shards import prepare
from genflow.data.synth import write_sample
from genflow.eval.report import evaluate_family
from genflow.train.trainer import train
from genflow.track.mlflow import TrackingError, configure
from genflow.track.registry import PromotionRefused, format_registry, promote, register_family

pytestmark = pytest.mark.slow

OVERRIDES = ["train.workers=1", "train.max_steps=4", "train.checkpoint_every=4", "evaluate.batches=2",
             "evaluate.batch_size=16", "evaluate.sample_n=4", "data.sample.n=60", "data.max_reject_fraction=0"]


@pytest.fixture(scope="module")
def registered(ray_local, tmp_path_factory):
    """One trained, evaluated, registered tiny VAE (version 1, alias candidate)."""
    from tests.conftest import TINY_VAE
    from genflow.config import apply_overrides, load_params

    root = tmp_path_factory.mktemp("registry")
    raw = apply_overrides({}, [*TINY_VAE, *OVERRIDES, f"tracking.uri=sqlite:///{root}/mlflow.db",
                               f"train.storage_path={root}/ray", f"data.shards={root}/shards",
                               f"data.sample.dir={root}/sample", "train.batch_size=8"])
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    params = load_params(params_file)
    write_sample(params.data.sample.dir, n=params.data.sample.n)
    prepare(params.data)
    train("vae", params)
    evaluate_family("vae", params)
    version = register_family("vae", params)
    return params, params_file, version


def test_registered_version_carries_metrics_card_and_alias(registered):
    params, _, version = registered
    client = mlflow.MlflowClient()
    assert str(version.version) == "1"
    stored = client.get_model_version("celeba64-vae", "1")
    assert float(stored.tags["test.bits_per_dim"]) > 0 and float(stored.tags["test.reconstruction_psnr"]) > 0
    assert "reconstruction_psnr" in stored.description and "synthetic sample" in stored.description
    # What the metrics were scored on, recorded on the version.
    assert len(stored.tags["genflow.scored.dataset"]) == 64 and stored.tags["genflow.scored.split"] == "test"
    assert stored.tags["genflow.scored.seed"] == "0" and stored.tags["genflow.scored.evaluation"] == "batches=2 batch_size=16"
    assert "bits_per_dim" in stored.tags["genflow.scored.measures"].split(",")
    assert str(client.get_model_version_by_alias("celeba64-vae", "candidate").version) == "1"
    assert "candidate" in format_registry(params)


def test_registering_the_same_run_again_adds_no_version_and_refreshes_its_evaluation(registered, capsys):
    # Issue 13: `dvc repro` after an operational param changed ran register again, which added a
    # second version of the same run. One version per training run.
    params, _, first = registered
    client = mlflow.MlflowClient()
    psnr = client.get_model_version("celeba64-vae", "1").tags["test.reconstruction_psnr"]
    client.set_model_version_tag("celeba64-vae", "1", "test.reconstruction_psnr", "-1")  # a re-evaluation's
    client.set_model_version_tag("celeba64-vae", "1", "test.fd_other", "3")  # a measure it no longer reports
    client.delete_registered_model_alias("celeba64-vae", "candidate")
    again = register_family("vae", params)
    assert str(again.version) == "1" and again.run_id == first.run_id
    assert "version 1 already holds run" in capsys.readouterr().err
    assert len(client.search_model_versions(f"name = 'celeba64-vae' and run_id = '{first.run_id}'")) == 1
    stored = client.get_model_version("celeba64-vae", "1")
    assert stored.tags["test.reconstruction_psnr"] == psnr and "test.fd_other" not in stored.tags
    assert str(client.get_model_version_by_alias("celeba64-vae", "candidate").version) == "1"


def test_the_training_run_records_the_git_commit(registered):
    _, _, version = registered
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    tags = mlflow.MlflowClient().get_run(version.run_id).data.tags
    if head.returncode == 0:
        assert tags["mlflow.source.git.commit"] == head.stdout.strip() and tags["genflow.git.dirty"] in ("true", "false")
    else:  # tests run outside a git checkout: nothing is claimed
        assert "mlflow.source.git.commit" not in tags


def another_version(client) -> "mlflow.entities.model_registry.ModelVersion":
    """A second version of the registered run, made with MLflow itself (genflow's register makes one
    version per run), carrying version 1's tags: what the promotion gate compares."""
    first = client.get_model_version("celeba64-vae", "1")
    return mlflow.register_model(first.source, "celeba64-vae",
                                 tags={k: v for k, v in first.tags.items() if k.startswith(("test.", "genflow.scored."))})


def test_test_metrics_are_metrics_of_the_registered_model_and_its_description_names_the_data(registered):
    # Issue 13: MLflow 3 shows a version's metrics on its source model (the LoggedModel the run
    # logged), and the registered model's description said "CelebA" of a model trained on the sample.
    client = mlflow.MlflowClient()
    stored = client.get_model_version("celeba64-vae", "1")
    assert stored.source.startswith("models:/m-")
    on_model = {m.key: m.value for m in client.get_logged_model(stored.source.removeprefix("models:/")).metrics}
    on_run = {k: v for k, v in client.get_run(stored.run_id).data.metrics.items() if k.startswith("test/")}
    assert on_run and {k: on_model.get(k) for k in on_run} == on_run
    description = client.get_registered_model("celeba64-vae").description
    assert "version 1 on the **synthetic sample** (not CelebA)" in description, description


def test_registered_pyfunc_loads_and_samples(registered):
    model = mlflow.pyfunc.load_model("models:/celeba64-vae@candidate")
    images = model.predict(pd.DataFrame({"n": [3], "seed": [0]}))
    assert images.shape == (3, 3, 64, 64) and images.dtype == np.uint8
    again = model.predict(pd.DataFrame({"n": [3], "seed": [0]}))
    other = model.predict(pd.DataFrame({"n": [3], "seed": [1]}))
    assert np.array_equal(images, again) and not np.array_equal(images, other)


def test_promotion_gate_refuses_worse_forces_and_production_takes_only_the_current_staging(registered):
    params, _, _ = registered
    client = mlflow.MlflowClient()
    with pytest.raises(PromotionRefused, match="not the current staging version"):
        promote(params, "celeba64-vae", "1", "production")
    assert "now staging" in promote(params, "celeba64-vae", "1", "staging", reason="first model")
    staged = client.get_model_version("celeba64-vae", "1")
    assert staged.tags["genflow.promoted.staging.reason"] == "first model"
    assert staged.tags["genflow.promoted.staging.by"] and staged.tags["genflow.promoted.staging.at"]

    worse = another_version(client)
    value = float(client.get_model_version("celeba64-vae", "1").tags["test.reconstruction_psnr"]) - 1.0
    client.set_model_version_tag("celeba64-vae", str(worse.version), "test.reconstruction_psnr", str(value))
    with pytest.raises(PromotionRefused, match=r"worse than staging version 1"):
        promote(params, "celeba64-vae", str(worse.version), "staging")
    assert str(client.get_model_version_by_alias("celeba64-vae", "staging").version) == "1"
    message = promote(params, "celeba64-vae", str(worse.version), "staging", force=True, reason="testing the override")
    assert "[forced]" in message
    assert client.get_model_version("celeba64-vae", str(worse.version)).tags["genflow.promoted.staging.forced"] == "true"
    assert str(client.get_model_version_by_alias("celeba64-vae", "staging").version) == str(worse.version)

    # Version 1 was staged once, but staging has moved on: it does not go to production.
    with pytest.raises(PromotionRefused, match=f"not the current staging version \\(version {worse.version} is\\)"):
        promote(params, "celeba64-vae", "1", "production")
    assert "now production" in promote(params, "celeba64-vae", str(worse.version), "production")
    assert str(client.get_model_version_by_alias("celeba64-vae", "production").version) == str(worse.version)


def test_promotion_refuses_versions_scored_differently_naming_the_field(registered):
    params, _, _ = registered
    client = mlflow.MlflowClient()
    staging = client.get_model_version_by_alias("celeba64-vae", "staging")
    other = another_version(client)
    # Scored on other data, with a better metric: still not comparable.
    client.set_model_version_tag("celeba64-vae", str(other.version), "genflow.scored.dataset", "f" * 64)
    value = float(staging.tags["test.reconstruction_psnr"]) + 5.0
    client.set_model_version_tag("celeba64-vae", str(other.version), "test.reconstruction_psnr", str(value))
    with pytest.raises(PromotionRefused, match=r"scored differently \(dataset: f{64} vs [0-9a-f]{64}\)"):
        promote(params, "celeba64-vae", str(other.version), "staging")
    assert "[forced]" in promote(params, "celeba64-vae", str(other.version), "staging", force=True, reason="new data")


def test_evaluation_behind_the_gate_is_seeded(registered):
    params, _, _ = registered
    first = evaluate_family("vae", params)
    again = evaluate_family("vae", params)
    assert first["elbo_nats"] == again["elbo_nats"] and first["bits_per_dim"] == again["bits_per_dim"]


def test_cli_sample_writes_a_grid_and_refuses_attributes_for_an_unconditional_model(registered, tmp_path, capsys):
    _, params_file, _ = registered
    out = tmp_path / "grid.png"
    assert main(["sample", "celeba64-vae@candidate", "--n", "4", "--out", str(out), "--params", str(params_file)]) == 0
    assert Image.open(out).size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)
    assert main(["sample", "celeba64-vae/1", "--n", "4", "--out", str(out), "--attr", "Smiling=1", "--params", str(params_file)]) == 2
    assert "unconditional" in capsys.readouterr().err
    assert main(["registry", "list", "--params", str(params_file)]) == 0
    assert "celeba64-vae" in capsys.readouterr().out


def test_unreachable_tracking_server_is_a_clear_error():
    from genflow.config import TrackingParams

    with pytest.raises(TrackingError, match="http://127.0.0.1:9 is unreachable"):
        configure(TrackingParams(uri="http://127.0.0.1:9"))


def test_registered_model_description_groups_versions_by_the_data_they_were_trained_on(tmp_path):
    from genflow.track.registry import registered_model_description

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        client = mlflow.MlflowClient()
        client.create_registered_model("celeba64-vae")
        for source in ("sample", "sample", "celeba", None):
            run = client.create_run(client.create_experiment(f"e{source}-{len(client.search_experiments())}"),
                                    tags={"genflow.data_source": source} if source else {})
            client.create_model_version("celeba64-vae", (tmp_path / "model").as_uri(), run_id=run.info.run_id)
        description = registered_model_description("vae")
    finally:
        mlflow.set_tracking_uri(previous)
    assert ("Trained: versions 1, 2 on the **synthetic sample** (not CelebA); "
            "version 3 on CelebA, aligned, 148x148 centre crop resized to 64x64; version 4 on data not recorded.") in description
