"""dvc.yaml tells the truth: each stage depends on the code it imports, on exactly the params that
decide its result, and prepare on data.source itself; the plots cover every family, each revision
in its own colour. Read through DVC's own parser (foreach expanded, ${} resolved)."""

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from genflow.config import load_params
from genflow.models.families import FAMILY_NAMES, get_family
from genflow.sources import imported_modules, module_file, source_paths
from genflow.track.identity import OPERATIONAL_KEYS, identity_train_keys
from genflow.tune.report import plot_axes
from genflow.tune.search import OPERATIONAL_SETTINGS
from genflow.tune.space import SearchSettings, search_settings

PROJECT = Path(__file__).resolve().parents[1]
CODE = ("genflow/", "pipelines/")
ENTRY = re.compile(r"^python -m (pipelines\.\w+)\b")


@pytest.fixture(scope="module")
def stages():
    from dvc.repo import Repo

    repo = Repo(str(PROJECT))
    try:
        yield {stage.addressing: stage for stage in repo.index.stages}
    finally:
        repo.close()


def params_of(stage) -> set[str]:
    from dvc.dependency.param import ParamsDependency

    return {key for dep in stage.deps if isinstance(dep, ParamsDependency) for key in dep.params}


def code_deps(stage) -> list[str]:
    from dvc.dependency.param import ParamsDependency

    return [dep.def_path for dep in stage.deps if not isinstance(dep, ParamsDependency) and dep.def_path.startswith(CODE)]


def imported_files(stage) -> set[str]:
    """The source files of the stage's import graph that hold code (an empty __init__.py holds none)."""
    entry = ENTRY.match(stage.cmd)
    assert entry, f"{stage.addressing}: `{stage.cmd}` is not `python -m pipelines.MODULE`, so its imports are unknown"
    return graph_files(entry.group(1))


@functools.lru_cache(maxsize=None)
def graph_files(entry: str) -> frozenset[str]:
    return frozenset(path for path in source_paths(imported_modules(entry)) if (PROJECT / path).read_text().strip())


def covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep.rstrip("/") + "/")


def test_every_stage_depends_on_every_module_it_imports(stages):
    missing = {name: sorted(path for path in imported_files(stage) if not any(covers(dep, path) for dep in code_deps(stage)))
               for name, stage in stages.items()}
    assert not {name: paths for name, paths in missing.items() if paths}, "add these to the stages' deps in dvc.yaml"


def test_no_stage_depends_on_code_it_does_not_import(stages):
    stray = {name: [dep for dep in code_deps(stage) if not any(covers(dep, path) for path in imported_files(stage))]
             for name, stage in stages.items()}
    assert not {name: deps for name, deps in stray.items() if deps}, "remove these from the stages' deps in dvc.yaml"


def test_the_training_stages_depend_on_every_family_module_through_the_family_table(stages):
    # The table names its modules as strings (importlib): an edit to any model file reruns train@*.
    family_files = {module_file(get_family(f).__module__).relative_to(PROJECT).as_posix() for f in FAMILY_NAMES}
    for family in FAMILY_NAMES:
        assert family_files <= imported_files(stages[f"train@{family}"])


def test_train_lists_exactly_the_params_of_a_runs_identity(stages):
    # What decides a trained model is genflow.track.identity's run identity; the rest (log_every,
    # checkpoint_every, storage_path, ...) changes how a run is executed or watched, not its result.
    for family in FAMILY_NAMES:
        expected = {f"models.{family}", *(f"train.{key}" for key in identity_train_keys())}
        assert params_of(stages[f"train@{family}"]) == expected, family


def test_tune_lists_exactly_the_params_of_its_search_and_its_plot(stages):
    search = set(SearchSettings.model_fields) - OPERATIONAL_SETTINGS
    for family in FAMILY_NAMES:
        expected = {f"models.{family}", *(f"train.{key}" for key in identity_train_keys()), "train.checkpoint_every",
                    *(f"tune.{family}.{key}" for key in search), f"tune.{family}.plot_x", f"tune.{family}.plot_color"}
        assert params_of(stages[f"tune@{family}"]) == expected, family


