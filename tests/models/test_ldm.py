"""The paper's LDM-1.4B layout: Flax LDMBert equals diffusers' PyTorch LDMBertModel, and loads.

A random-weight diffusers `LDMTextToImagePipeline` (unet, vqvae, bert, BERT
tokenizer) is saved with `save_pretrained` and loaded by
`ti_jax.weights.loading.load_stable_diffusion`, so these tests also prove the
folder mapping (vqvae -> vae, bert -> text encoder) and the tokenizer.
"""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import record_parity
from torch_reference import perturb_, rel_err

from ti_jax.models.ldm_bert import LDMBertModel
from ti_jax.weights import presets, tiny_models
from ti_jax.weights.loading import ModelLoadError, load_stable_diffusion
from ti_jax.weights.tiny_tokenizer import write_tiny_bert_tokenizer

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
PROMPTS = ["a painting in the style of a cat", "a photo of a red toy", ""]


@pytest.fixture(scope="module")
def saved_ldm(tmp_path_factory):
  """(torch LDMTextToImagePipeline, folder it was saved to)."""
  from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    LDMTextToImagePipeline,
    UNet2DConditionModel,
  )
  from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
    LDMBertConfig,
  )
  from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
    LDMBertModel as TorchBert,
  )
  from transformers import BertTokenizer
  tmp = tmp_path_factory.mktemp("ldm")
  vocab = write_tiny_bert_tokenizer(str(tmp / "tok"))
  configs = presets.preset("tiny-ldm")
  configs["text_encoder"]["vocab_size"] = vocab
  configs["text_encoder"]["encoder_layers"] = 3
  torch.manual_seed(0)
  bert_cfg = {k: v for k, v in configs["text_encoder"].items()
              if k not in ("architectures", "model_type")}
  pipe = LDMTextToImagePipeline(
      vqvae=perturb_(AutoencoderKL(**configs["vae"]), 1),
      bert=perturb_(TorchBert(LDMBertConfig(**bert_cfg)), 2),
      tokenizer=BertTokenizer.from_pretrained(str(tmp / "tok")),
      unet=perturb_(UNet2DConditionModel(**configs["unet"]), 3),
      scheduler=DDIMScheduler.from_config(configs["scheduler"]))
  pipe.save_pretrained(str(tmp / "model"), safe_serialization=True)
  return pipe, str(tmp / "model")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ldm_bert_output_matches_diffusers(saved_ldm, dtype):
  pipe, folder = saved_ldm
  sd = load_stable_diffusion(folder, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
  assert isinstance(sd.text_encoder, LDMBertModel)
  ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                       return_tensors="np").input_ids  # [3, 77], as the pipeline tokenizes
  ours_ids = sd.tokenizer(PROMPTS, padding="max_length", max_length=sd.tokenizer.model_max_length,
                          truncation=True, return_tensors="np").input_ids
  np.testing.assert_array_equal(ours_ids, ids)
  with torch.no_grad():
    ref = pipe.bert(torch.from_numpy(ids))[0].numpy()
  out = np.asarray(sd.text_encoder.apply({"params": sd.text_encoder_params}, ids)
                   .astype(jnp.float32))
  record_parity(f"tiny-ldm LDMBert {dtype}", rel_err(out, ref), TOLERANCE[dtype])


def test_ldm_vqvae_folder_loads_as_the_vae(saved_ldm):
  pipe, folder = saved_ldm
  sd = load_stable_diffusion(folder)
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    ref = pipe.vqvae.decode(torch.from_numpy(latents)).sample.numpy()
  out = sd.vae.apply({"params": sd.vae_params}, latents.transpose(0, 2, 3, 1),
                     method=sd.vae.decode)
  record_parity("tiny-ldm vqvae decode float32",
                rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref), TOLERANCE["float32"])


def test_bert_tokenizer_is_capped_at_the_encoders_77_positions(saved_ldm, tmp_path):
  _, folder = saved_ldm
  copy = str(tmp_path / "model")
  shutil.copytree(folder, copy)
  cfg_path = os.path.join(copy, "tokenizer", "tokenizer_config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  cfg["model_max_length"] = 512  # what bert-base-uncased's tokenizer declares
  with open(cfg_path, "w") as f:
    json.dump(cfg, f)
  assert load_stable_diffusion(copy).tokenizer.model_max_length == 77


def test_tiny_ldm_writer_loads_in_diffusers_without_missing_keys(tmp_path):
  """The written bert/ folder is complete for diffusers and gives ti_jax's LDMBert output."""
  from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
    LDMBertModel as TorchBert,
  )
  folder = tiny_models.write_tiny_model(str(tmp_path / "tiny-ldm"), "tiny-ldm")
  bert, info = TorchBert.from_pretrained(os.path.join(folder, "bert"), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  sd = load_stable_diffusion(folder)
  ids = sd.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                     return_tensors="np").input_ids  # [3, 77]
  with torch.no_grad():
    ref = bert.eval()(torch.from_numpy(ids))[0].numpy()
  out = sd.text_encoder.apply({"params": sd.text_encoder_params}, ids)
  record_parity("tiny-ldm writer: LDMBert, diffusers vs ti_jax load", rel_err(out, ref),
                TOLERANCE["float32"])


def _edit_model_index(folder, tmp_path, **changes):
  copy = str(tmp_path / "edited")
  shutil.copytree(folder, copy)
  path = os.path.join(copy, "model_index.json")
  with open(path) as f:
    index = json.load(f)
  index.update(changes)
  with open(path, "w") as f:
    json.dump(index, f)
  with pytest.raises(ModelLoadError) as e:
    load_stable_diffusion(copy)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_vq_autoencoder_and_unknown_pipelines_are_refused_in_one_line(saved_ldm, tmp_path):
  _, folder = saved_ldm
  msg = _edit_model_index(folder, tmp_path, vqvae=["diffusers", "VQModel"])
  assert "VQModel" in msg and "AutoencoderKL" in msg
  shutil.rmtree(tmp_path / "edited")
  msg = _edit_model_index(folder, tmp_path, _class_name="KandinskyPipeline")
  assert "KandinskyPipeline" in msg
