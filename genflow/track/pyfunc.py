"""The logged model: an MLflow pyfunc that turns (n, seed) into generated images.

    model = mlflow.pyfunc.load_model("models:/celeba64-vae@staging")
    images = model.predict(pd.DataFrame({"n": [16], "seed": [0]}))   # uint8 [16, 3, 64, 64]
    model.predict(pd.DataFrame({"n": [16], "seed": [0], "sampler": ["ddim"], "steps": [50], "eta": [0.0]}))

The optional columns `sampler`, `steps`, `eta` choose how families with sampler choices (ddpm)
sample; absent or empty, the registered model's defaults apply.

It carries the checkpoint's model.pt and genflow's own code (code_paths), so it loads wherever
torch and mlflow are installed, without the training project.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema, TensorSpec
from mlflow.types.schema import Array

import genflow

MODEL_ARTIFACT = "model"  # name of the logged model inside the run
# Keyword arguments of `sample` for families with sampler choices (genflow/models/protocol.py).
SAMPLER_OPTIONS = ("sampler", "steps", "eta")


def sampler_options(model, **given) -> dict:
    """The sampler options a request gives (None or NaN: not given), checked against what the
    model's `sample` takes: an option the family does not have is an error, not ignored."""
    given = {key: value for key, value in given.items()
             if value is not None and not (isinstance(value, float) and math.isnan(value))}
    accepted = inspect.signature(model.sample).parameters
    refused = [key for key in given if key not in accepted]
    if refused:
        choices = [key for key in SAMPLER_OPTIONS if key in accepted]
        raise ValueError(f"{type(model).__name__} samples without {', '.join(refused)}: "
                         f"it takes {', '.join(choices) if choices else 'no sampler options'}; leave them out")
    casts = {"sampler": str, "steps": int, "eta": float}  # pandas holds them as numpy scalars
    return {key: casts[key](value) for key, value in given.items()}


class GenerativeSampler(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from genflow.models.saved import load_model

        self.model = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        """One row per request: `n` images drawn with `seed`; the rows' images are concatenated.
        An optional `attrs` column (a list of 40 0/1 values) conditions conditional families;
        optional `sampler`, `steps`, `eta` columns choose the sampler where the family has one."""
        images = []
        for row in model_input.to_dict("records"):
            generator = torch.Generator().manual_seed(int(row["seed"]))
            cond = None
            if isinstance(row.get("attrs"), (list, np.ndarray)):  # absent: None or NaN
                cond = torch.tensor(row["attrs"], dtype=torch.float32).expand(int(row["n"]), -1)
            options = sampler_options(self.model, **{key: row.get(key) for key in SAMPLER_OPTIONS})
            images.append(self.model.sample(int(row["n"]), cond=cond, generator=generator, **options).numpy())
        return np.concatenate(images)


def signature(image_size: int) -> ModelSignature:
    """n and seed per row, and the optional `attrs` that `predict` reads (MLflow drops input
    columns its signature does not name)."""
    return ModelSignature(
        inputs=Schema([ColSpec("long", "n"), ColSpec("long", "seed"), ColSpec(Array(DataType.double), "attrs", required=False),
                       ColSpec("string", "sampler", required=False), ColSpec("long", "steps", required=False),
                       ColSpec("double", "eta", required=False)]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, image_size, image_size))]),
    )


def log_sampler(checkpoint_model_file: str | Path, image_size: int):
    """Log the trained model into the active run; returns MLflow's ModelInfo."""
    genflow_code = str(Path(genflow.__file__).parent)
    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=GenerativeSampler(),
        artifacts={"checkpoint": str(checkpoint_model_file)},
        code_paths=[genflow_code],
        signature=signature(image_size),
        input_example=pd.DataFrame({"n": [2], "seed": [0]}),
        # Named explicitly: inferring them would import and probe the whole environment.
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}",
            "numpy",
            "pandas",
            "pydantic>=2",
            "pyyaml",
        ],
    )
