"""training/config.py is every config field's one home: each field has its default with a
comment, a check (or is listed as needing none), and the identity tables are the ones runs
have always been compared by."""

import ast
import inspect
import io
import tokenize

import pytest

from ti_jax.training import checkpointing
from ti_jax.training import config as training_config

# The identity tables as they were before they moved to config.py (checkpointing.py):
# run.json and every checkpoint written since are compared by them, in this order.
OLD_IDENTITY_FIELDS = ("placeholder_token", "num_vectors", "initializer_token",
                       "pretrained_model_name_or_path", "learnable_property", "train_data_dir",
                       "resolution", "per_image_tokens", "caption_extension", "templates_file",
                       "buckets")
OLD_IDENTITY_DEFAULTS = {"per_image_tokens": False, "caption_extension": "", "templates_file": "",
                         "buckets": None}
OLD_CHECKPOINT_IDENTITY = ("placeholder_token", "initializer_token",
                           "pretrained_model_name_or_path", "num_vectors", "learnable_property",
                           "resolution", "image_files", "seed", "per_image_tokens", "snr_gamma",
                           "noise_offset", "optimizer", "caption_extension", "templates_file",
                           "prompt_texts_sha256", "buckets")
OLD_CHECKPOINT_DEFAULTS = {"snr_gamma": 0.0, "noise_offset": 0.0, "optimizer": "adamw",
                           "caption_extension": "", "templates_file": "",
                           "prompt_texts_sha256": "", "buckets": None}

FIELDS = tuple(training_config.get_config().keys())


def _function(name):
  """The AST of config.py's top-level function `name`, and config.py's source."""
  source = inspect.getsource(training_config)
  tree = ast.parse(source)
  return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name), source


def test_identity_tables_are_the_ones_runs_were_compared_by():
  assert training_config.IDENTITY_FIELDS == OLD_IDENTITY_FIELDS
  assert training_config.IDENTITY_DEFAULTS == OLD_IDENTITY_DEFAULTS
  assert training_config.CHECKPOINT_IDENTITY == OLD_CHECKPOINT_IDENTITY
  assert training_config.CHECKPOINT_DEFAULTS == OLD_CHECKPOINT_DEFAULTS
  # checkpointing compares runs by these very tables.
  assert checkpointing.IDENTITY_FIELDS is training_config.IDENTITY_FIELDS
  assert checkpointing.CHECKPOINT_IDENTITY is training_config.CHECKPOINT_IDENTITY


def test_identity_names_config_fields_or_what_a_run_computes():
  for name in training_config.IDENTITY_FIELDS + training_config.CHECKPOINT_IDENTITY:
    assert name in FIELDS or name in training_config.COMPUTED_IDENTITY, name
  for defaults, table in ((training_config.IDENTITY_DEFAULTS, training_config.IDENTITY_FIELDS),
                          (training_config.CHECKPOINT_DEFAULTS,
                           training_config.CHECKPOINT_IDENTITY)):
    assert set(defaults) <= set(table)


def test_every_field_is_in_an_identity_or_outside_both():
  """A new field needs a decision: part of what a run learns, or free to change on resume."""
  identity = set(training_config.IDENTITY_FIELDS + training_config.CHECKPOINT_IDENTITY)
  identity |= {f for fields in training_config.COMPUTED_IDENTITY.values() for f in fields}
  outside = training_config.NOT_IDENTITY
  assert len(set(outside)) == len(outside) and set(outside) <= set(FIELDS)
  assert not identity & set(outside)
  assert [f for f in FIELDS if f not in identity and f not in outside] == []


def test_run_records_carry_every_identity_field():
  c = training_config.get_config("tiny")
  assert tuple(checkpointing.run_identity(c)) == training_config.IDENTITY_FIELDS
  metadata = checkpointing.run_metadata(
      c, tokens=["<t>"], token_ids=[5], image_tokens=[], embedding_dim=4, model_path="m",
      global_batch=2, base_lr=1e-2, image_paths=["a.png"])
  assert set(training_config.CHECKPOINT_IDENTITY) <= set(metadata)
  c.enable_bucket = True
  assert checkpointing.run_identity(c)["buckets"] == [256, 1024, 64]


def test_every_field_has_a_comment():
  """Each `c.FIELD = default` in get_config has a comment on its line or just above it, or
  one that names it (a comment shared by a group of fields)."""
  fn, source = _function("get_config")
  comments = {}  # line -> comment text
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string
  in_function = " ".join(text for line, text in comments.items()
                         if fn.lineno <= line <= fn.end_lineno)
  assigned = []
  for node in fn.body:
    if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)):
      continue
    name = node.targets[0].attr
    assigned.append(name)
    own = any(line in comments for line in range(node.lineno, node.end_lineno + 1))
    above = node.lineno - 1 in comments and not comments[node.lineno - 1].startswith("# ---")
    assert own or above or name in in_function, f"config field {name} has no comment"
  assert sorted(assigned) == sorted(FIELDS)  # every field is set once


def test_every_field_is_checked_or_needs_no_check():
  fn, _ = _function("validate_config")
  named = ({n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)} |
           {n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)})
  unchecked = set(training_config.UNCHECKED)
  assert unchecked <= set(FIELDS)
  assert not unchecked & named, "a field in UNCHECKED is checked: take it off the list"
  assert [f for f in FIELDS if f not in named and f not in unchecked] == []


@pytest.mark.parametrize("variant", list(training_config.VARIANTS))
def test_variants_set_existing_fields_only(variant):
  for name in training_config.VARIANTS[variant]:
    assert name in FIELDS, f"variant {variant} sets unknown field {name}"
  assert tuple(training_config.get_config(variant).keys()) == FIELDS
  assert set(training_config.WORLD_OBJECT) <= set(FIELDS)


def test_unknown_variant_names_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown config variant 'sd3' \(known: sd15, sd21, sdxl, "
                     r"tiny, tiny_sdxl, world\)"):
    training_config.get_config("sd3")
