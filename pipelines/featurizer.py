"""DVC stage featurizer: `python -m pipelines.featurizer` -> evaluate.featurizer.path, metrics/featurizer.json.

Trains the `celeba` feature extractor (genflow/eval/featurizer.py) on the train split, scores its
attribute accuracy on the held-out test split, and logs both to an MLflow run named "featurizer".
"""

import mlflow

from genflow.eval.featurizer import train_featurizer
from genflow.provenance import provenance_tags
from genflow.track import mlflow as tracking
from pipelines.common import stage_params, write_json


def main() -> None:
    params = stage_params()
    config = params.evaluate.featurizer
    scores = train_featurizer(params.data.shards, config)
    experiment_id = tracking.configure(params.tracking)
    with mlflow.start_run(experiment_id=experiment_id, run_name="featurizer",
                          tags={"genflow.role": "featurizer", **provenance_tags()}):
        mlflow.log_params({f"evaluate.featurizer.{k}": v for k, v in config.model_dump().items()})
        mlflow.log_metrics({k.replace("accuracy/", "accuracy_"): float(v) for k, v in scores.items()})
        mlflow.log_artifact(config.path, artifact_path="featurizer")
    floor = "meets" if scores["accuracy"] >= config.min_accuracy else "is BELOW"
    print(f"featurizer: held-out mean attribute accuracy {scores['accuracy']:.3f} (majority baseline "
          f"{scores['majority_baseline']:.3f}) {floor} the floor {config.min_accuracy}")
    write_json("metrics/featurizer.json", scores)


if __name__ == "__main__":
    main()