def test_no_stage_lists_a_whole_section_or_an_operational_param(stages):
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    operational = {*(f"train.{key}" for key in OPERATIONAL_KEYS), "data.processes", "data.max_reject_fraction",
                   "evaluate.stats_cache", *(f"tune.{f}.{key}" for f in FAMILY_NAMES for key in OPERATIONAL_SETTINGS - {"plot_x", "plot_color"})}
    for name, stage in stages.items():
        for key in params_of(stage):
            value = params
            for part in key.split("."):
                assert isinstance(value, dict) and part in value, f"{name}: {key} is not in params.yaml"
                value = value[part]
            # Sections only where the whole section decides: a family's config, a search space.
            whole = re.fullmatch(r"models\.\w+|tune\.\w+\.space", key)
            assert whole or not isinstance(value, dict), f"{name}: {key} is a whole section; list its keys that decide the result"
            # checkpoint_every is operational for a run, not for a search (ASHA compares at checkpoints).
            if not (name.startswith("tune@") and key == "train.checkpoint_every"):
                assert key not in operational, f"{name}: {key} does not decide the stage's result"


@pytest.mark.parametrize("key", ["train.log_every", "train.checkpoint_every", "train.storage_path", "train.grid_every",
                                 "data.processes", "evaluate.stats_cache", "tracking.uri"])
def test_operational_params_rerun_none_of_train_evaluate_register(stages, key):
    downstream = [s for name, s in stages.items() if name.split("@")[0] in ("train", "evaluate", "register")]
    assert all(key not in params_of(stage) for stage in downstream)


def test_prepare_depends_on_data_source_itself(stages):
    params = load_params(PROJECT / "params.yaml")
    deps = [dep.def_path for dep in stages["prepare"].deps]
    assert params.data.source in deps and params.data.is_sample()  # data/sample: the synth stage's output
    assert "data.source" in params_of(stages["prepare"])


def training_losses(family: str) -> list[str]:
    """What train-FAMILY draws: the losses its optimizers train, or its monitor where that is none of
    them (sae: each phase trains a part; the monitor follows the whole stack)."""
    from genflow.train.step import Optimization
    from tests.models.tiny import tiny_overrides

    params = load_params(None, [*tiny_overrides(family), "train.max_steps=100"])
    model_class = get_family(family)
    losses = list(Optimization.build(model_class(params.family_config(family)), params.train).loss_keys.values())
    return losses if model_class.monitor in losses else [model_class.monitor]


def test_top_level_plots_draw_every_family_in_a_colour_per_revision():
    from dvc_render.vega_templates import get_template

    pipeline = yaml.safe_load((PROJECT / "dvc.yaml").read_text())
    plots = {name: spec for entry in pipeline["plots"] if isinstance(entry, dict) for name, spec in entry.items()}
    params = load_params(PROJECT / "params.yaml")
    for family in FAMILY_NAMES:
        train = plots[f"train-{family}"]
        assert train["x"] == "step" and train["y"] == {f"plots/train/{family}.csv": training_losses(family)}
        tune = plots[f"tune-{family}"]
        x, _, log_x = plot_axes(search_settings(params, family), family)
        assert tune["x"] == x and tune["y"] == {f"plots/tune/{family}.csv": "objective"}
        assert tune["template"] == ("scatter_log_x" if log_x else "scatter")
        assert f"plots/tune/{family}.png" in pipeline["plots"]
        for template in (train.get("template", "linear"), tune["template"]):
            # DVC fills the colour anchor with the revision (dvc plots diff, experiments).
            assert get_template(template, str(PROJECT / ".dvc/plots")).has_anchor("color"), template


