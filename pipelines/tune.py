"""DVC stage tune@FAMILY: search FAMILY's hyperparameters; train@FAMILY trains with the winner.

    python pipelines/tune.py vae                  (dvc repro tune@vae; dvc exp run -S tune.vae.trials=32)

Reads params.yaml (tune.FAMILY holds the search space and settings), runs the Ray Tune search
(genflow.tune.search) and writes
    tuned/FAMILY.yaml          the best trial's params (genflow.tune.report.load_tuned reads them)
    plots/tune/FAMILY.csv      one row per trial: status, step, objective, drawn values
    plots/tune/FAMILY.png      the objective against the first drawn value, coloured by a choice
    metrics/tune/FAMILY.json   the best objective and the trial counts
An interrupted search resumes when the stage runs again with the same params.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import genflow  # noqa: F401  (telemetry off before Ray/MLflow load)
from genflow.config import ParamsError, load_params
from genflow.tune import report
from genflow.tune.search import tune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family")
    parser.add_argument("--params", default=None, help="params file (default: ./params.yaml)")
    args = parser.parse_args(argv)
    try:
        result = tune(args.family, load_params(args.params))
    except (ParamsError, FileNotFoundError, ValueError) as err:
        print(f"tune@{args.family}: error: {err}", file=sys.stderr)
        return 2
    report.write_tuned(result, Path("tuned") / f"{args.family}.yaml")
    report.write_table(result, Path("plots/tune") / f"{args.family}.csv")
    report.plot_search(result, Path("plots/tune") / f"{args.family}.png")
    report.write_metrics(result, Path("metrics/tune") / f"{args.family}.json")
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
