"""The concepts file of a run of many concepts (`config.concepts_file`): read and checked.

JSON lines, one concept per line:

  {"placeholder_token": "<cat-toy>", "train_data_dir": "data/cat-toy"}
  {"placeholder_token": "<tea-pot>", "train_data_dir": "data/tea-pot",
   "initializer_token": "teapot", "learning_rate": 1e-3, "seed": 7}

`placeholder_token` and `train_data_dir` are required; `initializer_token`,
`learnable_property`, `caption_extension`, `init_embedding`, `learning_rate` and
`seed` are optional and default to the run's config value (`run_dir.CONCEPT_FIELDS`);
every other field is the run's and shared by all concepts. Blank lines and lines
starting with `#` are skipped. `train_data_dir` is resolved as the run's own is:
relative to the current directory (not to the concepts file's folder), or a gs:// URL.

A concept trained with others is `concept_config(config, spec)` trained alone. Its
folder in the run directory is `concept_name(placeholder_token)`: the token without
one pair of surrounding `<>`, any character but letters, digits and `._-` as `_`
(`<cat-toy>` -> `cat-toy`). Every error is a `ConceptsFileError` of one line naming
the file and the line; reading writes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
from typing import Any

from ti_jax import errors
from ti_jax.embeddings import file_names
from ti_jax.runtime import console, fileio, run_dir
from ti_jax.training import config as config_lib

REQUIRED = ("placeholder_token", "train_data_dir")
OPTIONAL = tuple(f for f in run_dir.CONCEPT_FIELDS if f not in REQUIRED)
# A file of more concepts than this is refused: each concept holds a row of vectors, its
# optimizer state and its images' latents for the whole run (64 per v5e chip of a pod
# slice is far below it).
MAX_CONCEPTS = 65536


class ConceptsFileError(config_lib.ConfigError):
  """A concepts file that cannot be used; one line naming the file and line."""


@dataclasses.dataclass(frozen=True)
class ConceptSpec:
  """One concept of a concepts file, every optional field filled from the run's config.

  `name` is its folder in the run directory (`concept_name`); `line` is its line in
  the file (1-based), for messages.
  """
  name: str
  placeholder_token: str
  train_data_dir: str
  initializer_token: str
  learnable_property: str
  caption_extension: str
  init_embedding: str
  learning_rate: float
  seed: int
  line: int = 0

  def record(self) -> dict[str, Any]:
    """The concept's entry of run.json's and the checkpoints' "concepts" list: its name
    and every `run_dir.CONCEPT_FIELDS` value."""
    return {"name": self.name, **{f: getattr(self, f) for f in run_dir.CONCEPT_FIELDS}}

  def checkpoint_record(self) -> dict[str, Any]:
    """The concept's entry of the checkpoints' "concepts" list: `record` and, as a single
    run's metadata has it, "train_data_path" (the images' folder made absolute, so that
    evaluate finds them from any directory)."""
    path = self.train_data_dir
    return {**self.record(),
            "train_data_path": path if fileio.is_remote(path) else os.path.abspath(path)}


def concept_name(placeholder_token: str) -> str:
  """The folder name of the concept of `placeholder_token`: `<cat-toy>` -> `cat-toy`.

  The token without one pair of surrounding `<>`, every character other than
  letters, digits and `._-` as `_`, no leading or trailing dots (the name InvokeAI
  reads from a file, `file_names.invokeai_name`): safe on every file system.
  """
  return file_names.invokeai_name(placeholder_token)


def _type_error(field: str, value: Any) -> str | None:
  """Why `value` does not suit `field` (None if it does)."""
  if field == "learning_rate":
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return f"learning_rate must be a number, got {json.dumps(value)}"
    if not (math.isfinite(value) and value > 0):
      return f"learning_rate must be a finite number > 0, got {value}"
  elif field == "seed":
    if isinstance(value, bool) or not isinstance(value, int):
      return f"seed must be an integer, got {json.dumps(value)}"
    if not 0 <= value <= config_lib.MAX_SEED:
      return f"seed must be >= 0 and < 2**32 (JAX's random keys take 32-bit seeds), got {value}"
  elif not isinstance(value, str):
    return f"{field} must be a string, got {json.dumps(value)}"
  elif field in ("placeholder_token", "train_data_dir", "initializer_token") and not value.strip():
    return f"{field} must not be empty"
  elif field == "placeholder_token" and any(c.isspace() for c in value):
    return f"placeholder_token must be one word without spaces, got {value!r}"
  elif field == "learnable_property" and value not in ("object", "style"):
    return f"learnable_property must be 'object' or 'style', got {value!r}"
  elif field == "caption_extension" and value and not (value.startswith(".") and len(value) > 1):
    return f"caption_extension must be '' or start with a dot, e.g. '.txt', got {value!r}"
  return None


def _spec(values: dict, config, lineno: int) -> ConceptSpec:
  """The concept of one line's object `values` (already checked), the rest from `config`."""
  fields = {f: values.get(f, config[f]) for f in run_dir.CONCEPT_FIELDS}
  fields["learning_rate"] = float(fields["learning_rate"])
  fields["seed"] = int(fields["seed"])
  return ConceptSpec(name=concept_name(fields["placeholder_token"]), line=lineno, **fields)


