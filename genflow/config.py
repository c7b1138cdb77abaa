"""Typed, validated params: one schema for params.yaml, the CLI's `-S key=value` and DVC.

The defaults below are the embedded defaults: genflow runs with no params.yaml at all, and
the params.yaml shipped in the project repeats them so that DVC can track each one.
A family's own hyperparameters are declared next to its model (``config_class``) and live
under ``models.FAMILY`` here.

This module imports nothing of genflow, so reading params imports no model. The family table
(genflow/models/families.py) registers itself here when it is imported, as every command that
names a family does; from then on every ``models.*`` section is validated as params are read
(a typo in models.vae fails at once, naming the key), each against its family's config class.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """A params file, an override or a value is wrong; the message says which and how to fix it."""


class StrictModel(BaseModel):
    # Unknown keys are errors, not silently ignored typos; "model_" names are ours to use.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class SampleParams(StrictModel):
    """The embedded CelebA-format sample that `genflow data synth` writes (the default source)."""

    dir: str = "data/sample"
    n: int = Field(2000, ge=10)
    seed: int = 0
    layout: Literal["official", "zip", "kaggle"] = "official"


class DataParams(StrictModel):
    # "sample" (the synth stage's output, wherever sample.dir puts it) or the path of a CelebA
    # folder or zip. A path equal to sample.dir is the sample too: params.yaml names it so, as
    # data/sample, because dvc.yaml makes data.source a path dependency of prepare (DVC hashes it).
    source: str = "sample"
    sample: SampleParams = SampleParams()
    shards: str = "data/shards"
    crop: int = Field(148, ge=8, le=178, description="centre crop side in source pixels")
    size: int = Field(64, ge=8)
    train_fraction: float = Field(0.7, gt=0.0, lt=1.0)
    split_seed: int = 0
    shard_size: int = Field(5000, ge=1, description="images per shard")
    max_reject_fraction: float = Field(0.01, ge=0.0, le=1.0)
    processes: int = Field(0, ge=0, description="prepare's processes; 0 = one per core")

    def source_path(self) -> Path:
        return Path(self.sample.dir if self.source == "sample" else self.source)

    def is_sample(self) -> bool:
        return self.source == "sample" or Path(self.source).resolve() == Path(self.sample.dir).resolve()


class TrainParams(StrictModel):
    workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks)")
    gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    batch_size: int = Field(32, ge=1, description="per worker")
    max_steps: int = Field(300, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 turns clipping off")
    checkpoint_every: int = Field(100, ge=1)
    validation_batches: int = Field(2, ge=0, description="validation batches scored at each checkpoint (val/*); 0 = none")
    validation_fd: bool = Field(False, description="also val/fd_effnet at each checkpoint: the validation images against as "
                                "many samples (few images: biased, comparable between runs of one size; on by itself "
                                "in a search whose metric it is)")
    log_every: int = Field(10, ge=1)
    grid_every: int = Field(0, ge=0, description="steps between sample grids; 0 = only at the end")
    grid_size: int = Field(16, ge=1, description="images in a sample grid")
    system_metrics_every: float = Field(10.0, ge=0, description="seconds between samples of each node's system "
                                        "metrics (CPU, memory, disk, network, GPU), logged by its local rank 0 "
                                        "worker as system/NODE/...; 0 = none")
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    loader_workers: int = Field(1, ge=0)
    bf16: bool = Field(True, description="bf16 autocast (GPU only)")
    compile: bool = False
    storage_path: str = "ray_results"
    run_name: str = Field("", description="Ray/MLflow run name; empty = the family name")


class TrackingParams(StrictModel):
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "celeba64"
    artifact_location: str = Field("", description="where a new experiment keeps its artifacts (models, grids): a folder, "
                                   "or s3://BUCKET/PREFIX, gs://BUCKET/PREFIX; empty = beside a local database, else the "
                                   "tracking server's default")

    def resolved_uri(self) -> str:
        # The environment wins, as MLflow users expect.
        return os.environ.get("MLFLOW_TRACKING_URI") or self.uri


class RayParams(StrictModel):
    address: str = Field("", description="Ray cluster address; empty = start Ray locally")


class FeaturizerParams(StrictModel):
    """The `celeba` feature extractor: a 40-attribute classifier that DVC stage `featurizer` trains."""

    path: str = "models/featurizer/celeba.pt"
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-3, gt=0)
    width: int = Field(16, ge=8, multiple_of=8, description="channels of the first conv block (doubled per block; GroupNorm(8))")
    seed: int = 0
    # Features (and attribute checks) are refused below this held-out mean attribute accuracy;
    # always predicting each attribute's majority value scores ~0.80 on CelebA.
    min_accuracy: float = Field(0.85, ge=0.0, le=1.0)


class EvaluateParams(StrictModel):
    batches: int = Field(8, ge=1, description="test batches evaluated")
    batch_size: int = Field(64, ge=1)
    sample_n: int = Field(16, ge=1, description="images in the evaluation grid")
    seed: int = Field(0, description="the noise of stochastic metrics (a VAE's ELBO): versions are scored alike")
    # Sample quality: generated images scored against as many test images.
    extractor: Literal["imagenet", "inception", "celeba"] = "imagenet"
    samples: int = Field(10_000, ge=2, description="images per set for fd/kid/precision/recall on a GPU")
    cpu_samples: int = Field(128, ge=2, description="the same on CPU, where 10,000 would take an hour")
    keep_features: int = Field(10_000, ge=2, description="feature vectors kept per set for KID and precision/recall")
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    pr_k: int = Field(3, ge=1, description="k of the k-NN manifolds (Kynkäänniemi et al. 2019)")
    inception_weights: str = Field("", description="pytorch-fid's pt_inception-2015-12-05-6726825d.pth; or GENFLOW_INCEPTION_WEIGHTS")
    stats_cache: str = Field("data/eval_stats", description="cached statistics of real images, per extractor")
    featurizer: FeaturizerParams = FeaturizerParams()


class Params(StrictModel):
    data: DataParams = DataParams()
    train: TrainParams = TrainParams()
    tracking: TrackingParams = TrackingParams()
    ray: RayParams = RayParams()
    evaluate: EvaluateParams = EvaluateParams()
    # models.FAMILY: that family's hyperparameters (validated by `family_config`).
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # tune.FAMILY: that family's search space and search settings (validated by genflow.tune).
    tune: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _valid_families(self) -> "Params":
        # Every family section is checked when the params are read, not when (and if) the
        # family is trained: a typo in models.vae fails `dvc repro` at once.
        # Checks against the training params (the stacked AE's phases against train.max_steps)
        # wait until the family is configured for a run: `train vae -S train.max_steps=100` must
        # not fail on sae's phases.
        if _family_configs:
            for family in self.models:
                self.family_config(family, for_training=False)
        return self

    def family_config(self, family: str, for_training: bool = True) -> StrictModel:
        """The family's typed config: its class defaults, updated by `models.FAMILY`."""
        if not _family_configs:
            raise ParamsError("no family table: import genflow.models.families before asking for a family's config")
        if family not in _family_configs:
            raise ParamsError(f"models.{family}: unknown family; known: {', '.join(_family_configs)}")
        try:
            # The training params as validation context: a family may check its config against
            # them (the stacked AE's phase lengths against train.max_steps).
            context = {"train": self.train} if for_training else None
            return _family_configs[family]().model_validate(self.models.get(family, {}), context=context)
        except ValidationError as err:
            raise ParamsError(describe_validation_error(err, prefix=f"models.{family}.")) from None


