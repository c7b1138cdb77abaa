"""Imports run down the layers: no module reaches up, and no two import each other (issue 9 #8)."""

import ast
from pathlib import Path

import pytest


def genflow_imports(path: str) -> set[str]:
    """The genflow modules a file imports, at the top or inside functions, type-checking ones too."""
    tree = ast.parse(Path(path).read_text())
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return {name for name in names if name.split(".")[0] == "genflow"}


def test_config_imports_nothing_of_genflow():
    # It imported the family table, so reading params imported every model.
    assert genflow_imports("genflow/config.py") == set()


@pytest.mark.parametrize("path", ["genflow/track/registry.py", "genflow/track/identity.py", "genflow/track/pyfunc.py",
                                  "genflow/track/mlflow.py"])
def test_tracking_reaches_neither_evaluation_nor_training(path):
    # The registry reached eval/report.py, and through it train/trainer.py, for the run key.
    assert not [m for m in genflow_imports(path) if m.startswith(("genflow.eval", "genflow.train"))]


def test_tune_report_does_not_import_the_search():
    assert "genflow.tune.search" not in genflow_imports("genflow/tune/report.py")
