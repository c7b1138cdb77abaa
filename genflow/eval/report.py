"""`genflow evaluate FAMILY`: test metrics of the family's training run with the current params,
logged into that MLflow run as `test/*` (what the registry's promotion gate compares).

    genflow evaluate vae          (or: dvc repro evaluate@vae)
"""

from __future__ import annotations

import time

import mlflow
import torch

from genflow.config import Params
from genflow.data.celeba import ATTRIBUTE_NAMES
from genflow.eval.metrics import evaluate_batches
from genflow.eval.quality import parameter_count, sample_quality, training_images_per_s
from genflow.images import image_grid
from genflow.track import mlflow as tracking
from genflow.track.identity import finished_training_run
from genflow.track.pyfunc import logged_model_id


def load_trained_model(run_id: str):
    """The GenerativeModel inside a run's logged pyfunc."""
    return mlflow.pyfunc.load_model(f"models:/{logged_model_id(run_id)}").unwrap_python_model().model


def evaluate_family(family: str, params: Params, run_id: str | None = None) -> dict[str, float]:
    """Score the family's finished training run (`run_id`, else the one the params name) on the test split."""
    from genflow.data.loader import dataset_digest, eval_loader

    run = finished_training_run(family, params, run_id)
    model = load_trained_model(run.info.run_id)
    device = torch.device("cuda" if params.train.gpu and torch.cuda.is_available() else "cpu")
    model.to(device)
    batches = eval_loader(params.data.shards, split="test", batch_size=params.evaluate.batch_size,
                          image_range=model.image_range, limit_batches=params.evaluate.batches)
    # Seeded (a VAE's ELBO draws posterior noise), so that the gate compares like with like.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(params.evaluate.seed)
        metrics = evaluate_batches(model, batches, device)
    # What these numbers were scored on: the registry refuses to compare versions scored otherwise.
    scored_on = {"dataset": dataset_digest(params.data.shards), "split": "test", "seed": params.evaluate.seed,
                 "evaluation": f"batches={params.evaluate.batches} batch_size={params.evaluate.batch_size}",
                 "measures": ",".join(sorted(name for name in metrics if name != "images"))}
    metrics.update(sample_quality(model, params, device))
    metrics["parameters"] = parameter_count(model)
    train_speed = training_images_per_s(run.info.run_id)
    if train_speed is not None:
        metrics["train_images_per_s"] = train_speed
    client = mlflow.MlflowClient()
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    # Logged on the run and on the model it logged (MLflow 3's LoggedModel), whose page the registered
    # version links to as its source model.
    model_id = logged_model_id(run_id)
    tracking.with_retries(lambda: client.log_batch(run_id, metrics=[
        mlflow.entities.Metric(f"test/{k}", float(v), now, 0, model_id=model_id) for k, v in metrics.items()]))
    tracking.record_scoring(run_id, scored_on)
    n = params.evaluate.sample_n
    cond = torch.zeros(n, len(ATTRIBUTE_NAMES), device=device) if model.conditional else None
    samples = model.sample(n, cond=cond, generator=torch.Generator(device).manual_seed(0))
    tracking.with_retries(lambda: client.log_image(run_id, image_grid(samples.cpu()), artifact_file="evaluation/samples.png"))
    print(f"{family} (run {run_id}): " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return {"run_id": run_id, **metrics}