# family name -> a function returning its config class (importing that family's model only).
_family_configs: dict[str, Callable[[], type[StrictModel]]] = {}


def register_family_configs(config_classes: dict[str, Callable[[], type[StrictModel]]]) -> None:
    """Called by the family table (genflow/models/families.py) when it is imported."""
    _family_configs.update(config_classes)


def describe_validation_error(err: ValidationError, prefix: str = "", origin: Callable[[str], str] | None = None) -> str:
    """A pydantic error as `dotted.key: what is wrong (got value)`, one clause per problem;
    `origin(key)`, when given, says where the value came from."""
    lines = []
    for e in err.errors():
        message = e["msg"].removeprefix("Value error, ")
        if not e["loc"]:  # raised by a whole-model validator: its message names the key itself
            lines.append(message)
            continue
        where = prefix + ".".join(str(p) for p in e["loc"])
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        source = f", from {origin(where)}" if origin else ""
        lines.append(f"{where}: {message}{got}{source}")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value); the value is read as YAML, as `dvc exp run -S` does."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {text!r}: expected key=value, e.g. train.max_steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ParamsError(f"override {text!r}: value is not valid YAML: {err}") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ParamsError(f"override {text!r}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def load_params(path: str | Path | None = None, overrides: list[str] | None = None,
                flags: dict[str, str] | None = None) -> Params:
    """Read params.yaml (embedded defaults where it is missing), apply overrides, validate.

    `flags` maps an override to the command-line flag it stands for ("train.max_steps=0" ->
    "--max-steps 0"): an error in its value names the flag, not params.yaml.
    """
    path = Path(path or PARAMS_FILE)
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ParamsError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    from_file = path.exists()
    raw = apply_overrides(raw, overrides or [])

    def origin(key: str) -> str:
        # The last override of the key (or of a section holding it) is the value validated.
        for text in reversed(overrides or []):
            overridden = ".".join(parse_override(text)[0])
            if key == overridden or key.startswith(overridden + "."):
                return (flags or {}).get(text) or f"-S {text}"
        return str(path) if from_file else "the embedded defaults"

    try:
        return Params(**raw)
    except ValidationError as err:
        raise ParamsError("invalid params: " + describe_validation_error(err, origin=origin)) from None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the form MLflow params and DVC's -S keys take."""
    if isinstance(tree, BaseModel):
        tree = tree.model_dump()
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
