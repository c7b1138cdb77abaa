"""The search's settings and space (no Ray): early errors, the conditional space, trial params,
and the files a search writes (the winner read back as overrides, the table, the plot)."""

import csv
import json

import optuna
import pytest

from genflow.config import ParamsError, load_params
from genflow.track.identity import run_identity
from genflow.tune.report import SearchResult, load_tuned, plot_axes, plot_search, write_table, write_tuned
from genflow.tune.space import SearchSpace, overrides, search_settings, trial_base, trial_params

KIND = "models.vae.kl.kind"
SCHEDULE_SPACE = {
    "train.lr": {"loguniform": [1e-4, 3e-3]},
    KIND: {"choice": ["constant", "linear", "cyclical", "capacity"]},
    "models.vae.kl.weight": {"loguniform": [1e-5, 1e-2], "when": {KIND: ["constant", "linear", "cyclical"]}},
    "models.vae.kl.warmup_steps": {"int": [5, 50], "when": {KIND: "linear"}},
    "models.vae.kl.cycle_steps": {"int": [5, 50], "when": {KIND: "cyclical"}},
    "models.vae.kl.ratio": {"uniform": [0.25, 1.0], "when": {KIND: "cyclical"}},
    "models.vae.kl.gamma": {"loguniform": [0.025, 2.5], "when": {KIND: "capacity"}},
    "models.vae.hidden_channels": {"choice": [[8, 16, 32, 32], [16, 16, 32, 32]]},
}
PER_KIND = {
    "constant": {"models.vae.kl.weight"},
    "linear": {"models.vae.kl.weight", "models.vae.kl.warmup_steps"},
    "cyclical": {"models.vae.kl.weight", "models.vae.kl.cycle_steps", "models.vae.kl.ratio"},
    "capacity": {"models.vae.kl.gamma"},
}


def params_with(space, tmp_path, **settings):
    section = {"space": space, **settings}
    return load_params(tmp_path / "none.yaml", ["models.vae.hidden_channels=[8,16,32,32]", "models.vae.norm_groups=8",
                                                "tune.vae=" + json.dumps(section)])


def test_each_schedule_draws_only_its_own_params(tmp_path):
    params = params_with(SCHEDULE_SPACE, tmp_path)
    space = SearchSpace(search_settings(params, "vae").space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    kinds = set()
    for _ in range(40):
        config = space(study.ask())
        kind = config[KIND]
        kinds.add(kind)
        assert set(config) == {"train.lr", KIND, "models.vae.hidden_channels"} | PER_KIND[kind]
        assert config["models.vae.hidden_channels"] in SCHEDULE_SPACE["models.vae.hidden_channels"]["choice"]
        trial = trial_params(trial_base(params, "vae", search_settings(params, "vae")), "vae", config).family_config("vae")
        assert trial.kl.kind == kind and list(trial.hidden_channels) == config["models.vae.hidden_channels"]
    assert kinds == set(PER_KIND)


def test_conditions_hold_whatever_order_the_keys_are_listed_in(tmp_path):
    # A params.yaml rewritten with sorted keys lists warmup_steps before the kind it waits for.
    listed_backwards = dict(reversed(SCHEDULE_SPACE.items()))
    space = SearchSpace(search_settings(params_with(listed_backwards, tmp_path), "vae").space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        config = space(study.ask())
        assert set(config) == {"train.lr", KIND, "models.vae.hidden_channels"} | PER_KIND[config[KIND]]


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": {"loguniform": [1e-4, 1e-3]}}, "train.lrr is not a params key; did you mean train.lr"),
    ({"models.vae.kl.weigth": {"uniform": [0, 1]}}, "did you mean models.vae.kl.weight"),
    ({KIND: {"choice": ["constant", "cyclic"]}}, "value 'cyclic' is refused"),
    ({"models.vae.latent_dim": {"int": [0, 8]}}, "latent_dim: value 0 is refused"),
    ({"train.lr": {"loguniform": [0, 1e-3]}}, "bounds must be positive"),
    ({"train.lr": {"uniform": [1e-3, 1e-4]}}, "above high"),
    ({"train.lr": {"normal": [0, 1]}}, "train.lr.normal"),
    ({"models.vae.kl.warmup_steps": {"int": [5, 9], "when": {KIND: "linear"}}}, "must be a choice key of the space"),
    ({"models.vae.decoder": {"choice": ["gaussian", "bernoulli"], "when": {KIND: "linear"}},
      KIND: {"choice": ["constant", "linear"], "when": {"models.vae.decoder": "gaussian"}}}, "wait for each other"),
    ({KIND: {"choice": ["constant"]}, "models.vae.kl.weight": {"uniform": [0, 1], "when": {KIND: "lin"}}},
     "models.vae.kl.kind = 'lin', which is not one of its choices"),
    ({"train.max_steps": {"int": [10, 20]}}, "set by the search itself"),
    ({}, "no search space for vae"),
])
def test_a_bad_space_fails_before_the_search_naming_the_key(space, message, tmp_path):
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(".", r"\.")):
        search_settings(params_with(space, tmp_path), "vae")


