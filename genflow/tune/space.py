"""A family's search, as params.yaml declares it under `tune.FAMILY`, and its search space.

    tune:
      vae:
        trials: 16
        grace_period: 100                   # ASHA: steps before the first stop decision
        space:                              # dotted params keys -> one distribution each
          train.lr: {loguniform: [1.0e-4, 3.0e-3]}
          models.vae.kl.kind: {choice: [constant, linear, cyclical, capacity]}
          models.vae.kl.weight: {loguniform: [1.0e-5, 1.0e-2], when: {models.vae.kl.kind: [constant, linear, cyclical]}}
          models.vae.kl.warmup_steps: {int: [50, 300], when: {models.vae.kl.kind: linear}}

Distributions: `uniform`, `loguniform` (floats), `int`, `logint` (integers, bounds included) and
`choice` (any YAML values, lists too). `when` makes a key conditional on `choice` keys: it is
drawn, after them, only in trials where each named key took one of the listed values, so each
KL schedule draws only its own params (Optuna's define-by-run). A trial's config is
`{dotted key: value}`; applied to params as `-S` overrides it gives the trial's params.
"""

from __future__ import annotations

import builtins
import difflib
import json
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from genflow import storage
from genflow.config import Params, ParamsError, StrictModel, apply_overrides, describe_validation_error, flatten
from genflow.models.families import FAMILY_NAMES, get_family

# Keys a trial may not draw: the budget (ASHA's max_t) and the trial's resources are the search's.
# Trials train with the final run's train.workers, batch size and loader workers (trial_base).
RESERVED_KEYS = ("train.max_steps", "train.workers", "train.cpus_per_worker", "train.gpu", "train.validation_fd")


