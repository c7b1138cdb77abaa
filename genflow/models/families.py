"""The table family name -> model class. Nothing else in genflow knows family names.

Entries are import paths, so that importing the table imports no model. A family is listed here
once it is built; the CLI, DVC's foreach (dvc.yaml's `families`, kept equal by a test) and the
registry follow. Imported, the table registers the families' config classes with genflow.config,
which then validates every `models.FAMILY` section as params are read.
"""

from __future__ import annotations

import importlib
from functools import partial

from genflow.config import register_family_configs

_FAMILIES: dict[str, str] = {
    # in DESIGN.md's order: autoencoders, VAE, GANs, diffusion, flow, autoregressive, energy-based
    "ae": "genflow.models.ae:AE",
    "dae": "genflow.models.ae:DAE",
    "sae": "genflow.models.ae:SAE",
    "vae": "genflow.models.vae:VAE",
    "dcgan": "genflow.models.gan:DCGAN",
    "cgan": "genflow.models.gan:CGAN",
    "ddpm": "genflow.models.ddpm:DDPM",
    "flow": "genflow.models.flow:Flow",
    "pixelcnn": "genflow.models.pixelcnn:PixelCNN",
    "ebm": "genflow.models.ebm:EBM",
}

FAMILY_NAMES: tuple[str, ...] = tuple(_FAMILIES)

# Registered models are named REGISTERED_PREFIX + family (celeba64-vae).
REGISTERED_PREFIX = "celeba64-"


def get_family(name: str):
    """The model class of a family, or a clear error listing the known ones."""
    try:
        path = _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILY_NAMES)}") from None
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def config_class(family: str):
    """The typed config class of a family (imports that family's model)."""
    return get_family(family).config_class


register_family_configs({name: partial(config_class, name) for name in FAMILY_NAMES})


def registered_name(family: str) -> str:
    """The MLflow registered-model name of a family."""
    get_family(family)
    return REGISTERED_PREFIX + family


def family_of_registered(model_name: str) -> str:
    """The family of a registered-model name (the inverse of `registered_name`), or a clear error."""
    if not model_name.startswith(REGISTERED_PREFIX):
        raise ValueError(f"{model_name}: genflow models are named {REGISTERED_PREFIX}FAMILY")
    family = model_name[len(REGISTERED_PREFIX):]
    get_family(family)
    return family
