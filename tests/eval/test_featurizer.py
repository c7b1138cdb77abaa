"""The celeba featurizer: trained and scored by its stage, refused below its accuracy floor."""

import pytest
import torch

from genflow.config import FeaturizerParams
from genflow.data.celeba import ATTRIBUTE_NAMES
from genflow.eval.featurizer import (AttributeClassifier, FeaturizerTooWeak, attribute_hits, held_out_accuracy,
                                     load_featurizer, train_featurizer)


@pytest.fixture(scope="module")
def trained(eval_shards, tmp_path_factory):
    config = FeaturizerParams(path=str(tmp_path_factory.mktemp("featurizer") / "celeba.pt"), steps=3, batch_size=8, width=8)
    return config, train_featurizer(eval_shards, config, log=lambda line: None)


def test_training_writes_the_file_and_held_out_scores(trained):
    config, scores = trained
    assert 0 <= scores["accuracy"] <= 1 and scores["images"] == 24  # the whole test split
    assert len([k for k in scores if k.startswith("accuracy/")]) == len(ATTRIBUTE_NAMES)
    assert 0.5 <= scores["majority_baseline"] <= 1


def test_features_are_refused_below_the_floor(trained):
    config, scores = trained
    with pytest.raises(FeaturizerTooWeak, match="below evaluate.featurizer.min_accuracy"):
        load_featurizer(config.model_copy(update={"min_accuracy": 1.0}))
    network, digest = load_featurizer(config.model_copy(update={"min_accuracy": 0.0}))
    assert network.features(torch.zeros(2, 3, 64, 64)).shape == (2, network.feature_dim) and len(digest) == 64
    with pytest.raises(FileNotFoundError, match="dvc repro featurizer"):
        load_featurizer(config.model_copy(update={"path": config.path + ".missing"}))


def test_accuracy_and_majority_baseline_against_a_hand_count():
    class Constant(AttributeClassifier):  # predicts "present" for every attribute
        def forward(self, x):
            return torch.ones(len(x), len(ATTRIBUTE_NAMES))

    attrs = torch.zeros(4, len(ATTRIBUTE_NAMES))
    attrs[:3, 0] = 1  # attribute 0 present in 3 of 4 images, every other attribute absent
    scores = held_out_accuracy(Constant(8), [(torch.zeros(4, 3, 64, 64, dtype=torch.uint8), attrs)])
    assert scores[f"accuracy/{ATTRIBUTE_NAMES[0]}"] == 0.75 and scores[f"accuracy/{ATTRIBUTE_NAMES[1]}"] == 0.0
    assert scores["majority_baseline"] == pytest.approx((0.75 + 39 * 1.0) / 40)
    hits, asked = attribute_hits(Constant(8), torch.zeros(4, 3, 64, 64, dtype=torch.uint8), attrs)
    assert hits[0] == 3 and asked[0] == 3 and asked[1:].sum() == 0


def test_the_featurizer_stage_writes_metrics_and_logs_a_run(eval_shards, tmp_path, monkeypatch):
    import json

    import mlflow
    import yaml

    from pipelines.featurizer import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"shards": str(eval_shards)}, "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "evaluate": {"featurizer": {"steps": 2, "batch_size": 8, "width": 8}}}))
    main()
    scores = json.loads((tmp_path / "metrics/featurizer.json").read_text())
    assert 0 <= scores["accuracy"] <= 1 and (tmp_path / "models/featurizer/celeba.pt").is_file()
    runs = mlflow.search_runs(experiment_names=["celeba64"], filter_string="tags.`genflow.role` = 'featurizer'")
    assert len(runs) == 1 and runs["metrics.accuracy"][0] == scores["accuracy"]
