"""ti_jax's Flax CLIP (for the similarity metrics) equals transformers' PyTorch CLIPModel.

A random-weight transformers `CLIPModel` is saved with `save_pretrained`,
beside the tiny tokenizer and a `CLIPImageProcessor` config, and loaded with
`ti_jax.evaluation.clip_io.load_clip`, so these tests prove the loader too. Features
must match to 1e-4 relative (max |a-b| / max |ref|) in fp32.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from conftest import record_parity
from torch_reference import perturb_, rel_err
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel as HFCLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from ti_jax.evaluation import clip_io
from ti_jax.models.clip_text import LEGACY_EOS_TOKEN_ID, eos_positions
from ti_jax.weights import convert
from ti_jax.weights.loading import ModelLoadError
from ti_jax.weights.tiny_tokenizer import write_tiny_clip_tokenizer

TOLERANCE = 1e-4
PROMPTS = ["a painting in the style of a cat", "a photo of a red toy",
           "a dog", "a cropped photo of the small weird toy robot on a wooden table"]
IMAGE_SIZE = 32


def _hf_config(vocab_size: int) -> HFCLIPConfig:
  # Differs from the tiny CLIP (3 layers, gelu text tower, 48-wide vision) so
  # that a test cannot pass by reading the wrong sizes from somewhere.
  text = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 48,
          "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77,
          "hidden_act": "gelu", "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
          "pad_token_id": vocab_size - 1}
  vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": 8,
            "hidden_act": "quick_gelu"}
  return HFCLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
  """(torch CLIPModel, folder holding it, the tokenizer and the image processor config)."""
  folder = tmp_path_factory.mktemp("clip") / "model"
  vocab = write_tiny_clip_tokenizer(str(folder))
  torch.manual_seed(0)
  model = perturb_(HFCLIPModel(_hf_config(vocab)), seed=1)
  model.save_pretrained(str(folder), safe_serialization=True)
  CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                        ).save_pretrained(str(folder))
  return model, str(folder)


@pytest.fixture(scope="module")
def loaded_clip(saved_clip):
  return clip_io.load_clip(saved_clip[1])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
  """`load_clip("tiny-clip")` written into a fresh cache dir."""
  return clip_io.load_clip(clip_io.TINY_CLIP, cache_dir=str(tmp_path_factory.mktemp("cache")))


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _random_images(seed, sizes):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _torch_image_features(model, pixels_nhwc):
  with torch.no_grad():
    return model.get_image_features(
        torch.from_numpy(np.ascontiguousarray(pixels_nhwc.transpose(0, 3, 1, 2)))
    ).pooler_output.numpy()


def _torch_text_features(model, ids):
  with torch.no_grad():
    return model.get_text_features(torch.from_numpy(np.asarray(ids, np.int64))).pooler_output.numpy()


def test_image_features_match_transformers(saved_clip, loaded_clip):
  model, _ = saved_clip
  clip = loaded_clip
  pixels = np.random.default_rng(0).standard_normal((3, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  out = clip.model.apply({"params": clip.params}, pixels, method=clip.model.get_image_features)
  record_parity("clip image features float32", rel_err(out, _torch_image_features(model, pixels)),
                TOLERANCE)


def test_text_features_match_transformers(saved_clip, loaded_clip):
  model, _ = saved_clip
  clip = loaded_clip
  ids = clip.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                       return_tensors="np").input_ids
  out = clip.model.apply({"params": clip.params}, ids, method=clip.model.get_text_features)
  record_parity("clip text features float32", rel_err(out, _torch_text_features(model, ids)),
                TOLERANCE)


def test_normalized_features_from_uint8_images_and_prompts_match_transformers(saved_clip, loaded_clip):
  """The convenience path: preprocessing, batching in chunks (with a padded last chunk), L2 norm."""
  model, folder = saved_clip
  clip = loaded_clip
  images = _random_images(1, [(40, 57), (61, 33), (32, 32), (25, 70), (48, 48)])
  ref_pixels = CLIPImageProcessorPil.from_pretrained(folder)(
      images=images, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
  got = clip_io.image_features(clip, images, batch_size=2)
  assert got.dtype == np.float32 and got.shape == (5, 24)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-6)
  record_parity("clip normalized image features (uint8 in) float32",
                rel_err(got, _unit(_torch_image_features(model, ref_pixels))), TOLERANCE)

  got = clip_io.text_features(clip, PROMPTS, batch_size=3)
  ids = clip.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                       return_tensors="np").input_ids
  record_parity("clip normalized text features float32",
                rel_err(got, _unit(_torch_text_features(model, ids))), TOLERANCE)


def test_loader_reads_config_fields(saved_clip, loaded_clip):
  model, _ = saved_clip
  cfg = loaded_clip.model.config
  assert cfg.eos_token_id == model.config.text_config.eos_token_id != LEGACY_EOS_TOKEN_ID
  assert (cfg.text.hidden_act, cfg.text.num_hidden_layers, cfg.vision.hidden_size,
          cfg.projection_dim) == ("gelu", 3, 48, 24)
  assert loaded_clip.preprocessing.size == IMAGE_SIZE
  assert loaded_clip.preprocessing.crop_size == (IMAGE_SIZE, IMAGE_SIZE)
  np.testing.assert_allclose(float(loaded_clip.params["logit_scale"]), model.logit_scale.item(),
                             rtol=1e-7)


@pytest.mark.parametrize("eos_token_id", [LEGACY_EOS_TOKEN_ID, 300])
def test_pooled_eos_position_follows_transformers_rule(saved_clip, loaded_clip, eos_token_id):
  """Legacy configs (eos 2) pool at the largest id, others at the first eos."""
  model, _ = saved_clip
  clip = loaded_clip
  vocab = clip.model.config.text.vocab_size
  rng = np.random.default_rng(3)
  ids = rng.integers(3, vocab, (3, 77))
  ids[ids == 300] = 301
  first_eos = np.array([6, 30, 76])
  ids[np.arange(3), first_eos] = eos_token_id
  ids[np.arange(3), np.minimum(first_eos + 3, 76)] = eos_token_id  # a later eos, as padding gives
  other = 300 if eos_token_id == LEGACY_EOS_TOKEN_ID else LEGACY_EOS_TOKEN_ID
  # Guard: with these ids the two rules disagree in every row, so the test can tell them apart.
  assert (np.asarray(eos_positions(ids, eos_token_id)) != np.asarray(eos_positions(ids, other))).all()

  flax_model = clip.model.clone(
      config=dataclasses.replace(clip.model.config, eos_token_id=eos_token_id))
  out = flax_model.apply({"params": clip.params}, ids, method=flax_model.get_text_features)
  saved = model.text_model.eos_token_id
  model.text_model.eos_token_id = eos_token_id
  try:
    ref = _torch_text_features(model, ids)
  finally:
    model.text_model.eos_token_id = saved
  record_parity(f"clip text features, eos_token_id={eos_token_id}", rel_err(out, ref), TOLERANCE)


@pytest.mark.parametrize("size,crop", [(32, 32), (36, 28), (224, 224)])
def test_preprocessing_matches_clip_image_processor(size, crop):
  # Non-square sizes in both orientations, odd sizes (crop offsets), and images
  # smaller than the output (upsampling).
  images = _random_images(2, [(37, 53), (64, 41), (20, 29), (225, 300), (31, 31)])
  settings = clip_io.ImagePreprocessing(size=size, crop_size=(crop, crop))
  processor = CLIPImageProcessorPil(size={"shortest_edge": size},
                                    crop_size={"height": crop, "width": crop})
  ref = processor(images=images, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
  got = clip_io.preprocess_images(images, settings)
  assert got.dtype == np.float32 and got.shape == (5, crop, crop, 3)
  # Same uint8 PIL resize and the same float32 arithmetic: bit-exact.
  assert np.abs(got - ref).max() == 0.0
  # A stacked [N, H, W, 3] array gives the same as a list.
  same = _random_images(4, [(40, 50)] * 2)
  np.testing.assert_array_equal(clip_io.preprocess_images(np.stack(same), settings),
                                clip_io.preprocess_images(same, settings))


def test_preprocessing_settings_round_trip_through_transformers(tmp_path):
  settings = clip_io.ImagePreprocessing(size=40, crop_size=(36, 36), mean=(0.5, 0.4, 0.3),
                                        std=(0.2, 0.25, 0.3))
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(settings.to_transformers()))
  processor = CLIPImageProcessorPil.from_pretrained(str(tmp_path))
  images = _random_images(5, [(50, 70)])
  np.testing.assert_array_equal(
      clip_io.preprocess_images(images, settings),
      processor(images=images, return_tensors="np").pixel_values.transpose(0, 2, 3, 1))
  assert clip_io.ImagePreprocessing.from_transformers(settings.to_transformers(), 36) == settings


# Architecture fields of openai/clip-vit-base-patch32's config.json and its
# preprocessor_config.json (legacy integer sizes), as published on the hub.
VIT_B32_CONFIG = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 512,
    "logit_scale_init_value": 2.6592, "text_config_dict": None, "vision_config_dict": None,
    "text_config": {
        "architectures": None, "model_type": "clip_text_model", "vocab_size": 49408,
        "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
        "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "projection_dim": 512},
    "vision_config": {
        "architectures": None, "model_type": "clip_vision_model", "hidden_size": 768,
        "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "image_size": 224, "patch_size": 32, "num_channels": 3, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05, "projection_dim": 512},
}
VIT_B32_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "resample": 3, "size": 224,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def test_vit_b32_checkpoint_layout_converts_key_for_key():
  """Every key and shape of transformers' ViT-B/32 CLIPModel maps onto the Flax tree (no memory)."""
  from ti_jax.models.clip import CLIPConfig, CLIPModel
  config = CLIPConfig.from_transformers(VIT_B32_CONFIG)
  assert config.eos_token_id == LEGACY_EOS_TOKEN_ID  # this checkpoint pools at the largest id
  hf_cfg = HFCLIPConfig(**{k: v for k, v in VIT_B32_CONFIG.items() if not k.endswith("_dict")})
  with torch.device("meta"):
    hf_model = HFCLIPModel(hf_cfg)
  # Older saves of this checkpoint also hold the position_ids buffers; they are skipped.
  shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
  shapes["vision_model.embeddings.position_ids"] = (1, 50)
  flax_shapes = clip_io.param_shapes(CLIPModel(config))
  # The scalar logit_scale goes around convert (see clip_io.torch_state_dict_to_params).
  assert shapes.pop("logit_scale") == flax_shapes.pop("logit_scale").shape == ()
  plan = convert.plan_conversion(clip_io.CLIP_SPEC, shapes, flax_shapes)
  assert len(plan.entries) == len(shapes) - 1  # all but position_ids
  assert clip_io.ImagePreprocessing.from_transformers(VIT_B32_PREPROCESSOR, 224) == (
      clip_io.ImagePreprocessing())


