"""DVC stage train@FAMILY: `python -m pipelines.train vae`.

Trains with Ray Train (genflow.train.trainer), then writes the run's summary as DVC metrics and
its loss curves (from MLflow) as a DVC plot.
"""

import csv
import sys
from pathlib import Path

from mlflow import MlflowClient

from genflow.train.trainer import train
from pipelines.common import write_json
from pipelines.family import family_params


def write_curves(run_id: str, path: Path) -> None:
    client = MlflowClient()
    keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith("train/") and k != "train/start_step")
    rows: dict[int, dict[str, float]] = {}
    for key in keys:
        for point in client.get_metric_history(run_id, key):
            rows.setdefault(point.step, {})[key.removeprefix("train/")] = point.value
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [k.removeprefix("train/") for k in keys]
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["step", *columns])
        for step in sorted(rows):
            writer.writerow([step, *(rows[step].get(c, "") for c in columns)])


def main(family: str) -> None:
    result = train(family, family_params(family))
    write_json(f"metrics/train/{family}.json", {"run_id": result.mlflow_run_id, "ray_run": result.ray_run_name,
                                                 **{k: v for k, v in result.metrics.items()}})
    write_curves(result.mlflow_run_id, Path(f"plots/train/{family}.csv"))


if __name__ == "__main__":
    main(sys.argv[1])
