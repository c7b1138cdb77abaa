"""The static import graph (what a stage's code deps and a run's code digest are made of)."""

import shutil
from pathlib import Path

from genflow.sources import code_digest, imported_modules, source_paths
from genflow.track.identity import training_code

PROJECT = Path(__file__).resolve().parents[1]


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_lazy_relative_and_string_imports_count_and_nothing_else(tmp_path):
    write(tmp_path, {
        "genflow/__init__.py": "",
        "genflow/entry.py": "import os\nimport torch\n\ndef run():\n    from genflow import table\n",
        "genflow/table.py": 'PATHS = {"x": "genflow.models.x:X", "not": "genflow is not a path"}\n',
        "genflow/models/__init__.py": "",
        "genflow/models/x.py": "from . import helper\nfrom .helper import name\n",
        "genflow/models/helper.py": "name = 1\n",
        "genflow/unrelated.py": "",
    })
    assert imported_modules("genflow.entry", tmp_path) == {
        "genflow", "genflow.entry", "genflow.table", "genflow.models", "genflow.models.x", "genflow.models.helper"}
    assert imported_modules("genflow.entry", tmp_path, string_imports=False) == {"genflow", "genflow.entry", "genflow.table"}
    assert source_paths({"genflow.models", "genflow.models.x"}, tmp_path) == {"genflow/models/__init__.py", "genflow/models/x.py"}


def test_the_code_digest_ignores_comments_and_blank_lines_not_code(tmp_path):
    write(tmp_path, {"genflow/__init__.py": "", "genflow/m.py": "def f(x):\n    return x + 1\n"})
    before = code_digest({"genflow", "genflow.m"}, tmp_path)
    write(tmp_path, {"genflow/m.py": "# why: one more\n\ndef f(x):  # the step\n\n    return x + 1\n"})
    assert code_digest({"genflow", "genflow.m"}, tmp_path) == before
    write(tmp_path, {"genflow/m.py": "def f(x):\n    return x + 2\n"})
    assert code_digest({"genflow", "genflow.m"}, tmp_path) != before


def test_a_changed_model_file_changes_that_familys_training_code_only(tmp_path):
    # A run's identity carries this digest: the edited family trains afresh under DVC (its stage
    # reran because genflow/models changed), another family finds and returns its trained run.
    shutil.copytree(PROJECT / "genflow", tmp_path / "genflow", ignore=shutil.ignore_patterns("__pycache__"))
    before = {family: training_code(family, tmp_path) for family in ("vae", "dcgan")}
    vae = tmp_path / "genflow/models/vae.py"
    vae.write_text(vae.read_text() + "\nEDITED = True\n")
    training_code.cache_clear()
    assert training_code("vae", tmp_path) != before["vae"] and training_code("dcgan", tmp_path) == before["dcgan"]


def test_docstrings_do_not_change_the_digest_but_statements_do(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    module = package / "m.py"

    def digest(text: str) -> str:
        module.write_text(text)
        return code_digest(["pkg.m"], tmp_path)

    plain = digest('"""Module."""\n\ndef f(x):\n    """Twice x."""\n    return 2 * x\n')
    assert digest('"""Another module text."""\n\ndef f(x):\n    """Doubles x."""\n    return 2 * x\n') == plain
    assert digest('"""Module."""\n\ndef f(x):\n    """Twice x."""\n    return 3 * x\n') != plain
    assert digest('"""Module."""\n\ndef f(x):\n    """Twice x."""\n    y = "a string in code"\n    return 2 * x\n') != plain
