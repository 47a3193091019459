"""The paper's result in miniature, on the shipped tiny-world model.

Textual inversion on five captioned renders of the world's held-out shape
(examples/world-cross, a cross the shipped model can draw but has no word for) learns a
word that draws it far more often than the initializer word does, and prompts that add an
attribute keep the concept and show the attribute. The same run the README's quick start makes
(`configs/object.py:world`), scored by the world's checker as `ti_jax.evaluate` scores it.
"""

import json
import os

import jax
import pytest
from conftest import world_config

from ti_jax.evaluation import evaluator
from ti_jax.training import trainer
from ti_jax.world import scenes

# One edit prompt per kind of attribute (`world_scores.OBJECT_PROMPTS` has ten): the
# editability target is the paper's claim for each kind. 32 samples a prompt: at 16 the
# same run measured editability 0.703, a single image above the target.
EDIT_PROMPTS = """\
background\ta photo of {} on a green background
colour\ta photo of a red {}
size\ta photo of a large {}
position\ta photo of {} on the left
"""
PROTOCOL = evaluator.Protocol(num_samples=32, num_inference_steps=25, guidance_scale=7.0,
                              scorer="checker")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The run directory of `configs/object.py:world` trained as the quick start trains it."""
  workdir = str(tmp_path_factory.mktemp("world_ti") / "run")
  trainer.run(world_config("object", "world"), workdir, devices=jax.local_devices()[:1],
              progress=False)
  return workdir


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("world_eval")
  prompts = tmp / "edits.txt"
  prompts.write_text(EDIT_PROMPTS, encoding="utf-8")
  return evaluator.run(workdirs=[run], protocol=PROTOCOL, prompts_file=str(prompts),
                       output_dir=str(tmp / "eval"), devices=jax.local_devices()[:1],
                       words=["object"])


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
