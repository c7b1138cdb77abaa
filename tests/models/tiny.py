"""Tiny configs of every family: the same code paths as a real run, sized for CPU tests.

One entry per family in genflow/models/families.py (the contract test checks that none is missing).
"""

TINY_CONFIGS: dict[str, dict] = {
    "vae": {"hidden_channels": [8, 16, 32, 32], "latent_dim": 8, "norm_groups": 4},
    "flow": {"levels": 2, "steps_per_level": 2, "hidden_channels": 8},
    "ddpm": {"channels": 8, "channel_multipliers": [1, 2], "attention_resolutions": [32], "norm_groups": 4,
             "timesteps": 20, "steps": 5},
    "pixelcnn": {"hidden_channels": 6, "layers": 2, "first_kernel": 3, "head_channels": 6, "mixture_components": 2},
    "ebm": {"hidden_channels": [8, 16], "langevin_steps": 3, "buffer_size": 16, "sample_steps": 3},
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
