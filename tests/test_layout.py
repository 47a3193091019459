"""The package's shape: entry points are thin and never imported; library code reads no flags."""

import ast
import os

from conftest import REPO

ENTRY_POINTS = ("train", "sample", "export", "evaluate", "tiny_model", "edit", "train_world")
PACKAGE = os.path.join(REPO, "ti_jax")


def _modules():
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        yield os.path.relpath(path, REPO), ast.parse(open(path, encoding="utf-8").read())


def _imported_modules(tree):
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f"{node.module}.{a.name}" for a in node.names)


def test_no_module_imports_an_entry_point():
  entry = {f"ti_jax.{name}" for name in ENTRY_POINTS}
  offenders = [(path, m) for path, tree in _modules() for m in _imported_modules(tree) if m in entry]
  assert not offenders, offenders


def test_entry_points_are_thin():
  for name in ENTRY_POINTS:
    path = os.path.join(PACKAGE, f"{name}.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert functions == ["main"], (name, functions)
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
    assert main.end_lineno - main.lineno < 40, f"{name}.main is {main.end_lineno - main.lineno} lines"


def test_library_code_reads_no_flags():
  library = [(path, tree) for path, tree in _modules()
             if os.path.basename(path)[:-3] not in ENTRY_POINTS + ("cli",)]
  offenders = [path for path, tree in library for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr == "FLAGS"]
  assert not offenders, offenders
