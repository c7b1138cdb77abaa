"""The table family name -> model class. Nothing else in genflow knows family names.

Entries are import paths, so that reading params does not import every model.
A family is listed here once it is built; the CLI, DVC's foreach and the registry follow.
"""

from __future__ import annotations

import importlib

_FAMILIES: dict[str, str] = {
    "vae": "genflow.models.vae:VAE",
    "ae": "genflow.models.ae:AE",
    "dae": "genflow.models.ae:DAE",
    "sae": "genflow.models.ae:SAE",
    "dcgan": "genflow.models.gan:DCGAN",
    "cgan": "genflow.models.gan:CGAN",
}

FAMILY_NAMES: tuple[str, ...] = tuple(_FAMILIES)


def get_family(name: str):
    """The model class of a family, or a clear error listing the known ones."""
    try:
        path = _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILY_NAMES)}") from None
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def registered_name(family: str) -> str:
    """The MLflow registered-model name of a family."""
    get_family(family)
    return f"celeba64-{family}"
