"""`clip_io`'s loaded CLIP holds no state of its own: features come from a program keyed by the module."""

import dataclasses

import jax
import numpy as np
import pytest

from ti_jax.evaluation import clip_io

PROMPTS = ["a photo of a cat", "an oil painting"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  return clip_io.load_clip(clip_io.TINY_CLIP, cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_a_loaded_clip_cannot_be_changed_after_loading(clip):
  clip_io.text_features(clip, PROMPTS)
  with pytest.raises(dataclasses.FrozenInstanceError):
    clip.params = {}  # pylint: disable=attribute-defined-outside-init
  # Only what load_clip read: no slot for compiled functions or other caches.
  assert [f.name for f in dataclasses.fields(clip)] == [
      "source", "path", "model", "params", "tokenizer", "preprocessing"]


def test_clips_sharing_a_module_each_use_their_own_params(clip):
  """The compiled program is shared by the module; the params stay an argument of each call."""
  images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
  before_text = clip_io.text_features(clip, PROMPTS)
  before_images = clip_io.image_features(clip, images)
  # Other params for the same module: the projections scaled and flipped per column.
  scale = np.linspace(-2.0, 2.0, 16, dtype=np.float32)
  params = jax.tree_util.tree_map(np.asarray, clip.params)
  params["text_projection"] = {"kernel": params["text_projection"]["kernel"] * scale}
  params["visual_projection"] = {"kernel": params["visual_projection"]["kernel"] * scale}
  other = dataclasses.replace(clip, params=params)
  assert other.model is clip.model
  text = clip_io.text_features(other, PROMPTS)
  got = clip_io.image_features(other, images)
  ref = lambda method, x: np.asarray(clip.model.apply({"params": params}, x, method=method))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  ids = np.asarray(clip.tokenizer(PROMPTS, padding="max_length", max_length=77,
                                  truncation=True).input_ids)
  np.testing.assert_allclose(text, unit(ref(clip.model.get_text_features, ids)), atol=1e-5)
  np.testing.assert_allclose(
      got, unit(ref(clip.model.get_image_features,
                    clip_io.preprocess_images(images, clip.preprocessing))), atol=1e-5)
  assert not np.allclose(text, before_text) and not np.allclose(got, before_images)
  # And the first CLIP still gives its own features.
  np.testing.assert_allclose(clip_io.text_features(clip, PROMPTS), before_text, atol=1e-6)
