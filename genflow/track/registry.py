"""The model registry: register evaluated runs, list versions, move aliases behind a metric gate.

    genflow register vae                                   new version of celeba64-vae, alias candidate
    genflow registry list
    genflow registry promote celeba64-vae 3 --to staging   refused if worse than the current staging
    genflow registry promote celeba64-vae 3 --to production (only the current staging version)
    genflow sample celeba64-vae@staging --n 64 --out grid.png

MLflow 3 deprecates stages; the lifecycle is aliases (candidate, staging, production) on
versions, and every promotion is recorded on the version as tags: who, when, why, forced.
Each version also records what its test metrics were scored on (`genflow.scored.*`: dataset digest,
split, evaluation settings, seed, the measures reported, which a decoder's likelihood changes);
two versions scored differently are not compared unless --force says so.
"""

from __future__ import annotations

import getpass
import sys
from datetime import datetime, timezone

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from genflow.config import Params
from genflow.images import save_grid
from genflow.models.families import REGISTERED_PREFIX, family_of_registered, get_family, registered_name
from genflow.track import mlflow as tracking
from genflow.track.identity import finished_training_run
from genflow.track.pyfunc import logged_model_id
from genflow.track.sampler import sampler_options

PRIMARY_METRIC_TAG = "genflow.primary_metric"


class PromotionRefused(ValueError):
    """A promotion the gate does not allow; the message says why and how to override."""


def _primary(family: str) -> tuple[str, bool]:
    model_class = get_family(family)
    return model_class.primary_metric, model_class.primary_metric_lower_is_better


def register_family(family: str, params: Params, run_id: str | None = None):
    """Register the family's evaluated run (`run_id`, else the one the params name) as a new version with alias `candidate`.

    One version per training run: registering a run that a version already holds (`dvc repro`
    after an operational param changed, or register run twice) makes no second version; that
    version's test metrics, scoring and card are brought up to the run's latest evaluation, and
    `candidate` moves to it."""
    run = finished_training_run(family, params, run_id)
    metric, lower_is_better = _primary(family)
    test_metrics = {k[len("test/"):]: v for k, v in run.data.metrics.items() if k.startswith("test/")}
    if metric not in test_metrics:
        raise FileNotFoundError(f"run {run.info.run_id} has no test/{metric}: run `genflow evaluate {family}` first")
    name = registered_name(family)
    client = MlflowClient()
    model_id = logged_model_id(run.info.run_id)
    if f"test/{metric}" not in {m.key for m in tracking.with_retries(lambda: client.get_logged_model(model_id)).metrics or []}:
        raise FileNotFoundError(f"the model run {run.info.run_id} logged carries no test metrics (evaluated before genflow "
                                f"logged them on the model): run `genflow evaluate {family}` again")
    try:
        tracking.with_retries(lambda: client.get_registered_model(name))
    except MlflowException:
        tracking.with_retries(lambda: client.create_registered_model(name))
    scored_on = tracking.scoring_of(run.data.tags)
    if not scored_on:
        raise FileNotFoundError(f"run {run.info.run_id} does not record what it was scored on: run `genflow evaluate {family}` again")
    evaluation_tags = {**{f"test.{k}": f"{v:.6g}" for k, v in test_metrics.items()},
                       **{tracking.SCORED_TAG_PREFIX + k: v for k, v in scored_on.items()}}
    version = _version_of_run(client, name, run.info.run_id)
    if version is None:
        version = mlflow.register_model(f"models:/{model_id}", name, tags=evaluation_tags)
    else:
        print(f"{name} version {version.version} already holds run {run.info.run_id}: no new version; its test "
              "metrics and card are brought up to the run's latest evaluation", file=sys.stderr)
        _replace_evaluation_tags(client, version, evaluation_tags)
    tracking.with_retries(lambda: client.set_model_version_tag(name, version.version, PRIMARY_METRIC_TAG,
                                                              f"{metric} ({'lower' if lower_is_better else 'higher'} is better)"))
    tracking.with_retries(lambda: client.update_model_version(name, version.version, description=model_card(family, run, test_metrics)))
    tracking.with_retries(lambda: client.set_registered_model_alias(name, "candidate", version.version))
    tracking.with_retries(lambda: client.update_registered_model(name, description=registered_model_description(family)))
    return version


