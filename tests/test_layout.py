"""The package's shape: entry points are thin and never imported; library code reads no flags
and never imports cli; packages form layers (none imports one above its own); imports form no
circle, none hides inside a function, no library module imports test support, and status lines
and one-line errors are defined once (ti_jax/runtime/console.py); no module outside models/
is over 600 lines (the trainer 450), and nothing repeats per text encoder as `x_2` fields."""

import ast
import os
import re

import pytest

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


# Test support: the only package library code may not import (it may import the library).
TESTING = "ti_jax.testing"

# Files allowed function-local imports of ti_jax modules: none (every such import sits at
# module level, where it shows the layering). Kept as a named, empty set so that an
# exception has to be argued for here.
LOCAL_IMPORTS_ALLOWED: set[str] = set()

# Flag plumbing for entry points: only they and test support may import it.
CLI = "ti_jax.cli"

# The layers, bottom first: a module may import modules of its own layer or below, never
# above. A module takes the layer of the longest prefix listed here.
LAYERS = (
    ("ti_jax.errors", "ti_jax.runtime"),  # exceptions, files, console, pmap, run directory
    ("ti_jax.models",),  # Flax modules
    ("ti_jax.weights",),  # loading base models, tiny models, tokenizers
    ("ti_jax.data", "ti_jax.embeddings"),  # images, captions; embedding files, pseudo-words
    ("ti_jax.sampling",),  # the guided loop, samplers, concepts from runs and files
    # The synthetic world's scenes and checker are what evaluation scores with.
    ("ti_jax.world", "ti_jax.evaluation"),
    # world.base_model trains the world's base model, so it sits with training.
    ("ti_jax.training", "ti_jax.world.base_model"),
    ("ti_jax.cli", "ti_jax.testing") + tuple(f"ti_jax.{name}" for name in ENTRY_POINTS),
)


def _module_name(path):
  """"ti_jax/weights/loading.py" -> "ti_jax.weights.loading"; a package's __init__ -> the package."""
  name = path[:-len(".py")].replace(os.sep, ".")
  return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _import_statements(node, in_function=False):
  """Every import statement under `node`, with whether it runs inside a function (or lambda)."""
  for child in ast.iter_child_nodes(node):
    if isinstance(child, (ast.Import, ast.ImportFrom)):
      yield child, in_function
    else:
      nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      yield from _import_statements(child, in_function or nested)


