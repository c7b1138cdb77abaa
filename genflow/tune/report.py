"""What a search leaves behind (`write_outputs`, for `genflow tune` and tune@FAMILY alike): the
winner as params, the trials as a table, a plot, the DVC metrics.

    tuned/vae.yaml          the best trial's drawn values, params-shaped; `load_tuned` reads it
                            back as `-S` overrides, which every vae command applies (genflow/tune/tuned.py)
    plots/tune/vae.csv      one row per trial: status, last step, objective, the drawn values
    plots/tune/vae.png      the objective against one drawn value, coloured by another
    metrics/tune/vae.json   the best objective and the trial counts

Light on purpose (no Ray): training reads the winner without loading the search machinery.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import yaml

from genflow.atomic import write_atomically
from genflow.config import ParamsError, flatten
from genflow.tune.space import SearchSettings, override, overrides

FIXED_COLUMNS = ("trial", "status", "step", "objective")
# The tag of a search's parent run (its value: the search's name); the run holds the search's
# outputs under ARTIFACTS (log_search), from where `genflow tuned pull` fetches the winner.
SEARCH_TAG = "genflow.tune.search"
ARTIFACTS = "tune"


@dataclass
class SearchResult:
    family: str
    name: str  # the Tune experiment (and the parent run's name)
    path: str  # the Tune experiment's folder: Tuner.restore(path) reads it
    mlflow_run_id: str  # the parent run
    metric: str
    mode: str
    max_steps: int
    trials: list[dict[str, Any]]  # one row per trial (trial_rows)
    best: dict[str, Any]  # the best trial's row
    best_config: dict[str, Any]  # the best trial's drawn values, {dotted key: value}
    errors: dict[str, str] = field(default_factory=dict)  # trial id -> its error
    plot_axes: tuple[str, str | None, bool] = ("", None, False)  # plot_axes

    def counts(self) -> dict[str, int]:
        statuses = [row["status"] for row in self.trials]
        return {status: statuses.count(status) for status in ("completed", "stopped", "failed")}

    def metrics(self) -> dict[str, Any]:
        """The search's summary as DVC metrics (metrics/tune/FAMILY.json)."""
        return {"metric": self.metric, "best": self.best["objective"], "best_step": self.best["step"],
                "best_trial": self.best["trial"], "trials": len(self.trials), **self.counts()}

    def __str__(self) -> str:
        counts = self.counts()
        lines = [
            f"{self.best['trial']} with {self.metric}={self.best['objective']:.6g} at step {self.best['step']} "
            f"({self.family} search {self.name}, MLflow run {self.mlflow_run_id})",
            *(f"  {line}" for line in overrides(self.best_config)),
            f"{len(self.trials)} trials: {counts['completed']} completed, {counts['stopped']} stopped early by ASHA, "
            f"{counts['failed']} failed",
            *(f"  {trial}: {error}" for trial, error in self.errors.items()),
        ]
        return "\n".join(lines)


def now_ms() -> int:
    return int(time.time() * 1000)


def column(key: str, family: str) -> str:
    """A space key's column: `models.vae.kl.weight` -> `kl_weight`, `train.lr` -> `train_lr`."""
    return key.removeprefix(f"models.{family}.").replace(".", "_")


