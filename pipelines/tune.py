"""DVC stage tune@FAMILY: `python -m pipelines.tune vae` (dvc exp run -S tune.vae.trials=32).

Searches the family's hyperparameters as params.yaml's tune.FAMILY declares (genflow.tune.search:
Ray Tune trials, each a Ray Train run, ASHA, MLflow parent and child runs), then writes
    tuned/FAMILY.yaml          the best trial's params; train@FAMILY applies them (load_tuned)
    plots/tune/FAMILY.csv      one row per trial: status, step, objective, drawn values
    plots/tune/FAMILY.png      the objective against a drawn value, coloured by a drawn choice
    metrics/tune/FAMILY.json   the best objective and the trial counts
Run again after an interruption, with the same params, the search resumes where it stopped.
"""

import sys
from pathlib import Path

from genflow.tune import report
from genflow.tune.report import SearchResult
from genflow.tune.search import tune
from pipelines.common import stage_params, write_json


def main(family: str) -> SearchResult:
    result = tune(family, stage_params())
    report.write_tuned(result, Path(f"tuned/{family}.yaml"))
    report.write_table(result, Path(f"plots/tune/{family}.csv"))
    report.plot_search(result, Path(f"plots/tune/{family}.png"))
    write_json(f"metrics/tune/{family}.json", result.metrics())
    print(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1])