class Distribution(StrictModel):
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int: tuple[builtins.int, builtins.int] | None = None
    logint: tuple[builtins.int, builtins.int] | None = None
    choice: list[Any] | None = None
    # {choice key: value or [values]}: draw this key only in trials where all of them hold.
    when: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self) -> "Distribution":
        kinds = [k for k in ("uniform", "loguniform", "int", "logint", "choice") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of uniform, loguniform, int, logint, choice, "
                             f"e.g. {{loguniform: [1.0e-4, 1.0e-2]}} (got {kinds or 'none'})")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one value")
        bounds = getattr(self, kinds[0])
        if kinds[0] != "choice":
            low, high = bounds
            if low > high:
                raise ValueError(f"{kinds[0]}: low {low} is above high {high}")
            if kinds[0].startswith("log") and low <= 0:
                raise ValueError(f"{kinds[0]}: bounds must be positive, got {low}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("uniform", "loguniform", "int", "logint", "choice") if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """Values checked against the params schema before the search starts."""
        return list(self.choice) if self.choice is not None else list(getattr(self, self.kind))

    def contains(self, value: Any) -> bool:
        if self.choice is not None:
            return value in self.choice
        low, high = getattr(self, self.kind)
        integral = self.kind in ("int", "logint")
        if not isinstance(value, (builtins.int, float)) or (integral and value != round(value)):
            return False
        return low <= value <= high

    def applies(self, drawn: dict[str, Any]) -> bool:
        return all(drawn.get(key, _ABSENT) in _as_list(allowed) for key, allowed in self.when.items())

    def suggest(self, trial, name: str) -> Any:
        """Draw this key in an Optuna trial (define-by-run)."""
        kind = self.kind
        if kind == "choice":
            # Optuna's categorical values are scalars; a list (e.g. hidden_channels) goes as JSON.
            if all(v is None or isinstance(v, (bool, int, float, str)) for v in self.choice):
                return trial.suggest_categorical(name, self.choice)
            return json.loads(trial.suggest_categorical(name, [json.dumps(v) for v in self.choice]))
        low, high = getattr(self, kind)
        if kind in ("int", "logint"):
            return trial.suggest_int(name, low, high, log=kind == "logint")
        return trial.suggest_float(name, low, high, log=kind == "loguniform")


_ABSENT = object()


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


class SearchSettings(StrictModel):
    """One family's search: `tune.FAMILY` in params.yaml."""

    trials: int = Field(8, ge=1, description="trials in the search")
    max_concurrent: int = Field(0, ge=0, description="trials at once; 0 = as many as the cluster's CPUs/GPUs fit")
    # No workers of its own: a trial trains with train.workers, as the final run will (the global
    # batch and the data order are part of what a search selects for).
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each trial worker reserves (how many trials fit at once)")
    metric: str = Field("loss", description="the objective, as the training loop reports it (val/*: the validation split)")
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(100, ge=1, description="ASHA: steps every trial runs before it may be stopped")
    reduction_factor: float = Field(2, gt=1, description="ASHA: 1/reduction_factor of the trials go on at each rung")
    max_failures: int = Field(0, ge=0, description="retries of a trial whose driver died (Train retries its workers)")
    seed: int = Field(0, description="the TPE sampler's seed")
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list, description="configs tried first")
    # The search plot: the objective against `plot_x`, coloured by `plot_color` (space keys).
    plot_x: str = ""
    plot_color: str = ""
    space: dict[str, Distribution] = Field(default_factory=dict)

    @field_validator("space")
    @classmethod
    def _conditions_are_choices(cls, space: dict[str, Distribution]) -> dict[str, Distribution]:
        for key, distribution in space.items():
            for condition, allowed in distribution.when.items():
                if condition not in space or space[condition].choice is None:
                    raise ValueError(f"{key}: `when` names {condition}, which must be a choice key of the space")
                strays = [v for v in _as_list(allowed) if v not in space[condition].choice]
                if strays:
                    raise ValueError(f"{key}: `when` waits for {condition} = {strays[0]!r}, "
                                     "which is not one of its choices")
        draw_order(space)
        return space

    @model_validator(mode="after")
    def _plot_keys_in_space(self) -> "SearchSettings":
        for name in ("plot_x", "plot_color"):
            key = getattr(self, name)
            if key and key not in self.space:
                raise ValueError(f"{name}: {key} is not a key of the space")
        for point in self.points_to_evaluate:
            for key, value in point.items():
                if key not in self.space:
                    raise ValueError(f"points_to_evaluate: {key} is not a key of the space")
                if not self.space[key].contains(value):
                    raise ValueError(f"points_to_evaluate: {key}={value!r} is outside its distribution "
                                     f"{self.space[key].model_dump(exclude_defaults=True)}")
        return self


def draw_order(space: dict[str, Distribution]) -> list[str]:
    """The keys in the order they are drawn: each after the keys its `when` names (else as listed)."""
    order: list[str] = []
    pending = list(space)
    while pending:
        ready = [key for key in pending if all(condition in order for condition in space[key].when)]
        if not ready:
            raise ValueError(f"the `when` conditions of {', '.join(pending)} wait for each other")
        order += ready
        pending = [key for key in pending if key not in ready]
    return order


class SearchSpace:
    """The define-by-run function OptunaSearch calls once per trial (a class, so that Tune can
    pickle it with the searcher's state and restore an interrupted search)."""

    def __init__(self, space: dict[str, Distribution]):
        self.space = space
        self.order = draw_order(space)

    def __call__(self, trial) -> dict[str, Any]:
        drawn: dict[str, Any] = {}
        for key in self.order:
            if self.space[key].applies(drawn):
                drawn[key] = self.space[key].suggest(trial, key)
        return drawn


def search_settings(params: Params, family: str) -> SearchSettings:
    """`tune.FAMILY`, validated: its keys, and each space key and value against the params schema."""
    get_family(family)
    unknown = sorted(set(params.tune) - set(FAMILY_NAMES))
    if unknown:
        raise ParamsError(f"tune.{unknown[0]}: unknown family")
    raw = params.tune.get(family)
    if not raw or not raw.get("space"):
        raise ParamsError(
            f"tune.{family}.space: no search space for {family}; declare one in params.yaml, e.g.\n"
            f"tune:\n  {family}:\n    space:\n      train.lr: {{loguniform: [1.0e-4, 3.0e-3]}}"
        )
    try:
        settings = SearchSettings(**raw)
    except ValidationError as err:
        raise ParamsError(describe_validation_error(err, f"tune.{family}.")) from None
    check_space(params, family, settings)
    return settings