def parse_concepts(text: str, config, path: str = "concepts file") -> tuple[ConceptSpec, ...]:
  """The concepts of a concepts file's `text` (see the module docstring), in file order.

  `config` gives the optional fields' defaults. Checks everything but the file system.
  """
  def fail(lineno: int, why: str):
    raise ConceptsFileError(f"{path} line {lineno}: {why}")

  known = ", ".join(REQUIRED + OPTIONAL)
  specs: list[ConceptSpec] = []
  tokens: dict[str, int] = {}  # placeholder token -> its line
  names: dict[str, tuple[str, int]] = {}  # folder name, lower-cased -> (token, line)
  for lineno, raw in enumerate(text.splitlines(), 1):
    line = raw.strip()
    if not line or line.startswith("#"):
      continue
    try:
      values = json.loads(line)
    except json.JSONDecodeError as e:
      fail(lineno, f"not JSON ({e.msg} at column {e.colno}); each line holds one concept as "
           "a JSON object")
    if not isinstance(values, dict):
      fail(lineno, f"a JSON {type(values).__name__}, not an object; each line holds one "
           "concept as a JSON object")
    unknown = [k for k in values if k not in REQUIRED + OPTIONAL]
    if unknown:
      fail(lineno, f"unknown key {unknown[0]!r} (known: {known}; every other field is the "
           "run's, shared by all concepts)")
    missing = [k for k in REQUIRED if k not in values]
    if missing:
      fail(lineno, f"missing {missing[0]!r} (required: {', '.join(REQUIRED)})")
    for field, value in values.items():
      why = _type_error(field, value)
      if why:
        fail(lineno, why)
    spec = _spec(values, config, lineno)
    why = _type_error("initializer_token", spec.initializer_token)  # the run's, if not given
    if why:
      fail(lineno, f"{why} (set it on the line or in the run's config)")
    if spec.placeholder_token in tokens:
      fail(lineno, f"placeholder_token {spec.placeholder_token!r} is also on line "
           f"{tokens[spec.placeholder_token]}; each concept needs its own token")
    if spec.name.lower() in run_dir.RESERVED_NAMES:
      fail(lineno, f"placeholder_token {spec.placeholder_token!r} would name the concept's "
           f"folder {spec.name!r}, which the run directory uses itself; choose another token")
    if spec.name.lower() in names:
      other, at = names[spec.name.lower()]
      fail(lineno, f"placeholder_token {spec.placeholder_token!r} and {other!r} (line {at}) "
           f"would share the concept folder {spec.name!r} (a name keeps letters, digits and "
           "._- without case); choose tokens that differ there")
    tokens[spec.placeholder_token] = lineno
    names[spec.name.lower()] = (spec.placeholder_token, lineno)
    specs.append(spec)
    if len(specs) > MAX_CONCEPTS:
      fail(lineno, f"more than {MAX_CONCEPTS} concepts in one run")
  if not specs:
    raise ConceptsFileError(f"{path} holds no concept (one JSON object per line, e.g. "
                            '{"placeholder_token": "<cat-toy>", "train_data_dir": "cat-toy"})')
  return tuple(specs)


def read_concepts_file(path: str, config) -> tuple[ConceptSpec, ...]:
  """The concepts of the concepts file at `path` (local or gs://), in file order.

  `config` is the run's ConfigDict: it gives the optional fields' defaults. Refuses a
  missing or unreadable file, an empty one, and any bad line (`parse_concepts`),
  then a `train_data_dir` that is not a folder, each in one line naming the file and
  line. Writes nothing.
  """
  try:
    data = fileio.read_small_file(path)
  except FileNotFoundError:
    raise ConceptsFileError(f"concepts file {path} does not exist") from None
  except OSError as e:
    raise ConceptsFileError(f"cannot read concepts file {path}: "
                            f"{console.one_line(e, limit=300)}") from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ConceptsFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  specs = parse_concepts(text, config, path)
  for spec in specs:
    if not fileio.is_dir(spec.train_data_dir):
      what = "is not a folder" if fileio.exists(spec.train_data_dir) else "does not exist"
      raise ConceptsFileError(f"{path} line {spec.line}: train_data_dir {spec.train_data_dir} "
                              f"{what} (a relative path is read from the current directory)")
  return specs


@contextlib.contextmanager
def concept_errors(path: str, spec: ConceptSpec):
  """Re-raises bad input of one concept (any `errors.UserError`: its images, initializer,
  captions, ...) as one `ConceptsFileError` line naming the file, its line and the concept."""
  try:
    yield
  except errors.UserError as e:
    raise ConceptsFileError(f"{path} line {spec.line} (concept {spec.name}): {e}") from None


def concept_config(config, spec: ConceptSpec):
  """A copy of the run's ConfigDict `config` with `spec`'s fields set: what "this concept
  trained alone" runs. Every other field is the run's."""
  c = copy.deepcopy(config)
  with c.unlocked():
    for field in run_dir.CONCEPT_FIELDS:
      c[field] = getattr(spec, field)
    if "concepts_file" in c:  # alone: a run of this one concept
      c.concepts_file = ""
  return c
