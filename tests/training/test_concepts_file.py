"""The concepts file of a many-concept run: parsing, every refusal in one line, concept_config."""

import json
import os

import pytest
from conftest import REPO, config_module

from ti_jax import errors
from ti_jax.runtime import run_dir
from ti_jax.training import concepts_file

TOY = os.path.join(REPO, "examples", "toy")
STYLE = os.path.join(REPO, "examples", "style")


@pytest.fixture(name="config")
def _config():
  return config_module("object").get_config("tiny")


def _write(tmp_path, *lines) -> str:
  path = tmp_path / "concepts.jsonl"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path)


def test_reads_concepts_in_order_with_the_runs_defaults(tmp_path, config):
  path = _write(tmp_path, "# two concepts", "",
                f'{{"placeholder_token": "<cat-toy>", "train_data_dir": "{TOY}"}}',
                "   ",
                f'{{"placeholder_token": "<My.Style!>", "train_data_dir": "{STYLE}", '
                '"learnable_property": "style", "initializer_token": "painting", '
                '"learning_rate": 1e-3, "seed": 7, "caption_extension": ".txt"}')
  before = config.to_json()
  a, b = concepts_file.read_concepts_file(path, config)
  assert config.to_json() == before  # the run's config is left as it was
  assert (a.name, a.placeholder_token, a.train_data_dir, a.line) == ("cat-toy", "<cat-toy>", TOY, 3)
  assert (a.initializer_token, a.learnable_property, a.learning_rate, a.seed) == (
      config.initializer_token, config.learnable_property, config.learning_rate, config.seed)
  assert (a.caption_extension, a.init_embedding) == (config.caption_extension, config.init_embedding)
  assert (b.name, b.line, b.learnable_property, b.initializer_token) == ("My.Style_", 5, "style",
                                                                          "painting")
  assert (b.learning_rate, b.seed, b.caption_extension) == (1e-3, 7, ".txt")
  assert b.record() == {"name": "My.Style_", "placeholder_token": "<My.Style!>",
                        "train_data_dir": STYLE, "initializer_token": "painting",
                        "learnable_property": "style", "caption_extension": ".txt",
                        "init_embedding": config.init_embedding, "learning_rate": 1e-3,
                        "seed": 7}
  assert b.checkpoint_record() == {**b.record(), "train_data_path": os.path.abspath(STYLE)}


def test_concept_config_overrides_exactly_the_concepts_fields(tmp_path, config):
  path = _write(tmp_path, f'{{"placeholder_token": "<pot>", "train_data_dir": "{STYLE}", '
                '"learning_rate": 0.25, "seed": 3, "learnable_property": "style"}')
  spec, = concepts_file.read_concepts_file(path, config)
  alone = concepts_file.concept_config(config, spec)
  assert alone is not config and config.placeholder_token != "<pot>"
  changed = {k for k in config.keys() if alone[k] != config[k]}
  assert changed == {"placeholder_token", "train_data_dir", "learning_rate", "seed",
                     "learnable_property"}
  assert (alone.placeholder_token, alone.train_data_dir, alone.learning_rate, alone.seed) == (
      "<pot>", STYLE, 0.25, 3)
  assert set(alone.keys()) == set(config.keys())


@pytest.mark.parametrize("token, name", [("<cat-toy>", "cat-toy"), ("sks", "sks"),
                                         ("<a/b>", "a_b"), ("<.x.>", "x"), ("<>", "embedding")])
def test_concept_name_is_file_system_safe(token, name):
  assert concepts_file.concept_name(token) == name


def _line(**values) -> str:
  return json.dumps({"placeholder_token": "<a>", "train_data_dir": TOY, **values})


@pytest.mark.parametrize("lines, line, needle", [
    (["not json"], 1, "not JSON"),
    (["# c", "[1, 2]"], 2, "a JSON list, not an object"),
    ([_line(), '{"placeholder_token": "<b>"}'], 2, "missing 'train_data_dir'"),
    (['{"train_data_dir": "x"}'], 1, "missing 'placeholder_token'"),
    ([_line(resolution=64)], 1, "unknown key 'resolution' (known: placeholder_token"),
    ([_line(learning_rate="fast")], 1, "learning_rate must be a number"),
    ([_line(learning_rate=-1)], 1, "learning_rate must be a finite number > 0"),
    ([_line(learning_rate=True)], 1, "learning_rate must be a number"),
    ([_line(seed=1.5)], 1, "seed must be an integer"),
    ([_line(seed=2**32)], 1, "seed must be >= 0 and < 2**32"),
    ([_line(placeholder_token=7)], 1, "placeholder_token must be a string"),
    ([_line(placeholder_token="<a b>")], 1, "one word without spaces"),
    ([_line(train_data_dir="")], 1, "train_data_dir must not be empty"),
    ([_line(learnable_property="person")], 1, "'object' or 'style'"),
    ([_line(caption_extension="txt")], 1, "start with a dot"),
    ([_line(initializer_token="  ")], 1, "initializer_token must not be empty"),
    (["", _line(), "", _line()], 4, "'<a>' is also on line 2"),
    ([_line(), _line(placeholder_token="<A>")], 2, "would share the concept folder 'A'"),
    ([_line(placeholder_token="<checkpoints>")], 1, "the run directory uses itself"),
    ([_line(placeholder_token="all")], 1, "the run directory uses itself"),
    ([_line(train_data_dir="no/such/folder")], 1, "no/such/folder does not exist (a relative"),
    ([_line(train_data_dir=os.path.join(TOY, os.listdir(TOY)[0]))], 1, "is not a folder"),
])
def test_every_bad_line_is_one_line_naming_file_and_line(tmp_path, config, lines, line, needle):
  path = _write(tmp_path, *lines)
  with pytest.raises(concepts_file.ConceptsFileError) as e:
    concepts_file.read_concepts_file(path, config)
  message = str(e.value)
  assert isinstance(e.value, errors.UserError) and "\n" not in message
  assert message.startswith(f"{path} line {line}: ") and needle in message, message
  assert sorted(os.listdir(tmp_path)) == ["concepts.jsonl"]  # nothing written


def test_the_runs_empty_initializer_is_refused_on_a_line_that_does_not_set_one(tmp_path, config):
  config.initializer_token = ""
  with pytest.raises(concepts_file.ConceptsFileError, match=r"line 1: initializer_token must "
                     r"not be empty \(set it on the line"):
    concepts_file.read_concepts_file(_write(tmp_path, _line()), config)
  spec, = concepts_file.read_concepts_file(_write(tmp_path, _line(initializer_token="toy")), config)
  assert spec.initializer_token == "toy"


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"), ("", "holds no concept"), ("# only\n\n", "holds no concept"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_missing_empty_and_undecodable_files_are_one_line(tmp_path, config, content, needle):
  path = tmp_path / "c.jsonl"
  if content is not None:
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
  with pytest.raises(concepts_file.ConceptsFileError, match=needle) as e:
    concepts_file.read_concepts_file(str(path), config)
  assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_folder_names_and_fields_agree_with_the_run_directory_format():
  assert concepts_file.REQUIRED + concepts_file.OPTIONAL == run_dir.CONCEPT_FIELDS
  assert issubclass(concepts_file.ConceptsFileError, errors.UserError)
