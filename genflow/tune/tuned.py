"""The one rule for tuned params: every family command reads params.yaml, then the winner of the
family's search (tuned/FAMILY.yaml, written by `genflow tune` and `dvc repro tune@FAMILY`), then
its own flags and -S overrides, which win.

    genflow train vae              params.yaml + tuned/vae.yaml
    genflow train vae -S train.lr=1e-3    ... and train.lr from -S, whatever tuned/vae.yaml says
    genflow evaluate vae --no-tuned       params.yaml alone

`genflow train`, `evaluate`, `register` and `sample` apply it, and so do the DVC stages
train@, evaluate@ and register@ (pipelines/common.py): the same params find the same run.
Applying a tuned file is said on the console, with the keys it set.

A search also logs its winner on its MLflow parent run: `genflow tuned pull FAMILY [--run RUN_ID]`
writes it here from there, for a search that ran elsewhere (`genflow submit -- tune FAMILY` runs
it in the job's throwaway copy of the project).

Light on purpose (no Ray): every command reads it before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from genflow.config import Params, load_params, parse_override
from genflow.tune.report import load_tuned


TUNED_DIR = Path("tuned")


def tuned_path(family: str) -> Path:
    """Where the winner of `family`'s search lives (relative to the project, like data/ and mlflow.db)."""
    return TUNED_DIR / f"{family}.yaml"


@dataclass(frozen=True)
class TunedApplied:
    """What a tuned file did to a command's params."""

    path: Path
    applied: list[str]  # key=value, the overrides taken from the file
    overridden: list[str]  # keys the file holds that the command's own flags or -S set instead

    def describe(self, command: str, opt_out: str = "--no-tuned leaves it out") -> str:
        """One console line: the file, the keys it set, the keys the command's own overrides won,
        and how to do without it."""
        line = f"genflow: {command}: applying {self.path}: " + (", ".join(self.applied) or "no key")
        if self.overridden:
            line += f" (your -S/flags set {', '.join(self.overridden)} instead)"
        return line + f"; {opt_out}"


def _keys(overrides: list[str]) -> list[str]:
    return [".".join(parse_override(text)[0]) for text in overrides]


def family_params(family: str, params_file: str | Path | None = None, overrides: list[str] | None = None,
                  flags: dict[str, str] | None = None, use_tuned: bool = True) -> tuple[Params, TunedApplied | None]:
    """params.yaml (or `params_file`), then tuned/FAMILY.yaml where it exists and `use_tuned`,
    then `overrides` (the command's flags and -S: they win). Returns the params and what the tuned
    file did (None: no file, or --no-tuned).

    `flags` as for load_params: an override -> the flag it stands for, so that an error names it;
    a bad value in the tuned file is reported as the file's.
    """
    overrides = list(overrides or [])
    path = tuned_path(family)
    if not use_tuned or not path.exists():
        return load_params(params_file, overrides, flags=flags), None
    explicit = _keys(overrides)

    def overridden(key: str) -> bool:  # by an override of the key itself or of a section holding it
        return any(key == given or key.startswith(given + ".") for given in explicit)

    tuned = load_tuned(family, path)
    kept = [text for text, key in zip(tuned, _keys(tuned)) if not overridden(key)]
    dropped = [key for key in _keys(tuned) if overridden(key)]
    origins = {**{text: str(path) for text in kept}, **(flags or {})}
    params = load_params(params_file, kept + overrides, flags=origins)
    return params, TunedApplied(path, kept, dropped)


@dataclass(frozen=True)
class Pulled:
    """What `pull_tuned` wrote."""

    path: Path
    run_id: str
    search: str  # the search's name
    earlier: str  # what was there: "none", "the same" (left as it was) or "another" (replaced)
    overrides: list[str]  # key=value, as the file sets them


def pull_tuned(family: str, experiment_id: str, run_id: str | None = None) -> Pulled:
    """Write tuned/FAMILY.yaml from the winner a search logged on its MLflow parent run: run
    `run_id`, else the family's newest finished search in the experiment (MLflow's store is the
    one `genflow.track.mlflow.configure` set)."""
    import tempfile

    import mlflow
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from genflow.atomic import write_atomically
    from genflow.storage import refusal
    from genflow.track.mlflow import FAMILY_TAG, with_retries, without_credentials
    from genflow.tune.report import ARTIFACTS, SEARCH_TAG

    client, store = MlflowClient(), without_credentials(mlflow.get_tracking_uri())
    if run_id is None:
        found = with_retries(lambda: client.search_runs(
            [experiment_id], filter_string=f"tags.`{FAMILY_TAG}` = '{family}' and tags.`{SEARCH_TAG}` LIKE '%' "
                                           "and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1))
        if not found:
            raise FileNotFoundError(f"no finished {family} search in the MLflow experiment {experiment_id} of "
                                    f"{store}: run `genflow tune {family}` (or "
                                    f"`genflow submit ... -- tune {family}`), or name a search's run with --run")
        run = found[0]
    else:
        try:
            run = with_retries(lambda: client.get_run(run_id))
        except MlflowException:
            raise FileNotFoundError(f"--run {run_id}: no such MLflow run in {store}") from None
        tags = run.data.tags
        if SEARCH_TAG not in tags or tags.get(FAMILY_TAG) != family:
            what = f"a {tags[FAMILY_TAG]} search" if SEARCH_TAG in tags else "not a search's parent run"
            raise ValueError(f"--run {run_id}: {what}; give the run of a {family} search (its name starts tune-{family}-)")
    artifact = f"{ARTIFACTS}/{family}.yaml"
    location = f"{run.info.artifact_uri.rstrip('/')}/{artifact}"
    # Listed first: a download that fails says only "failed to download", whether the file is not
    # there or the artifact store refused; a listing fails only when the store does.
    try:
        listed = with_retries(lambda: client.list_artifacts(run.info.run_id, ARTIFACTS))
    except (MlflowException, OSError) as err:
        raise refusal(location, err) from None
    if artifact not in {entry.path for entry in listed}:
        search, status = run.data.tags[SEARCH_TAG], run.info.status
        why = {"RUNNING": "the search has not finished", "FAILED": "the search failed before it finished",
               "KILLED": "the search was interrupted before it finished; run it again to resume it"}
        raise FileNotFoundError(f"MLflow run {run.info.run_id} ({search}, {status}) has no {artifact}: "
                                + why.get(status, f"nothing is at {location}"))
    with tempfile.TemporaryDirectory() as directory:
        try:
            downloaded = Path(download_artifacts(run_id=run.info.run_id, artifact_path=artifact, dst_path=directory))
        except (MlflowException, OSError) as err:
            raise refusal(location, err) from None
        overrides = load_tuned(family, downloaded)  # a file of another family's is refused here
        path = tuned_path(family)
        content = downloaded.read_bytes()
        earlier = "none" if not path.exists() else "the same" if path.read_bytes() == content else "another"
        if earlier != "the same":
            write_atomically(path, content)
    return Pulled(path, run.info.run_id, run.data.tags[SEARCH_TAG], earlier, overrides)
