"""validation_prompts: several prompts (a tuple or a file), a grid per prompt, a fixed seed."""

import os
import re

import jax
import numpy as np
import pytest
from conftest import REPO, config_module, model_stub, offline_config
from PIL import Image

from ti_jax.training import trainer, validation
from ti_jax.training import config as training_config

TOY = os.path.join(REPO, "examples", "toy")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def _config(cache_dir, **overrides):
  return offline_config(config_module("object").get_config("tiny"), cache_dir, **{
      "train_data_dir": TOY, "placeholder_token": "<toy>", "max_train_steps": 2,
      "checkpointing_steps": 2, "log_every_steps": 1, **overrides})


def test_prompts_from_a_tuple_and_from_a_file_after_validation_prompt(tmp_path):
  assert validation.validation_prompts(_config(tmp_path, validation_prompts=("a {}", "b"))) == [
      "a {}", "b"]
  f = tmp_path / "prompts.txt"
  f.write_text("a photo of {}\n\n  {} on a beach  \n", encoding="utf-8")
  c = _config(tmp_path, validation_prompt="a {} toy", validation_prompts=str(f))
  assert validation.validation_prompts(c) == ["a {} toy", "a photo of {}", "{} on a beach"]
  assert validation.enabled(c)
  assert not validation.enabled(_config(tmp_path))
  made = validation.make(c, model_stub(), [[5]], [], str(tmp_path / "w"), {})
  assert made.grids and made.prompts == ["a {} toy", "a photo of {}", "{} on a beach"]
  # validation_prompt alone keeps its one PNG per image.
  assert not validation.make(_config(tmp_path, validation_prompt="a {}"), model_stub(), [[5]], [],
                             "w", {}).grids
  assert validation.prompt(c, 1, "{} on a beach") == "<toy> on a beach"


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist (a string names a file of prompts"),
    ("dir", "is a folder"),
    (b"\n  \n", "holds no prompt"),
    (b"\xff\xfe a {}", "is not UTF-8 text"),
    (b"a {}\0", "is a binary file"),
])
def test_a_bad_prompts_file_is_refused_at_start_up_in_one_line(tmp_path, content, needle):
  path = tmp_path / "prompts.txt"
  if content == "dir":
    path.mkdir()
  elif content is not None:
    path.write_bytes(content)
  with pytest.raises(validation.ValidationPromptError, match=re.escape(needle)) as e:
    training_config.validate_config(_config(tmp_path, validation_prompts=str(path)))
  assert "\n" not in str(e.value) and str(e.value).startswith("config.validation_prompts")


@pytest.mark.parametrize("prompts", [("a {}", ""), ("a {}", 3)])
def test_an_empty_or_non_string_prompt_is_refused(tmp_path, prompts):
  with pytest.raises(validation.ValidationPromptError, match=r"validation_prompts\[1\]"):
    training_config.validate_config(_config(tmp_path, validation_prompts=prompts))


def test_two_prompts_give_two_grids_per_validation_step_with_the_seed_fixed(tmp_path, cache_dir):
  """A run whose vectors cannot move (lr 1e-30 is below float32's resolution of them): the grid
  of a prompt at step 1 equals its grid at step 2, as each image i starts from noise (seed, i)."""
  workdir = tmp_path / "run"
  c = _config(cache_dir, validation_prompts=("a photo of {}", "a {} on a beach"),
              validation_steps=1, num_validation_images=3, validation_inference_steps=2,
              learning_rate=1e-30, scale_lr=False, seed=7)
  trainer.run(c, str(workdir), devices=jax.local_devices()[:1], progress=False)
  assert sorted(os.listdir(workdir / "validation")) == [
      "step000001_p0.png", "step000001_p1.png", "step000002_p0.png", "step000002_p1.png"]
  grids = {}
  for name in os.listdir(workdir / "validation"):
    png = Image.open(workdir / "validation" / name)
    step, k = name[4:10], name[12]
    assert png.text == {"prompt": c.validation_prompts[int(k)].replace("{}", "<toy>"),
                        "step": str(int(step)), "seed": "7"}
    grids[step, k] = np.asarray(png)
  assert grids["000001", "0"].shape == (128, 128, 3)  # 3 images of 64 px on a 2x2 grid
  for k in ("0", "1"):
    np.testing.assert_array_equal(grids["000001", k], grids["000002", k])
  assert not np.array_equal(grids["000001", "0"], grids["000001", "1"])  # the prompts differ
