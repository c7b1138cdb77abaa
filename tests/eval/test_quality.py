"""Sample quality inside `genflow evaluate`: streamed, cached, counted, family-agnostic."""

import pytest
import torch
from torch import nn

from genflow.config import load_params
from genflow.data.celeba import ATTRIBUTE_NAMES
from genflow.eval.quality import AttributeChecker, parameter_count, sample_quality
from genflow.models.families import get_family
from tests.models.tiny import TINY_CONFIGS


def tiny_vae():
    model_class = get_family("vae")
    return model_class(model_class.config_class(**TINY_CONFIGS["vae"])).eval()


def test_sample_quality_of_a_model_against_the_test_split(tmp_path, eval_shards):
    params = load_params(tmp_path / "none.yaml", [f"data.shards={eval_shards}", "evaluate.cpu_samples=10",
                                                   "evaluate.batch_size=4", "evaluate.kid_subsets=3",
                                                   f"evaluate.stats_cache={tmp_path}/cache"])
    model = tiny_vae()
    metrics = sample_quality(model, params, torch.device("cpu"))
    assert metrics["fd_effnet_n"] == 10
    assert metrics["fd_effnet"] > 0 and 0 <= metrics["precision_effnet"] <= 1 and 0 <= metrics["recall_effnet"] <= 1
    assert "kid_effnet" in metrics and metrics["quality_sampling_s"] > 0 and metrics["quality_featurising_s"] > 0
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("test-imagenet-")  # real statistics, once
    again = sample_quality(model, params, torch.device("cpu"))
    assert again["fd_effnet"] == pytest.approx(metrics["fd_effnet"])  # same seed, same cache
    assert parameter_count(model) == sum(p.numel() for p in model.parameters()) > 0


class PixelReader(nn.Module):
    """A stand-in attribute classifier: attribute i is 'present' when pixel (0, 0, i) is bright."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x[:, 0, 0, : len(ATTRIBUTE_NAMES)]


def draw(conditions, obey: bool):
    images = torch.zeros(len(conditions), 3, 64, 64, dtype=torch.uint8)
    if obey:
        images[:, 0, 0, : len(ATTRIBUTE_NAMES)] = (conditions * 255).to(torch.uint8)
    return images


def test_attribute_match_counts_what_was_asked_and_found():
    conditions = (torch.rand(12, len(ATTRIBUTE_NAMES), generator=torch.Generator().manual_seed(0)) > 0.5).float()
    for obey, expected in ((True, 1.0), (False, 0.0)):
        checker = AttributeChecker(PixelReader())
        batches = [draw(conditions[:5], obey), draw(conditions[5:], obey)]
        assert len(list(checker.watch(iter(batches), conditions))) == 2
        shares = checker.shares()
        assert shares["attribute_match"] == expected
        asked = [name for name, column in zip(ATTRIBUTE_NAMES, conditions.T) if column.any()]
        assert sorted(k.split("/")[1] for k in shares if "/" in k) == sorted(asked)
