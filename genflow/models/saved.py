"""The released-model file: what a trained model is, apart from how it was trained.

    model.pt    {"family", "config", "state_dict"}: enough to rebuild the model with genflow alone

Read with `torch.load(weights_only=True)`: tensors, strings and numbers only, no pickled code, so
loading a model file cannot run anything. Checkpoints (genflow/train/checkpoint.py) and the
registered MLflow model (genflow/track/pyfunc.py) both carry this file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genflow.atomic import atomic_path
from genflow.models.families import get_family
from genflow.models.protocol import GenerativeModel

MODEL_FILE = "model.pt"


def save_model(path: str | Path, family: str, model: GenerativeModel) -> None:
    """Write the model file (atomically: a killed writer leaves no half file)."""
    with atomic_path(path) as temporary:
        torch.save({"family": family, "config": model.config.model_dump(mode="json"), "state_dict": model.state_dict()},
                   temporary)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> GenerativeModel:
    """Rebuild a trained model from a model file, or a directory holding one, in eval mode."""
    path = Path(path)
    path = path / MODEL_FILE if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no model file (expected {MODEL_FILE})")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model_class = get_family(saved["family"])
    model = model_class(model_class.config_class(**saved["config"]))
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval()