def test_a_bad_point_to_evaluate_fails_early(tmp_path):
    with pytest.raises(ParamsError, match="points_to_evaluate: train.lr=1.0 is outside"):
        search_settings(params_with(SCHEDULE_SPACE, tmp_path, points_to_evaluate=[{"train.lr": 1.0}]), "vae")


def test_a_value_wrong_only_in_combination_is_left_to_its_trial(tmp_path):
    # norm_groups=16 is fine with hidden_channels [16, ...] and wrong with [8, ...]: the trial decides.
    params = params_with({"models.vae.norm_groups": {"choice": [8, 16]}}, tmp_path)
    settings = search_settings(params, "vae")
    with pytest.raises(ParamsError, match="16 groups must divide every hidden channel count"):
        trial_params(trial_base(params, "vae", settings), "vae", {"models.vae.norm_groups": 16})


def test_trials_train_under_the_final_runs_conditions(tmp_path):
    # Issue 8 #8: trials ran 1 worker (global batch 32) where the final run trains 2 (64), with its
    # own data order: the winner was retrained under other conditions. A trial is now the very run
    # the winner's values give: the same identity, workers, batch and loader workers included.
    params = load_params(tmp_path / "none.yaml", ["models.vae.hidden_channels=[8,16,32,32]", "models.vae.norm_groups=8",
                                                  "train.workers=2", "train.batch_size=16", "train.loader_workers=2",
                                                  "tune.vae=" + json.dumps({"space": SCHEDULE_SPACE, "cpus_per_worker": 0.5})])
    settings = search_settings(params, "vae")
    config = {"train.lr": 1e-3, KIND: "linear", "models.vae.kl.weight": 1e-4, "models.vae.kl.warmup_steps": 10,
              "models.vae.hidden_channels": [8, 16, 32, 32]}
    trial = trial_params(trial_base(params, "vae", settings), "vae", config)
    final = load_params(tmp_path / "none.yaml", [
        "models.vae.hidden_channels=[8,16,32,32]", "models.vae.norm_groups=8", "train.workers=2",
        "train.batch_size=16", "train.loader_workers=2", *overrides(config)])
    assert run_identity("vae", trial, "d") == run_identity("vae", final, "d")
    assert (trial.train.workers, trial.train.batch_size, trial.train.loader_workers) == (2, 16, 2)
    assert trial.train.cpus_per_worker == 0.5  # the one difference: how many trials fit at once


