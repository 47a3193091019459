"""The paper's result in miniature, on the shipped tiny-world model.

Textual inversion on five captioned renders of the world's held-out shape
(examples/world-cross, a cross the shipped model can draw but has no word for) learns a
word that draws it far more often than the initializer word does, and prompts that add an
attribute keep the concept and show the attribute. The same run the README's quick start makes
(`configs/object.py:world`), scored by the world's checker as `ti_jax.evaluate` scores it.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, world_config, xla_flags

from ti_jax.world import scenes

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "world_quick_start.py")


@pytest.fixture(scope="module")
def run_and_report(tmp_path_factory):
  """(run directory, report) of `configs/object.py:world` trained as the quick start trains it
  and scored by the world's checker (`world_quick_start.py`: `PROTOCOL`, `EDIT_PROMPTS`), in a
  process at XLA's default optimisation level, as users run it."""
  tmp = tmp_path_factory.mktemp("world_ti")
  workdir, eval_dir = tmp / "run", tmp / "eval"
  env = dict(os.environ, XLA_FLAGS=xla_flags(1, optimized=True),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run([sys.executable, SCRIPT, str(workdir), str(eval_dir)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(eval_dir / "report.json", encoding="utf-8") as f:
    return str(workdir), json.load(f)


@pytest.fixture(scope="module")
def run(run_and_report):
  return run_and_report[0]


@pytest.fixture(scope="module")
def report(run_and_report):
  return run_and_report[1]


def test_the_learned_word_draws_the_held_out_shape_far_more_often_than_the_initializer(report):
  # The paper's result at issue 17's targets (>= 0.8 against <= 0.3). Measured (32 samples,
  # guidance 7): 0.91 against 0.16.
  by_label = {r["label"]: r for r in report["runs"]}
  learned, word = by_label["run"], by_label["word: object"]
  assert word["reconstruction"] <= 0.3, word
  assert learned["reconstruction"] >= 0.8, learned
  assert learned["reconstruction"] >= word["reconstruction"] + 0.25, (learned, word)


def test_prompts_that_add_an_attribute_show_the_concept_and_the_attribute_in_most_samples(report):
  # Target of issue 17: >= 0.7. Measured: 0.73 against 0.09 for "object".
  by_label = {r["label"]: r for r in report["runs"]}
  learned, word = by_label["run"], by_label["word: object"]
  assert learned["editability"] >= 0.7, json.dumps(learned, indent=1)
  assert learned["editability"] >= 2 * word["editability"], (learned, word)


def test_the_object_world_variant_trains_on_the_shipped_model(run):
  # tests/world/test_world_variant.py checks the other world variants the same way (2 steps).
  c = world_config("object", "world")
  assert c.pretrained_model_name_or_path == "tiny-world" and c.resolution == scenes.IMAGE_SIZE
  assert c.initializer_token == scenes.GENERIC_WORD and c.flip_p == 0.0
  assert c.caption_extension == scenes.CAPTION_EXTENSION  # examples/world-cross's captions
  with open(os.path.join(run, "run.json")) as f:
    assert json.load(f)["num_vectors"] == 1
