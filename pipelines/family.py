"""What the stages of one family (train, evaluate, register) share: their params."""

import sys
from pathlib import Path

from genflow.config import Params
from genflow.provenance import anchor_stores
from genflow.tune.tuned import family_params as with_tuned


def family_params(family: str) -> Params:
    """The params of a family's train/evaluate/register stages: params.yaml with the winner of
    tune@FAMILY (tuned/FAMILY.yaml) on top, by the rule every `genflow` family command follows
    (genflow/tune/tuned.py), so that dvc repro and the CLI train, evaluate and register the same
    run; the stores anchored to the project as every stage's are."""
    params, tuned = with_tuned(family, "params.yaml")
    if tuned is not None:
        stage = f"{Path(sys.argv[0]).stem}@{family}"  # run as pipelines/STAGE.py
        print(tuned.describe(stage, opt_out=f"a dependency of {stage} (dvc.yaml), written by tune@{family}"))
    return anchor_stores(params)