def run(command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_a_changed_image_under_a_celeba_source_outside_the_project_invalidates_prepare(tmp_path):
    # Real CelebA lives anywhere (a mount, a download folder): -S data.source=/data/celeba makes
    # it prepare's dependency, hashed into dvc.lock; swapping one image there reruns prepare.
    project, celeba = tmp_path / "project", tmp_path / "celeba"
    (celeba / "img_align_celeba").mkdir(parents=True)
    for i in range(3):
        (celeba / "img_align_celeba" / f"{i:06d}.jpg").write_bytes(bytes([i]) * 100)
    (celeba / "list_attr_celeba.txt").write_text("3\nSmiling\n")
    project.mkdir()
    for path in ("dvc.yaml", "genflow", "pipelines"):
        copy = shutil.copytree if (PROJECT / path).is_dir() else shutil.copy
        copy(PROJECT / path, project / path, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["data"]["source"] = str(celeba)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    (project / "data/sample").mkdir(parents=True)
    (project / "data/sample/0.jpg").write_bytes(b"0")  # stands for the synth stage's output
    (project / "data/shards").mkdir(parents=True)
    (project / "data/shards/stats.json").write_text("{}")  # stands for prepare's output: not run here
    run(["git", "init", "-q"], project)
    run(["dvc", "init", "-q"], project)
    run(["dvc", "commit", "-f", "-q", "prepare"], project)  # records prepare's deps as if it had run
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    source = next(dep for dep in lock["stages"]["prepare"]["deps"] if dep["path"] == str(celeba))
    assert source["nfiles"] == 4 and source["md5"].endswith(".dir")
    assert "up to date" in run(["dvc", "status", "prepare"], project)

    (celeba / "img_align_celeba" / "000001.jpg").write_bytes(b"another image")
    status = run(["dvc", "status", "prepare"], project)
    assert "changed deps" in status and f"modified:           {celeba}" in status
    assert '"synth" -> "prepare"' in run(["dvc", "dag", "--dot", "prepare"], project)


def test_the_sample_keyword_resolves_to_the_sample_as_prepares_dependency(tmp_path):
    # `dvc exp run -S data.source=sample`: DVC hashes the path `sample`, the project's link to
    # data/sample (the default data.sample.dir), where the synth stage writes.
    assert Path(PROJECT / "sample").is_symlink()
    assert (PROJECT / "sample").resolve() == (PROJECT / load_params(None).data.sample.dir).resolve()
    project = tmp_path / "project"
    project.mkdir()
    for path in ("dvc.yaml", "genflow", "pipelines"):
        copy = shutil.copytree if (PROJECT / path).is_dir() else shutil.copy
        copy(PROJECT / path, project / path, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    (project / "sample").symlink_to(os.readlink(PROJECT / "sample"))
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["data"]["source"] = "sample"  # as `dvc exp run -S data.source=sample` writes it
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    (project / "data/sample").mkdir(parents=True)
    for i in range(2):
        (project / f"data/sample/{i}.jpg").write_bytes(bytes([i]) * 50)  # stands for the synth stage's output
    (project / "data/shards").mkdir()
    (project / "data/shards/stats.json").write_text("{}")  # stands for prepare's output: not run here
    run(["git", "init", "-q"], project)
    run(["dvc", "init", "-q"], project)
    run(["dvc", "commit", "-f", "-q", "prepare"], project)  # fails on a dependency that does not resolve
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    source = next(dep for dep in lock["stages"]["prepare"]["deps"] if dep["path"] == "sample")
    assert source["nfiles"] == 2 and source["md5"].endswith(".dir")
    (project / "data/sample/1.jpg").write_bytes(b"another image")
    status = run(["dvc", "status", "prepare"], project)
    assert "changed deps" in status and "modified:           sample" in status
    # `dvc repro prepare` runs synth first: the edge is there although `sample` is not synth's output path.
    assert '"synth" -> "prepare"' in run(["dvc", "dag", "--dot", "prepare"], project)


def test_the_sample_keyword_in_a_checkout_without_symlinks_is_refused_naming_the_path_to_give(tmp_path):
    # Windows without developer mode, or a zip, checks the link out as a text file holding its target.
    (tmp_path / "sample").write_text("data/sample")
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["data"]["source"] = "sample"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run(["python3", "-m", "pipelines.prepare"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert done.returncode != 0 and not (tmp_path / "data").exists()
    assert "give the sample by its path: dvc exp run -S data.source=data/sample" in done.stderr