def test_tiny_clip_loads_in_transformers_with_equal_features(tiny_clip):
  model, info = HFCLIPModel.from_pretrained(tiny_clip.path, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  model.eval()
  images = _random_images(6, [(48, 64), (32, 40)])
  ref_pixels = CLIPImageProcessorPil.from_pretrained(tiny_clip.path)(
      images=images, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
  record_parity("tiny-clip normalized image features float32",
                rel_err(clip_io.image_features(tiny_clip, images),
                        _unit(_torch_image_features(model, ref_pixels))), TOLERANCE)
  ids = tiny_clip.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                            return_tensors="np").input_ids
  record_parity("tiny-clip normalized text features float32",
                rel_err(clip_io.text_features(tiny_clip, PROMPTS),
                        _unit(_torch_text_features(model, ids))), TOLERANCE)


def test_tiny_clip_is_written_once_and_reused(tmp_path):
  first = clip_io.ensure_tiny_clip(str(tmp_path / "tiny-clip"))
  weights = tmp_path / "tiny-clip" / "model.safetensors"
  stamp = weights.stat().st_mtime_ns
  assert clip_io.ensure_tiny_clip(str(tmp_path / "tiny-clip")) == first
  assert weights.stat().st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == ["tiny-clip"]  # no temporary folder left behind


def _load_error(name):
  with pytest.raises(ModelLoadError) as err:
    clip_io.load_clip(str(name))
  msg = str(err.value)
  assert "\n" not in msg, msg
  return msg


def _edited_copy(tiny_clip, tmp_path, edit=None, remove=None):
  folder = tmp_path / "model"
  shutil.copytree(tiny_clip.path, folder)
  if edit:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
  if remove:
    (folder / remove).unlink()
  return folder


def test_missing_folder_is_a_one_line_error(tmp_path):
  msg = _load_error(tmp_path / "nope")
  assert "CLIP model folder not found" in msg and "nope" in msg


def test_unreachable_hub_id_is_a_one_line_error():
  # The test session is offline (HF_HUB_OFFLINE=1 in conftest) and this id is not cached.
  msg = _load_error("ti-jax-tests/no-such-clip-model")
  assert "cannot fetch CLIP model 'ti-jax-tests/no-such-clip-model'" in msg


def test_shape_mismatch_is_a_one_line_error(tiny_clip, tmp_path):
  folder = _edited_copy(tiny_clip, tmp_path,
                        edit=lambda c: c["vision_config"].update(hidden_size=64))
  msg = _load_error(folder)
  assert "shape mismatch" in msg and "vision_model." in msg


@pytest.mark.parametrize("remove,needle", [
    ("model.safetensors", "no CLIP weights"),
    ("config.json", "missing CLIP config"),
    ("vocab.json", "missing CLIP tokenizer files"),
])
def test_missing_file_is_a_one_line_error(tiny_clip, tmp_path, remove, needle):
  assert needle in _load_error(_edited_copy(tiny_clip, tmp_path, remove=remove))


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(model_type="siglip"), "model_type 'siglip' is not supported"),
    (lambda c: c["vision_config"].update(hidden_act="relu6"), "hidden_act='relu6' is not supported"),
    (lambda c: c["vision_config"].update(num_attention_heads=5), "not divisible"),
    (lambda c: c["vision_config"].update(image_size=64), "does not match"),
])
def test_bad_config_is_a_one_line_error(tiny_clip, tmp_path, edit, needle):
  assert needle in _load_error(_edited_copy(tiny_clip, tmp_path, edit=edit))


def test_pickle_weights_load_only_when_allowed(saved_clip, loaded_clip, tmp_path):
  """A CLIP folder with only pytorch_model.bin: refused by default, equal params with allow_pickle."""
  model, folder = saved_clip
  copy = tmp_path / "bin"
  shutil.copytree(folder, copy)
  os.remove(copy / "model.safetensors")
  torch.save(model.state_dict(), str(copy / "pytorch_model.bin"))
  with pytest.raises(ModelLoadError, match="allow_pickle") as e:
    clip_io.load_clip(str(copy))
  assert "\n" not in str(e.value)
  from_pickle = clip_io.load_clip(str(copy), allow_pickle=True)
  for a, b in zip(jax.tree_util.tree_leaves(from_pickle.params),
                  jax.tree_util.tree_leaves(loaded_clip.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