@pytest.mark.parametrize("metric, scored", [("val/fd_effnet", True), ("val/bits_per_dim", False)])
def test_a_search_on_val_fd_effnet_has_its_trials_score_it(metric, scored, tmp_path):
    # Issue 12 #3: the VAE's search selects on sample quality; the loop computes val/fd_effnet only
    # where train.validation_fd asks (it costs a sampling and two feature passes per checkpoint).
    params = params_with(SCHEDULE_SPACE, tmp_path, metric=metric)
    trial = trial_params(trial_base(params, "vae", search_settings(params, "vae")), "vae", {})
    assert trial.train.validation_fd is scored
    # Scoring does not change the trained model: the trial is still the final run's identity.
    assert run_identity("vae", trial, "d") == run_identity("vae", params, "d")


def fake_result(tmp_path) -> SearchResult:
    settings = search_settings(params_with(SCHEDULE_SPACE, tmp_path), "vae")
    rows = [
        {"trial": "a", "status": "completed", "step": 20, "objective": 0.08, "train_lr": 1e-3, "kl_kind": "linear",
         "kl_weight": 1e-4, "kl_warmup_steps": 10, "kl_cycle_steps": None, "kl_ratio": None, "kl_gamma": None,
         "hidden_channels": [8, 16, 32, 32]},
        {"trial": "b", "status": "stopped", "step": 5, "objective": 0.3, "train_lr": 2e-4, "kl_kind": "capacity",
         "kl_weight": None, "kl_warmup_steps": None, "kl_cycle_steps": None, "kl_ratio": None, "kl_gamma": 50.0,
         "hidden_channels": [16, 16, 32, 32]},
        {"trial": "c", "status": "failed", "step": None, "objective": None, "train_lr": 1e-4, "kl_kind": "constant",
         "kl_weight": 1e-3, "kl_warmup_steps": None, "kl_cycle_steps": None, "kl_ratio": None, "kl_gamma": None,
         "hidden_channels": [8, 16, 32, 32]},
    ]
    best_config = {"train.lr": 1e-3, KIND: "linear", "models.vae.kl.weight": 1e-4, "models.vae.kl.warmup_steps": 10,
                   "models.vae.hidden_channels": [8, 16, 32, 32]}
    return SearchResult("vae", "tune-vae-x", str(tmp_path), "run0", "loss", "min", 20, rows, rows[0], best_config,
                        {"c": "ParamsError: bad"}, plot_axes(settings, "vae"))


def test_the_winner_reads_back_as_overrides_of_the_same_values(tmp_path):
    result = fake_result(tmp_path)
    write_tuned(result, tmp_path / "tuned" / "vae.yaml")
    overrides = load_tuned("vae", tmp_path / "tuned" / "vae.yaml")
    trained = load_params(tmp_path / "none.yaml", overrides)
    assert trained.train.lr == 1e-3
    config = trained.family_config("vae")
    assert (config.kl.kind, config.kl.weight, config.kl.warmup_steps) == ("linear", 1e-4, 10)
    assert list(config.hidden_channels) == [8, 16, 32, 32]


def test_tuned_params_that_are_missing_or_of_another_family_say_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro tune@vae"):
        load_tuned("vae", tmp_path / "missing.yaml")
    (tmp_path / "other.yaml").write_text("models:\n  ae:\n    latent_dim: 4\n")
    with pytest.raises(ParamsError, match="models.ae.latent_dim is not a vae param"):
        load_tuned("vae", tmp_path / "other.yaml")


def test_table_metrics_and_plot(tmp_path):
    result = fake_result(tmp_path)
    assert result.plot_axes == ("train_lr", "kl_kind", True)
    write_table(result, tmp_path / "vae.csv")
    with open(tmp_path / "vae.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows] == ["a", "b", "c"]
    assert rows[2]["objective"] == "" and rows[0]["kl_weight"] == "0.0001"
    assert rows[1]["hidden_channels"] == "[16, 16, 32, 32]"
    assert result.metrics() == {"metric": "loss", "best": 0.08, "best_step": 20, "best_trial": "a", "trials": 3,
                                "completed": 1, "stopped": 1, "failed": 1}
    plot_search(result, tmp_path / "vae.png")
    assert (tmp_path / "vae.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1 completed, 1 stopped early by ASHA, 1 failed" in str(result)
