"""The tiny model writer: its folders load in diffusers' PyTorch pipeline and in ti_jax alike."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import record_parity
from torch_reference import rel_err

from ti_jax.weights import tiny_models
from ti_jax.weights.loading import load_stable_diffusion


@pytest.mark.parametrize("preset", ["tiny_sd15", "tiny_sd21"])
def test_diffusers_pipeline_loads_tiny_folder_without_missing_keys(preset, request):
  from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
  from transformers import CLIPTextModel
  folder = request.getfixturevalue(preset)
  for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"),
                   (CLIPTextModel, "text_encoder")):
    _, info = cls.from_pretrained(folder, subfolder=sub, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (sub, info)
  pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
  images = pipe("a painting of a cat", num_inference_steps=2, height=64, width=64,
                output_type="np").images
  assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("preset", ["tiny_sd15", "tiny_sd21"])
def test_tiny_folder_gives_same_outputs_in_diffusers_and_ti_jax(preset, request):
  from diffusers import StableDiffusionPipeline
  folder = request.getfixturevalue(preset)
  pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
  sd = load_stable_diffusion(folder)
  ids = sd.tokenizer(["a photo of a toy"], padding="max_length", max_length=77,
                     return_tensors="np").input_ids
  assert (ids == pipe.tokenizer(["a photo of a toy"], padding="max_length", max_length=77,
                                return_tensors="np").input_ids).all()
  latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    context = pipe.text_encoder(torch.from_numpy(ids)).last_hidden_state
    ref = pipe.unet(torch.from_numpy(latents), torch.tensor([500]), context).sample.numpy()
  ours_context = sd.text_encoder.apply({"params": sd.text_encoder_params}, ids)
  ours = sd.unet.apply({"params": sd.unet_params}, latents.transpose(0, 2, 3, 1),
                       np.array([500]), ours_context)
  record_parity(f"{preset} writer: text encoder, diffusers vs ti_jax load",
                rel_err(ours_context, context.numpy()), 1e-4)
  record_parity(f"{preset} writer: unet, diffusers vs ti_jax load",
                rel_err(np.asarray(ours).transpose(0, 3, 1, 2), ref), 1e-4)


def test_diffusers_sdxl_pipeline_loads_tiny_sdxl_folder_without_missing_keys(tiny_sdxl):
  from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
  from transformers import CLIPTextModel, CLIPTextModelWithProjection
  for cls, sub in ((UNet2DConditionModel, "unet"), (AutoencoderKL, "vae"),
                   (CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")):
    _, info = cls.from_pretrained(tiny_sdxl, subfolder=sub, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (sub, info)
  pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
  images = pipe("a painting of a cat", num_inference_steps=2, height=64, width=64,
                output_type="np").images
  assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_tiny_sdxl_folder_gives_same_outputs_in_diffusers_and_ti_jax(tiny_sdxl):
  """The pipeline's own conditioning (encode_prompt, time ids) into its UNet, vs ti_jax's."""
  from diffusers import StableDiffusionXLPipeline

  from ti_jax.models import sdxl
  pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
  sd = load_stable_diffusion(tiny_sdxl)
  assert sd.family == "sdxl"
  prompt = ["a photo of a toy"]
  with torch.no_grad():
    context, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu",
                                               do_classifier_free_guidance=False)
    ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,  # pylint: disable=protected-access
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref = pipe.unet(torch.from_numpy(latents), torch.tensor([500]), context,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample.numpy()
  tok = lambda t: t(prompt, padding="max_length", max_length=77, return_tensors="np").input_ids
  ours_context, ours_pooled = sdxl.text_conditioning(
      tuple(e.module for e in sd.text_encoders), tuple(e.params for e in sd.text_encoders),
      tuple(tok(e.tokenizer) for e in sd.text_encoders))
  ours = sd.unet.apply({"params": sd.unet_params}, latents.transpose(0, 2, 3, 1), np.array([500]),
                       ours_context,
                       added_cond=sdxl.added_cond(ours_pooled, sdxl.time_ids((64, 64))))
  record_parity("tiny_sdxl writer: context, diffusers vs ti_jax load",
                rel_err(ours_context, context.numpy()), 1e-4)
  record_parity("tiny_sdxl writer: unet, diffusers vs ti_jax load",
                rel_err(np.asarray(ours).transpose(0, 3, 1, 2), ref), 1e-4)


def test_writer_is_deterministic_for_a_seed(tmp_path):
  a = tiny_models.write_tiny_model(str(tmp_path / "a"), seed=3)
  b = tiny_models.write_tiny_model(str(tmp_path / "b"), seed=3)
  c = tiny_models.write_tiny_model(str(tmp_path / "c"), seed=4)
  weights = "unet/diffusion_pytorch_model.safetensors"
  read = lambda root: open(os.path.join(root, weights), "rb").read()
  assert read(a) == read(b)
  assert read(a) != read(c)


def test_ensure_tiny_model_writes_once(tmp_path):
  path = str(tmp_path / "cache" / "tiny")
  tiny_models.ensure_tiny_model(path)
  stamp = os.path.getmtime(os.path.join(path, "unet", "config.json"))
  tiny_models.ensure_tiny_model(path)
  assert os.path.getmtime(os.path.join(path, "unet", "config.json")) == stamp
  assert [p for p in os.listdir(tmp_path / "cache") if p.startswith(".tiny-")] == []


def test_cli_writes_tiny_sdxl_folder(tmp_path):
  out = str(tmp_path / "xl")
  cmd = [sys.executable, "-m", "ti_jax.tiny_model", "--out_dir", out, "--preset", "tiny-sdxl"]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  assert "Stable Diffusion XL" in done.stdout
  assert {"text_encoder_2", "tokenizer_2", "unet", "vae"} <= set(os.listdir(out))
  with open(os.path.join(out, "model_index.json")) as f:
    assert '"StableDiffusionXLPipeline"' in f.read()


def test_cli_writes_model_and_refuses_to_overwrite(tmp_path):
  out = str(tmp_path / "m")
  cmd = [sys.executable, "-m", "ti_jax.tiny_model", "--out_dir", out, "--preset", "tiny-sd21"]
  first = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert first.returncode == 0, first.stderr
  assert os.path.isfile(os.path.join(out, "model_index.json"))
  second = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert second.returncode != 0
  assert "already holds a model" in second.stderr and "Traceback" not in second.stderr