def _ti_jax_imports(path, tree, known):
  """`(module, line, in_function)` for each ti_jax module that `path` imports.

  `from pkg import name` counts as importing `pkg.name` when that is a module (in `known`),
  else `pkg`; relative imports are resolved against `path`'s package.
  """
  package = _module_name(path).split(".")
  if not path.endswith("__init__.py"):
    package = package[:-1]
  for node, in_function in _import_statements(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    else:
      base = node.module or ""
      if node.level:
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    for target in dict.fromkeys(targets):  # one per module, in order
      if target == "ti_jax" or target.startswith("ti_jax."):
        yield target, node.lineno, in_function


def _import_graph():
  """module -> {imported ti_jax module: "path:line" of the first such import}."""
  trees = {path: tree for path, tree in _modules()}
  known = {_module_name(path) for path in trees}
  graph = {}
  for path, tree in trees.items():
    edges = graph.setdefault(_module_name(path), {})
    for target, line, _ in _ti_jax_imports(path, tree, known):
      if target in known:
        edges.setdefault(target, f"{path}:{line}")
  return graph


def _find_cycle(graph):
  """One import circle as [m0, m1, ..., m0], or None (depth-first search)."""
  state, stack = {}, []  # state: 1 while on the stack, 2 when done

  def visit(module):
    state[module] = 1
    stack.append(module)
    for target in sorted(graph.get(module, ())):
      if state.get(target) == 1:
        return stack[stack.index(target):] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    stack.pop()
    state[module] = 2
    return None

  for module in sorted(graph):
    if module not in state:
      cycle = visit(module)
      if cycle:
        return cycle
  return None


def test_imports_form_no_circle():
  # Function-local imports count too: a circle they hide is still a circle in the layering.
  graph = _import_graph()
  cycle = _find_cycle(graph)
  assert cycle is None, "import circle: " + " -> ".join(cycle) + " (" + ", ".join(
      graph[a][b] for a, b in zip(cycle, cycle[1:])) + ")"


def test_no_library_module_imports_test_support():
  trees = dict(_modules())
  known = {_module_name(path) for path in trees}
  offenders = [f"{path}:{line} imports {target}"
               for path, tree in trees.items() if not _module_name(path).startswith(TESTING)
               for target, line, _ in _ti_jax_imports(path, tree, known)
               if target == TESTING or target.startswith(TESTING + ".")]
  assert not offenders, offenders


def test_no_function_local_imports_of_ti_jax_modules():
  # Imports at module level show the layering; inside a function they hide it (and circles).
  # Optional third-party packages (torch, huggingface_hub, ...) may still be imported lazily.
  trees = dict(_modules())
  known = {_module_name(path) for path in trees}
  offenders = [f"{path}:{line} imports {target} inside a function"
               for path, tree in trees.items() if path not in LOCAL_IMPORTS_ALLOWED
               for target, line, in_function in _ti_jax_imports(path, tree, known) if in_function]
  assert not offenders, offenders


def _layer(module):
  """The index in LAYERS of `module` (the longest matching prefix), or None for the package."""
  best, layer = "", None
  for index, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
        best, layer = prefix, index
  return layer


def test_every_module_has_a_layer():
  unplaced = [m for m in _import_graph() if m != "ti_jax" and _layer(m) is None]
  assert not unplaced, f"add these to LAYERS in tests/test_layout.py: {unplaced}"


def test_no_module_imports_a_layer_above_its_own():
  # E.g. embeddings, sampling and evaluation read a run directory through runtime.run_dir,
  # never through ti_jax.training.
  graph = _import_graph()
  offenders = [f"{where} ({module}, layer {_layer(module)}) imports {target} (layer "
               f"{_layer(target)})"
               for module, edges in graph.items() for target, where in edges.items()
               if None not in (_layer(module), _layer(target)) and _layer(target) > _layer(module)]
  assert not offenders, offenders


def test_nothing_below_training_imports_training():
  # The rule the layers exist for, stated on its own: reading a run needs no training code.
  graph = _import_graph()
  training = _layer("ti_jax.training")
  offenders = [f"{where} imports {target}" for module, edges in graph.items()
               if _layer(module) is not None and _layer(module) < training
               for target, where in edges.items()
               if target == "ti_jax.training" or target.startswith("ti_jax.training.")]
  assert not offenders, offenders


def test_no_library_module_imports_cli():
  # cli is flag plumbing; status lines and one-line errors are ti_jax.runtime.console's.
  trees = dict(_modules())
  known = {_module_name(path) for path in trees}
  exempt = {f"ti_jax.{name}" for name in ENTRY_POINTS} | {CLI}
  offenders = [f"{path}:{line} imports {target}"
               for path, tree in trees.items()
               if _module_name(path) not in exempt and not _module_name(path).startswith(TESTING)
               for target, line, _ in _ti_jax_imports(path, tree, known) if target == CLI]
  assert not offenders, offenders


@pytest.mark.parametrize("name", ["one_line", "log"])
def test_one_definition_of_one_line_and_log(name):
  # One way to report: every status line and every shortened error reads the same. Private
  # copies (`_one_line`, `_log`) count too.
  home = os.path.join("ti_jax", "runtime", "console.py")
  definitions = [(path, node.lineno) for path, tree in _modules() for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and node.name.lstrip("_") == name]
  assert [path for path, _ in definitions] == [home], definitions


# Modules a reader takes in at once: the trainer tells the run as a story over rooms, and no
# library module outside models/ (whose Flax modules mirror diffusers' files) grows past this.
MAX_MODULE_LINES = 600
MAX_TRAINER_LINES = 450


def test_no_module_outside_models_is_too_long_and_the_trainer_is_a_story():
  long = {}
  for path, _ in _modules():
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
      lines = sum(1 for _ in f)
    limit = MAX_TRAINER_LINES if path == os.path.join("ti_jax", "training", "trainer.py") \
        else MAX_MODULE_LINES
    if not path.startswith(os.path.join("ti_jax", "models", "")) and lines > limit:
      long[path] = lines
  assert not long, long


# Names that end in "_2" and are no shadow of a first encoder's data: the conversion spec of the
# pipeline role "text_encoder_2" (diffusers' name for SDXL's OpenCLIP bigG).
SECOND_ENCODER_NAMES = {"TEXT_ENCODER_2"}


def _identifiers(tree):
  for node in ast.walk(tree):
    if isinstance(node, ast.Name):
      yield node.id, node.lineno
    elif isinstance(node, ast.Attribute):
      yield node.attr, node.lineno
    elif isinstance(node, ast.arg):
      yield node.arg, node.lineno
    elif isinstance(node, ast.keyword) and node.arg:
      yield node.arg, node.value.lineno
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      yield node.name, node.lineno


def test_whatever_repeats_per_text_encoder_is_a_record_not_a_second_field():
  # SDXL's second encoder was once threaded through as `x_2` shadow fields (232 of them); a
  # third encoder kind (T5) must add a record to `StableDiffusion.text_encoders`, not `x_3`s.
  # On-disk names ("embeds_2", "learned_embeds_2.safetensors") are strings, not identifiers.
  shadows = sorted({f"{path}:{line} {name}" for path, tree in _modules()
                    for name, line in _identifiers(tree)
                    if re.search(r"_[2-9]$", name) and name not in SECOND_ENCODER_NAMES})
  assert not shadows, shadows
