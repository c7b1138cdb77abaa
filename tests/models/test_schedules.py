import pytest
from pydantic import ValidationError

from genflow.models.schedules import KLSchedule, KLTerm


def test_constant_is_the_weight_at_every_step():
    schedule = KLSchedule(kind="constant", weight=0.5)
    assert [schedule.at(step) for step in (0, 1, 10**6)] == [KLTerm(0.5, 0.0)] * 3


@pytest.mark.parametrize("step, weight", [(0, 0.0), (50, 1.0), (100, 2.0), (101, 2.0), (10**6, 2.0)])
def test_linear_warms_up_from_zero_then_stays(step, weight):
    schedule = KLSchedule(kind="linear", weight=2.0, warmup_steps=100)
    assert schedule.at(step) == pytest.approx(KLTerm(weight, 0.0))


@pytest.mark.parametrize(
    "step, weight",
    [
        (0, 0.0),  # cycle start
        (10, 0.8),  # mid-ramp: 2 · (10/100) / 0.25
        (25, 2.0),  # end of the ramp (ratio 0.25 of the cycle)
        (60, 2.0),  # plateau
        (99, 2.0),  # last step of the cycle
        (100, 0.0),  # next cycle starts from zero again
        (110, 0.8),
        (1025, 2.0),
    ],
)
def test_cyclical_repeats_ramp_then_plateau(step, weight):
    schedule = KLSchedule(kind="cyclical", weight=2.0, cycle_steps=100, ratio=0.25)
    assert schedule.at(step) == pytest.approx(KLTerm(weight, 0.0))


def test_cyclical_with_ratio_one_is_a_sawtooth():
    schedule = KLSchedule(kind="cyclical", weight=1.0, cycle_steps=10, ratio=1.0)
    assert [schedule.at(step).weight for step in (0, 5, 9, 10, 15)] == pytest.approx([0.0, 0.5, 0.9, 0.0, 0.5])


@pytest.mark.parametrize("step, capacity", [(0, 0.0), (50, 12.5), (100, 25.0), (10**6, 25.0)])
def test_capacity_rises_linearly_to_its_max_with_gamma_fixed(step, capacity):
    schedule = KLSchedule(kind="capacity", gamma=1000.0, capacity_max=25.0, capacity_steps=100)
    assert schedule.at(step) == pytest.approx(KLTerm(1000.0, capacity))


def test_defaults_are_the_celeba_recipe():
    assert KLSchedule().at(123) == KLTerm(0.00025, 0.0)


@pytest.mark.parametrize(
    "params, field",
    [
        ({"kind": "cosine"}, "kind"),
        ({"weight": -0.1}, "weight"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"cycle_steps": 0}, "cycle_steps"),
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"gamma": 0.0}, "gamma"),
        ({"capacity_max": -1.0}, "capacity_max"),
        ({"capacity_steps": 0}, "capacity_steps"),
        ({"warmup": 100}, "warmup"),  # a typo is an error, not ignored
    ],
)
def test_bad_params_are_rejected_naming_the_field(params, field):
    with pytest.raises(ValidationError, match=field):
        KLSchedule(**params)
