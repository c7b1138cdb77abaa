"""Logging the trained model as an MLflow pyfunc (the model `genflow register` registers).

What the model does on load and predict is genflow/track/sampler.py; MLflow loads it from code
(genflow/track/sampler_code.py, models-from-code) with genflow's package as code_paths and the
checkpoint's model.pt (read with torch.load(weights_only=True)) as an artifact. No pickled Python
object is logged, so the model loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false, and where
genflow is not installed: in an environment built from the model's own requirements.txt.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema, TensorSpec
from mlflow.types.schema import Array

import genflow
from genflow.data.celeba import ATTRIBUTE_NAMES
from genflow.models.families import get_family
from genflow.track import mlflow as tracking

MODEL_ARTIFACT = "model"  # name of the logged model inside the run
MODEL_CODE = Path(__file__).with_name("sampler_code.py")

# The distributions the model imports when MLflow loads it and predicts: mlflow's client
# (mlflow-skinny: the `mlflow` package without the tracking server's dependencies), the code in
# sampler.py, genflow.models.saved and the family modules (genflow.config: pydantic, yaml; vae, ae:
# torchmetrics; gan: genflow.data.celeba, pyarrow), and pandas, which the input arrives in.
# tests/track/test_pyfunc.py loads every family in a fresh interpreter and checks this list against
# what it imported (neither short nor padded).
LOAD_REQUIREMENTS = ("mlflow-skinny", "torch", "numpy", "pandas", "pydantic", "pyyaml", "torchmetrics", "pyarrow")


def pinned_requirements() -> list[str]:
    """LOAD_REQUIREMENTS pinned to the versions installed here, without local build labels
    (torch 2.13.0+cpu is pinned as torch==2.13.0: a GPU machine installs its own build)."""
    return [f"{name}=={metadata.version(name).split('+')[0]}" for name in LOAD_REQUIREMENTS]


def logged_model_id(run_id: str) -> str:
    """The id of the model (MLflow 3's LoggedModel) that training run `run_id` logged; the newest,
    should a resumed run have logged another. Evaluation scores it and logs its test metrics on it;
    registration registers it."""
    client = mlflow.MlflowClient()
    experiment_id = tracking.with_retries(lambda: client.get_run(run_id)).info.experiment_id
    found = tracking.with_retries(lambda: client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"name = '{MODEL_ARTIFACT}' AND source_run_id = '{run_id}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}], max_results=1))
    if not found:
        raise FileNotFoundError(f"run {run_id} logged no model {MODEL_ARTIFACT!r}: it did not finish training; "
                                "run `genflow train` again")
    return found[0].model_id


def signature(image_size: int) -> ModelSignature:
    """n and seed per row, and the optional `attrs` that `predict` reads (MLflow drops input
    columns its signature does not name)."""
    return ModelSignature(
        inputs=Schema([ColSpec("long", "n"), ColSpec("long", "seed"), ColSpec(Array(DataType.double), "attrs", required=False),
                       ColSpec("string", "sampler", required=False), ColSpec("long", "steps", required=False),
                       ColSpec("double", "eta", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, image_size, image_size))]),
    )


def input_example(checkpoint_model_file: str | Path) -> pd.DataFrame:
    """Two images with seed 0, and for a conditional family the attributes each image needs (the
    model file names its family; mmap reads that without reading the weights)."""
    family = torch.load(checkpoint_model_file, map_location="cpu", weights_only=True, mmap=True)["family"]
    example = {"n": [2], "seed": [0]}
    if get_family(family).conditional:
        example["attrs"] = [[0.0] * len(ATTRIBUTE_NAMES)]
    return pd.DataFrame(example)


def model_spec(checkpoint_model_file: str | Path, image_size: int) -> dict:
    """The arguments of mlflow.pyfunc.log_model (or save_model) that make the model of a model file."""
    return dict(
        python_model=str(MODEL_CODE),
        artifacts={"checkpoint": str(checkpoint_model_file)},
        code_paths=[str(Path(genflow.__file__).parent)],
        signature=signature(image_size),
        input_example=input_example(checkpoint_model_file),
        # Named, not inferred: inference loads the model in a subprocess at every training run's end.
        pip_requirements=pinned_requirements(),
    )


def log_sampler(checkpoint_model_file: str | Path, image_size: int):
    """Log the trained model into the active run; returns MLflow's ModelInfo."""
    return mlflow.pyfunc.log_model(name=MODEL_ARTIFACT, **model_spec(checkpoint_model_file, image_size))
