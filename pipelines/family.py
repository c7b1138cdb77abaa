"""What the stages of one family (train, evaluate, register) share: their params."""

from genflow.config import Params
from genflow.tune.report import load_tuned
from pipelines.common import stage_params


def family_params(family: str) -> Params:
    """The params of a family's train/evaluate/register stages: params.yaml with the winner of
    tune@FAMILY (tuned/FAMILY.yaml) on top, so that dvc repro trains, evaluates and registers
    the final model with the tuned values (and all three find the same run)."""
    return stage_params(load_tuned(family))
