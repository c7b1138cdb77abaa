"""DVC stage tune@FAMILY: `python -m pipelines.tune vae` (dvc exp run -S tune.vae.trials=32).

Searches the family's hyperparameters as params.yaml's tune.FAMILY declares (genflow.tune.search:
Ray Tune trials, each a Ray Train run, ASHA, MLflow parent and child runs), then writes, as
`genflow tune FAMILY` does (genflow.tune.report.write_outputs):
    tuned/FAMILY.yaml          the best trial's params; every FAMILY command applies them (genflow/tune/tuned.py)
    plots/tune/FAMILY.csv      one row per trial: status, step, objective, drawn values
    plots/tune/FAMILY.png      the objective against a drawn value, coloured by a drawn choice
    metrics/tune/FAMILY.json   the best objective and the trial counts
Run again after an interruption, with the same params, the search resumes where it stopped.
"""

import sys

from genflow.tune.report import SearchResult, write_outputs
from genflow.tune.search import tune
from pipelines.common import stage_params


def main(family: str) -> SearchResult:
    result = tune(family, stage_params())
    write_outputs(result)
    print(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1])
