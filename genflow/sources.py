"""The project's own code that a command runs: the static import graph of its entry module.

    imported_modules("pipelines.train")   {"pipelines.train", "genflow.train.trainer", ...}
    code_digest(modules)                  one sha256 over their tokens (comments and blank lines aside)

Read from the source files, never by importing them (importing a model file costs seconds and
starts nothing we want here): every `import` and `from ... import` anywhere in a module counts,
inside functions too (a lazy import runs when that function does), as Python's modulefinder
counts them. Import paths written as strings, "genflow.models.vae:VAE" (the family table's
entries, which importlib resolves), count as imports of their module.

Two users: dvc.yaml's code deps are checked against these graphs (tests/test_dvc_stages.py), and
a training run's identity carries the digest of the code that trains it
(genflow/track/identity.py), so that a changed model file trains afresh instead of resuming the
run trained with the old code.
"""

from __future__ import annotations

import ast
import hashlib
import re
import tokenize
from collections.abc import Iterable
from pathlib import Path

# The folder holding the genflow package (and, in a checkout, pipelines/).
PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("genflow", "pipelines")
_STRING_IMPORT = re.compile(r"^((?:genflow|pipelines)(?:\.\w+)+):\w+$")


def module_file(name: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of module `name` under `root` (a package's __init__.py), or None."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def direct_imports(name: str, root: Path = PROJECT_ROOT, string_imports: bool = True) -> set[str]:
    """The genflow/pipelines modules that module `name` imports anywhere in its body."""
    path = module_file(name, root)
    if path is None:
        raise FileNotFoundError(f"module {name}: no source under {root}")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from .. import y
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from package import module` imports that module; `from module import name` does not
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if alias.name != "*" and module_file(f"{base}.{alias.name}", root) is not None)
        elif string_imports and isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _STRING_IMPORT.match(node.value)
            if match:
                found.add(match.group(1))
    return {module for module in found if _is_ours(module) and module_file(module, root) is not None}


def imported_modules(entry: str, root: Path = PROJECT_ROOT, string_imports: bool = True) -> set[str]:
    """Every genflow/pipelines module that running `entry` can import, `entry` and the packages
    holding each module (whose __init__ runs first) included."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo.extend(m for m in [*parents, *direct_imports(name, root, string_imports)] if m not in seen)
    return {name for name in seen if module_file(name, root) is not None}


def code_digest(modules: Iterable[str], root: Path = PROJECT_ROOT) -> str:
    """sha256 over the modules' names and tokens: an edited comment, docstring or blank line keeps
    it, any change to the code changes it. Tokens, not the AST, so that every Python version agrees."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(f"\0{name}\0".encode())
        with open(module_file(name, root), "rb") as source:
            statement: list[tokenize.TokenInfo] = []
            for token in tokenize.tokenize(source.readline):
                if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING):
                    continue
                if token.type in (tokenize.INDENT, tokenize.DEDENT):  # structure: always counted
                    digest.update(token.string.encode() + b"\0")
                    continue
                statement.append(token)
                if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
                    # A statement that is a lone string (a docstring) computes nothing.
                    if not (len(statement) == 2 and statement[0].type == tokenize.STRING):
                        for part in statement:
                            digest.update(("\n" if part.type == tokenize.NEWLINE else part.string).encode() + b"\0")
                    statement = []
    return digest.hexdigest()


def source_paths(modules: Iterable[str], root: Path = PROJECT_ROOT) -> set[str]:
    """The modules' files relative to `root`, as dvc.yaml names them (genflow/train/loop.py)."""
    return {module_file(name, root).relative_to(root).as_posix() for name in modules}