def trial_rows(grid, family: str, settings: SearchSettings,
               max_steps: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One row per trial of a Tune ResultGrid, in the order they were proposed, and the errors of
    the failed ones."""
    rows, errors = [], {}
    for result in grid:
        trial = result.metrics["trial_id"]  # Tune sets it even for a trial that never reported
        step = result.metrics.get("step")
        if result.error is not None:
            status = "failed"
            errors[trial] = describe_error(result.error)
        else:
            status = "completed" if step is not None and step >= max_steps else "stopped"
        objective = result.metrics.get(settings.metric) if status != "failed" else None
        rows.append({
            "trial": trial, "status": status, "step": step, "objective": objective,
            **{column(key, family): result.config.get(key) for key in settings.space},
        })
    return rows, errors


def describe_error(error: BaseException | None) -> str:
    """A trial's exception as its type and message, not Ray's wrapping traceback."""
    if error is None:
        return "unknown error (see the trial's error.txt)"
    cause = getattr(error, "cause", None) or error  # RayTaskError carries the trial's own exception
    return f"{type(cause).__name__}: {cause}".strip()


def plot_axes(settings: SearchSettings, family: str) -> tuple[str, str | None, bool]:
    """(x column, colour column or None, log x): `plot_x`/`plot_color`, else the first
    continuous and the first choice key of the space."""
    space = settings.space
    x = settings.plot_x or next((k for k, d in space.items() if d.kind != "choice"), next(iter(space)))
    color = settings.plot_color or next((k for k, d in space.items() if d.kind == "choice" and k != x), None)
    return column(x, family), column(color, family) if color else None, space[x].kind in ("loguniform", "logint")


def tuned_fragment(config: dict[str, Any]) -> dict[str, Any]:
    """{dotted key: value} -> the params-shaped tree those keys make."""
    tree: dict[str, Any] = {}
    for key, value in config.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def write_tuned(result: SearchResult, path: Path) -> None:
    best = result.best
    header = (
        f"# The best trial of the {result.family} search {result.name}: {best['trial']}, "
        f"{result.metric}={best['objective']:.6g} at step {best['step']} (MLflow run {result.mlflow_run_id}).\n"
        f"# Written by `genflow tune {result.family}` (dvc repro tune@{result.family}); every {result.family} "
        "command applies it (genflow/tune/tuned.py; --no-tuned leaves it out).\n"
    )
    write_atomically(Path(path), header + yaml.safe_dump(tuned_fragment(result.best_config), sort_keys=False))


def load_tuned(family: str, path: str | Path | None = None) -> list[str]:
    """The winner of `family`'s search (tuned/FAMILY.yaml) as `key=value` overrides, to apply
    before the command's own -S: `load_params(overrides=load_tuned("vae") + cli_overrides)`."""
    path = Path(path or f"tuned/{family}.yaml")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tuned params for {family}; run `genflow tune {family}` "
                                f"(or `dvc repro tune@{family}`)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ParamsError(f"{path}: expected a params-shaped mapping, got {type(tree).__name__}")
    values = flatten(tree)
    strays = [k for k in values if k.startswith("models.") and not k.startswith(f"models.{family}.")]
    if strays:
        raise ParamsError(f"{path}: {strays[0]} is not a {family} param; is this another family's file?")
    return [override(key, value) for key, value in values.items()]


def output_paths(family: str, root: Path = Path(".")) -> list[Path]:
    """What a search of `family` leaves in the project (the DVC stage tune@FAMILY's outputs):
    the winner, the trial table, the plot, the DVC metrics."""
    return [root / "tuned" / f"{family}.yaml", root / "plots/tune" / f"{family}.csv",
            root / "plots/tune" / f"{family}.png", root / "metrics/tune" / f"{family}.json"]


def write_outputs(result: SearchResult, root: Path = Path(".")) -> list[Path]:
    """Write `output_paths`, as `genflow tune` and DVC's tune@FAMILY both do (one code path)."""
    paths = output_paths(result.family, root)
    write_tuned(result, paths[0])
    write_table(result, paths[1])
    plot_search(result, paths[2])
    write_atomically(paths[3], json.dumps(result.metrics(), indent=2, sort_keys=True) + "\n")
    return paths


def write_table(result: SearchResult, path: Path) -> None:
    fields = list(result.trials[0]) if result.trials else list(FIXED_COLUMNS)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in result.trials:
        writer.writerow({k: "" if v is None else json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    write_atomically(Path(path), out.getvalue())


def plot_search(result: SearchResult, path: Path) -> None:
    """The objective against `x`, one colour per value of `color`; hollow markers: stopped by ASHA
    (their objective is from an earlier step); failed trials have none and are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, color, log_x = result.plot_axes
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    rows = [r for r in result.trials if r["objective"] is not None and r.get(x) is not None]
    groups = sorted({str(r.get(color)) for r in rows}) if color else ["all"]
    for index, group in enumerate(groups):
        members = [r for r in rows if not color or str(r.get(color)) == group]
        colour = plt.get_cmap("tab10")(index % 10)
        for stopped in (False, True):
            chosen = [r for r in members if (r["status"] == "stopped") == stopped]
            if chosen:
                axes.scatter([r[x] for r in chosen], [r["objective"] for r in chosen], s=36,
                             facecolors="none" if stopped else colour, edgecolors=colour,
                             label=None if stopped else group)
    best = result.best
    if best.get(x) is not None:
        axes.scatter([best[x]], [best["objective"]], marker="*", s=220, facecolors="none", edgecolors="black",
                     label=f"best ({best['trial']})")
    if log_x:
        axes.set_xscale("log")
    axes.set_xlabel(x)
    axes.set_ylabel(f"{result.metric} ({result.mode})")
    axes.set_title(f"{result.family} search {result.name}\nhollow: stopped early by ASHA", fontsize=9)
    axes.legend(title=color, fontsize=8)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    plt.close(figure)
    write_atomically(Path(path), out.getvalue())