def _version_of_run(client: MlflowClient, name: str, run_id: str):
    """The (first) version of `name` registered from run `run_id`, or None."""
    versions = tracking.with_retries(lambda: client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _replace_evaluation_tags(client: MlflowClient, version, tags: dict[str, str]) -> None:
    """Set the version's test.* and scoring tags to `tags`; drop those the new evaluation does not
    report (another extractor's fd_*), so that no tag outlives the evaluation it came from."""
    stale = [key for key in version.tags if key.startswith(("test.", tracking.SCORED_TAG_PREFIX)) and key not in tags]
    for key in stale:
        tracking.with_retries(lambda: client.delete_model_version_tag(version.name, version.version, key))
    for key, value in tags.items():
        tracking.with_retries(lambda: client.set_model_version_tag(version.name, version.version, key, value))


def trained_on(data_source: str | None) -> str:
    """What a run's `genflow.data_source` tag (written by `genflow train`) says it was trained on."""
    return {"sample": "the **synthetic sample** (not CelebA)",
            "celeba": "CelebA, aligned, 148x148 centre crop resized to 64x64"}.get(data_source or "", "data not recorded")


def registered_model_description(family: str) -> str:
    """The registered model's description: what its versions were trained on, each version's run read
    anew (versions of one model may come from different data)."""
    name = registered_name(family)
    client = MlflowClient()
    versions = tracking.with_retries(lambda: client.search_model_versions(f"name = '{name}'"))
    by_data: dict[str, list[int]] = {}
    for version in sorted(versions, key=lambda v: int(v.version)):
        tags = tracking.with_retries(lambda: client.get_run(version.run_id)).data.tags if version.run_id else {}
        by_data.setdefault(trained_on(tags.get("genflow.data_source")), []).append(int(version.version))
    trained = "; ".join(f"{'version' if len(numbers) == 1 else 'versions'} {', '.join(map(str, numbers))} on {data}"
                        for data, numbers in by_data.items())
    return (f"{family}: a generative model of 64x64 face images, trained by genflow. Trained: {trained}. "
            "Each version's description is its model card (data, test metrics, params). "
            "Aliases: candidate, staging, production.")


def model_card(family: str, run, test_metrics: dict[str, float]) -> str:
    """The version's description: what a reader of the MLflow UI needs to judge the model."""
    tags, params = run.data.tags, run.data.params
    data_line = trained_on(tags.get("genflow.data_source"))
    metric, lower = _primary(family)
    lines = [
        f"## {registered_name(family)}",
        "",
        f"**Data**: {data_line}; dataset digest in the run's inputs.",
        f"**Run**: `{run.info.run_id}` (Ray run `{tags.get('genflow.ray_run', '?')}`).",
        f"**Primary metric**: `{metric}` ({'lower' if lower else 'higher'} is better) = {test_metrics.get(metric, float('nan')):.4g}",
        "**Scored on**: " + ", ".join(f"{k} `{v}`" for k, v in sorted(tracking.scoring_of(tags).items())),
        "",
        "| test metric | value |",
        "|---|---|",
        *[f"| {k} | {v:.4g} |" for k, v in sorted(test_metrics.items())],
        "",
        "| param | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(params.items()) if k.startswith(("model.", "train."))],
        "",
        "Samples: the run's artifact `evaluation/samples.png`; grids during training: the run's step-keyed images `samples` (and `reconstructions`).",
        f"Use: `mlflow.pyfunc.load_model('models:/{registered_name(family)}@staging').predict(pd.DataFrame({{'n': [16], 'seed': [0]}}))`",
    ]
    return "\n".join(lines)


def _metric_of(version) -> float | None:
    family = family_of_registered(version.name)
    value = version.tags.get(f"test.{_primary(family)[0]}")
    return float(value) if value is not None else None


def promote(params: Params, model: str, version: str, to: str, force: bool = False, reason: str = "") -> str:
    """Move alias `to` (staging or production) to `version` of `model`, if the gate allows."""
    tracking.configure(params.tracking)
    client = MlflowClient()
    family = family_of_registered(model)
    metric, lower_is_better = _primary(family)
    try:
        candidate = tracking.with_retries(lambda: client.get_model_version(model, str(version)))
    except MlflowException:
        raise ValueError(f"{model} has no version {version}; see `genflow registry list`") from None
    if to == "production":
        staging = _version_by_alias(client, model, "staging")
        if staging is None or staging.version != candidate.version:
            now_staging = f"version {staging.version} is" if staging is not None else "no version is"
            raise PromotionRefused(f"{model} version {version} is not the current staging version ({now_staging}); "
                                   "only the staging version goes to production: promote it --to staging first")
    current = _version_by_alias(client, model, to)
    ours = _metric_of(candidate)
    if ours is None:
        raise PromotionRefused(f"{model} version {version} has no test.{metric} tag; register it with `genflow register {family}`")
    forced = False
    if current is not None and current.version != candidate.version:
        differences = scoring_differences(candidate, current)
        if differences and not force:
            raise PromotionRefused(
                f"refused: {model} version {version} and {to} version {current.version} were scored differently "
                f"({'; '.join(differences)}), so their {metric} do not compare. Evaluate both alike, or use --force "
                "(and --reason) to promote anyway")
        theirs = _metric_of(current)
        worse = theirs is not None and (ours > theirs if lower_is_better else ours < theirs)
        if worse and not force:
            raise PromotionRefused(
                f"refused: {model} version {version} has {metric} {ours:.4g}, worse than {to} version "
                f"{current.version} ({theirs:.4g}; {'lower' if lower_is_better else 'higher'} is better). "
                "Use --force (and --reason) to promote anyway")
        forced = worse or bool(differences)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = {
        f"genflow.promoted.{to}.at": now,
        f"genflow.promoted.{to}.by": getpass.getuser(),
        f"genflow.promoted.{to}.reason": reason or "-",
        f"genflow.promoted.{to}.forced": str(forced).lower(),
    }
    for key, value in record.items():
        tracking.with_retries(lambda: client.set_model_version_tag(model, str(version), key, value))
    tracking.with_retries(lambda: client.set_registered_model_alias(model, to, str(version)))
    previous = f" (was version {current.version})" if current is not None else ""
    return f"{model} version {version} is now {to}{previous}; {metric} {ours:.4g}" + (" [forced]" if forced else "")


def _version_by_alias(client: MlflowClient, model: str, alias: str):
    try:
        return tracking.with_retries(lambda: client.get_model_version_by_alias(model, alias))
    except MlflowException:
        return None


def scoring_differences(version, other) -> list[str]:
    """`field: ours vs theirs` for each scored-on field in which two versions differ."""
    ours, theirs = tracking.scoring_of(version.tags), tracking.scoring_of(other.tags)
    return [f"{field}: {ours.get(field, '(not recorded)')} vs {theirs.get(field, '(not recorded)')}"
            for field in sorted(set(ours) | set(theirs)) if ours.get(field) != theirs.get(field)]


def format_registry(params: Params) -> str:
    """A table of genflow's registered models: versions, aliases, the primary metric, the run."""
    tracking.configure(params.tracking)
    client = MlflowClient()
    rows = [("model", "version", "aliases", "primary metric", "run")]
    for registered in tracking.with_retries(lambda: client.search_registered_models(f"name LIKE '{REGISTERED_PREFIX}%'")):
        aliases: dict[str, list[str]] = {}
        for alias, number in registered.aliases.items():
            aliases.setdefault(str(number), []).append(alias)
        metric = _primary(family_of_registered(registered.name))[0]
        versions = tracking.with_retries(lambda: client.search_model_versions(f"name = '{registered.name}'"))
        for version in sorted(versions, key=lambda v: int(v.version)):
            value = _metric_of(version)
            rows.append((registered.name, version.version, ",".join(sorted(aliases.get(str(version.version), []))) or "-",
                         f"{metric}={value:.4g}" if value is not None else "-", version.run_id or "-"))
    if len(rows) == 1:
        return f"no genflow models registered in {mlflow.get_tracking_uri()}; run `genflow register FAMILY`"
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def parse_model_reference(reference: str) -> str:
    """NAME@ALIAS or NAME/VERSION -> the models:/ URI."""
    if "@" in reference or "/" in reference:
        return f"models:/{reference}"
    raise ValueError(f"{reference!r}: give NAME@ALIAS (e.g. celeba64-vae@staging) or NAME/VERSION (e.g. celeba64-vae/3)")


def check_model_reference(reference: str) -> None:
    """NAME@ALIAS or NAME/VERSION must name something in the (configured) registry; say what is missing."""
    parse_model_reference(reference)  # the form
    name, at, alias = reference.partition("@")
    name, _, version = name.partition("/")
    client = MlflowClient()
    try:
        tracking.with_retries(lambda: client.get_registered_model(name))
    except MlflowException:
        raise ValueError(f"{reference}: no registered model {name!r}; see `genflow registry list`") from None
    try:
        if at:
            tracking.with_retries(lambda: client.get_model_version_by_alias(name, alias))
        else:
            tracking.with_retries(lambda: client.get_model_version(name, version))
    except MlflowException:
        what = f"no version has alias {alias!r}" if at else f"has no version {version}"
        fix = "promote one with `genflow registry promote`" if at else "see `genflow registry list`"
        raise ValueError(f"{reference}: {name} {what}; {fix}") from None


def sample_grid(params: Params, reference: str, n: int, out: str, attrs: list[str], seed: int = 0,
                sampler: str | None = None, steps: int | None = None, eta: float | None = None) -> None:
    """Draw `n` images from a registered model and save them as one PNG grid.

    A conditional model takes `attrs` (NAME=0|1): each image gets the named attributes, and the
    unnamed ones of a random training image (data.shards' manifest); with no `attrs`, every image
    takes a random training image's attributes. `sampler`, `steps` and `eta` (None: the registered
    defaults) for families that have sampler choices."""
    import pandas as pd
    import torch

    from genflow.data.attributes import attribute_rows, parse_attribute_settings
    from genflow.models.families import FAMILY_NAMES

    settings = parse_attribute_settings(attrs)  # a typo fails before the model is looked up
    tracking.configure(params.tracking)
    check_model_reference(reference)  # a missing model, alias or version is one line, not MLflow's traceback
    loaded = mlflow.pyfunc.load_model(parse_model_reference(reference))
    model = loaded.unwrap_python_model().model
    try:
        options = sampler_options(model, sampler=sampler, steps=steps, eta=eta)
    except ValueError as err:
        raise ValueError(f"{reference}: {err} (--sampler/--steps/--eta)") from None
    if model.conditional:
        generator = torch.Generator().manual_seed(seed)
        cond = attribute_rows(settings, params.data.shards, n, generator)
        images = model.sample(n, cond=cond, generator=generator, **options)
    elif settings:
        raise ValueError(f"{reference} is unconditional: it takes no --attr (conditional families: "
                         f"{', '.join(f for f in FAMILY_NAMES if get_family(f).conditional)})")
    else:
        images = torch.from_numpy(loaded.predict(pd.DataFrame({"n": [n], "seed": [seed], **{k: [v] for k, v in options.items()}})))
    save_grid(images, out)
