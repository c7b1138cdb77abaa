"""`genflow evaluate FAMILY` end to end on a finished run made by hand (no Ray): the sample-quality
figures, their sample count, the parameter count and the training speed land in the DVC dict and
in the run's test/* metrics."""

import mlflow

from genflow.data.loader import dataset_digest
from genflow.eval.report import evaluate_family
from genflow.models.saved import save_model
from genflow.track import mlflow as tracking
from genflow.track.pyfunc import log_sampler, logged_model_id
from genflow.track.identity import run_key
from tests.eval.test_quality import tiny_vae
from tests.models.tiny import tiny_overrides


def test_evaluate_reports_sample_quality_into_the_training_run(tmp_path, eval_shards):
    from genflow.config import load_params

    params = load_params(tmp_path / "none.yaml", [
        *tiny_overrides("vae"), f"data.shards={eval_shards}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "evaluate.batches=1", "evaluate.batch_size=8", "evaluate.sample_n=4", "evaluate.cpu_samples=6",
        "evaluate.kid_subsets=2", f"evaluate.stats_cache={tmp_path}/stats", f"evaluate.featurizer.path={tmp_path}/none.pt"])
    experiment = tracking.configure(params.tracking)
    model = tiny_vae()
    save_model(tmp_path / "model.pt", "vae", model)
    key = run_key("vae", params, dataset_digest(eval_shards))
    with mlflow.start_run(experiment_id=experiment, tags={tracking.FAMILY_TAG: "vae", tracking.RUN_KEY_TAG: key}) as run:
        for step, speed in enumerate((100.0, 300.0, 200.0)):
            mlflow.log_metric("train/images_per_s", speed, step=step)
        log_sampler(tmp_path / "model.pt", 64)

    metrics = evaluate_family("vae", params)
    assert metrics["run_id"] == run.info.run_id
    assert metrics["fd_effnet"] > 0 and metrics["fd_effnet_n"] == 6
    assert {"kid_effnet", "precision_effnet", "recall_effnet", "reconstruction_ssim", "bits_per_dim"} <= set(metrics)
    assert metrics["parameters"] == sum(p.numel() for p in model.parameters())
    assert metrics["train_images_per_s"] == 200.0  # the median of the run's windows
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    assert logged["test/fd_effnet"] == metrics["fd_effnet"] and logged["test/fd_effnet_n"] == 6
    # ...and on the model the run logged (MLflow 3's LoggedModel: what a registered version shows).
    on_model = mlflow.MlflowClient().get_logged_model(logged_model_id(run.info.run_id)).metrics
    test_metrics = {key: value for key, value in logged.items() if key.startswith("test/")}
    assert {m.key: m.value for m in on_model if m.key.startswith("test/")} == test_metrics

    # genflow report on top: the row, the run's sample grid and the VAE's latent pictures, logged.
    import json

    from genflow.eval.compare import report

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "vae.json").write_text(json.dumps(metrics))
    written = report(params, out_dir=tmp_path / "reports", metrics_dir=tmp_path / "metrics")
    assert {"samples_vae.png", "interpolations_vae.png", "trilemma.png"} <= set(written)
    assert "<td>vae</td>" in written["html"].read_text()
    runs = mlflow.search_runs(experiment_ids=[experiment], filter_string="tags.`genflow.role` = 'report'")
    assert len(runs) == 1