def check_space(params: Params, family: str, settings: SearchSettings) -> None:
    """Fail before Ray starts on a key that is no param, or a value its field refuses.

    Only the field's own constraints count: a value that may be wrong only in combination with
    another (norm_groups that does not divide hidden_channels) fails that trial alone.
    """
    base = trial_base(params, family, settings)
    keys = set(flatten({k: v for k, v in base.items() if k != "tune"}))
    for key, distribution in settings.space.items():
        where = f"tune.{family}.space.{key}"
        if key in RESERVED_KEYS:
            raise ParamsError(f"{where}: {key} is set by the search itself (train.max_steps is ASHA's budget; trials "
                              f"train with the final run's train.workers and reserve tune.{family}.cpus_per_worker each; "
                              "train.validation_fd follows the metric), not drawn")
        if key.startswith("models.") and not key.startswith(f"models.{family}."):
            raise ParamsError(f"{where}: a {family} search draws models.{family}.* keys, not {key}")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; give the dotted path of a params key"
            raise ParamsError(f"{where}: {key} is not a params key{hint}")
        for value in distribution.candidates():
            errors = _field_errors(base, family, key, value)
            if errors:
                raise ParamsError(f"{where}: value {value!r} is refused: {errors[0]}")


def _field_errors(base: dict[str, Any], family: str, key: str, value: Any) -> list[str]:
    raw = apply_overrides(json.loads(json.dumps(base)), [override(key, value)])
    config_class = get_family(family).config_class
    # The family's config and the other sections, each on its own, so that errors carry their field.
    for prefix, validate in ((f"models.{family}.", lambda: config_class(**raw["models"][family])),
                             ("", lambda: Params(**{k: v for k, v in raw.items() if k != "models"}))):
        try:
            validate()
        except ValidationError as err:
            # Built-in constraints (types, bounds, literals) hold whatever the other keys are; a
            # custom validator's "value_error" may be about a combination: that is the trial's to find.
            errors = [e["msg"] for e in err.errors() if prefix + ".".join(map(str, e["loc"])) == key
                      and e["type"] not in ("value_error", "assertion_error")]
            if errors:
                return errors
    return []


VALIDATION_FD = "val/fd_effnet"  # the loop's validation_fd: trials of a search on it compute it


def trial_base(params: Params, family: str, settings: SearchSettings) -> dict[str, Any]:
    """The params every trial starts from, as plain data: the family's full config spelled out
    (so that every model key is a leaf a space may name), and the final run's training conditions
    (workers, per-worker batch, loader workers): a trial is the run that its values would give,
    so the winner is retrained under the conditions it won under. Only the operational
    cpus_per_worker and run name differ."""
    base = params.model_dump(mode="json")
    base["models"] = {family: params.family_config(family).model_dump(mode="json")}
    base["tune"] = {}
    # Trials run in their own working directory: paths must not be relative (a URI stays as it is).
    base["data"]["shards"] = storage.resolved(params.data.shards)
    base["train"].update(cpus_per_worker=settings.cpus_per_worker, run_name="")
    if settings.metric == VALIDATION_FD:
        base["train"]["validation_fd"] = True  # the objective is scored at every checkpoint
    return base


def override(key: str, value: Any) -> str:
    """`key=value` as `-S` takes it (JSON is YAML, so lists and strings read back unchanged)."""
    return f"{key}={json.dumps(value)}"


def overrides(config: dict[str, Any]) -> list[str]:
    return [override(key, value) for key, value in config.items()]


def trial_params(base: dict[str, Any], family: str, config: dict[str, Any]) -> Params:
    """The params of one trial: the base with the trial's drawn values applied, validated."""
    raw = apply_overrides(json.loads(json.dumps(base)), overrides(config))
    try:
        return Params(**raw)  # validates models.FAMILY too
    except ValidationError as err:
        raise ParamsError(describe_validation_error(err)) from None
