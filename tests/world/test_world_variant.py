"""The shipped tiny-world model and the `world` config variants that train on it."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import REPO, config_module, world_config
from PIL import Image

from ti_jax.testing import example_images
from ti_jax.training import trainer
from ti_jax.weights import loading, presets
from ti_jax.world import base_model, scenes


def test_tiny_world_is_a_shipped_model_name():
  folder = loading.resolve_model_dir("tiny-world")
  assert folder == presets.SHIPPED_MODELS["tiny-world"]
  for name in ("model_index.json", "TRAINING.md", "checker.json", "checker.safetensors",
               "unet/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json"):
    assert os.path.isfile(os.path.join(folder, name)), name
  # A few MB: it lives in the repository and the wheel.
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
  assert size < 16e6
  with open(os.path.join(folder, "unet", "config.json")) as f:
    assert json.load(f)["block_out_channels"] == base_model.model_configs(0)["unet"][
        "block_out_channels"]


def test_the_world_example_is_the_held_out_shape_and_its_templates_and_captions_are_world_words(tmp_path):
  folder = os.path.join(REPO, "examples", "world-cross")
  with open(os.path.join(folder, scenes.CONCEPT_FILE)) as f:
    assert json.load(f)["concept"] == {"shape": scenes.HELD_OUT_SHAPE}
  # The generator reproduces the shipped folder.
  written = example_images.draw_world_examples(str(tmp_path))
  assert len(written) == example_images.WORLD_EXAMPLE_COUNT
  captions = []
  for path in written:
    with Image.open(path) as fresh, Image.open(os.path.join(folder, os.path.basename(path))) as old:
      np.testing.assert_array_equal(np.asarray(fresh), np.asarray(old))
    caption = path[:-len(".png")] + scenes.CAPTION_EXTENSION
    with open(caption, encoding="utf-8") as fresh, \
        open(os.path.join(folder, os.path.basename(caption)), encoding="utf-8") as old:
      captions.append(old.read())
      assert fresh.read() == captions[-1], caption
  tok = loading.load_tokenizer(loading.resolve_model_dir("tiny-world"))
  with open(os.path.join(REPO, "examples", "world_templates.txt")) as f:
    templates = [line.strip() for line in f if line.strip()]
  assert "a photo of {}" in templates
  for template in templates + captions:
    for word in template.replace("{}", "").split():
      assert word in scenes.vocabulary(), template
      assert len(tok(word).input_ids) == 3, word  # bos, one token, eos


# ("object", "world") is checked on the run tests/world/test_world_textual_inversion.py trains.
@pytest.mark.parametrize("name,variant", [("paper", "world,two_words")])
def test_world_variants_train_on_the_shipped_model(tmp_path, name, variant):
  c = world_config(name, variant)
  assert c.pretrained_model_name_or_path == "tiny-world" and c.resolution == scenes.IMAGE_SIZE
  assert c.initializer_token == scenes.GENERIC_WORD and c.flip_p == 0.0
  assert c.caption_extension == scenes.CAPTION_EXTENSION  # examples/world-cross's captions
  c.max_train_steps = 2
  c.validation_prompt = ""  # what the run renders is not under test here
  workdir = str(tmp_path / "run")
  trainer.run(c, workdir, devices=jax.local_devices()[:1], progress=False)
  with open(os.path.join(workdir, "run.json")) as f:
    assert json.load(f)["num_vectors"] == (2 if "two_words" in variant else 1)


def test_the_world_has_no_style_variant():
  with pytest.raises(ValueError, match="learns objects only"):
    config_module("paper").get_config("world,style")
  with pytest.raises(ValueError, match="no world variant for style concepts"):
    config_module("style").get_config("world")
