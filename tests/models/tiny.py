"""Tiny configs of every family: the same code paths as a real run, sized for CPU tests.

One entry per family in genflow/models/families.py (the contract test checks that none is missing).
"""

TINY_CONFIGS: dict[str, dict] = {
    "vae": {"hidden_channels": [8, 16, 32, 32], "latent_dim": 8, "norm_groups": 4},
    "ae": {"hidden_channels": [8, 16, 32, 32], "latent_dim": 8, "norm_groups": 4},
    "dae": {"hidden_channels": [8, 16, 32, 32], "latent_dim": 8, "norm_groups": 4},
    "sae": {"hidden_channels": [8, 16, 32, 32], "latent_dim": 8, "norm_groups": 4, "layer_steps": [1, 1, 1, 1, 1]},
    "dcgan": {"latent_dim": 8, "generator_channels": 4, "discriminator_channels": 4, "norm_groups": 2},
    "cgan": {"latent_dim": 8, "generator_channels": 4, "discriminator_channels": 4, "norm_groups": 2,
             "attribute_embedding_dim": 4},
}


def tiny_overrides(family: str) -> list[str]:
    """The tiny config as `-S models.FAMILY.key=value` overrides."""
    import json

    return [f"models.{family}.{key}={json.dumps(value)}" for key, value in TINY_CONFIGS[family].items()]
