"""What the registered model does when loaded: an MLflow PythonModel that turns (n, seed) into images.

    model = mlflow.pyfunc.load_model("models:/celeba64-vae@staging")
    images = model.predict(pd.DataFrame({"n": [16], "seed": [0]}))   # uint8 [16, 3, 64, 64]
    model.predict(pd.DataFrame({"n": [16], "seed": [0], "sampler": ["ddim"], "steps": [50], "eta": [0.0]}))

The optional columns `sampler`, `steps`, `eta` choose how families with sampler choices (ddpm)
sample; absent or empty, the registered model's defaults apply. An optional `attrs` column (40
0/1 values) conditions conditional families.

This module is on the registered model's load path (sampler_code.py imports it; genflow/track/pyfunc.py
logs it), so it imports only what loading needs: every import here is a requirement of the model.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

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


class GenerativeSampler(PythonModel):
    def load_context(self, context) -> None:
        # The weights file is read with torch.load(weights_only=True): loading runs no pickled code.
        from genflow.models.saved import load_model

        self.model = load_model(context.artifacts["checkpoint"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        """One row per request: `n` images drawn with `seed`; the rows' images are concatenated."""
        images = []
        for row in model_input.to_dict("records"):
            generator = torch.Generator().manual_seed(int(row["seed"]))
            cond = None
            if isinstance(row.get("attrs"), (list, np.ndarray)):  # absent: None or NaN
                cond = torch.tensor(row["attrs"], dtype=torch.float32).expand(int(row["n"]), -1)
            options = sampler_options(self.model, **{key: row.get(key) for key in SAMPLER_OPTIONS})
            images.append(self.model.sample(int(row["n"]), cond=cond, generator=generator, **options).numpy())
        return np.concatenate(images)
