"""Loading FLUX.1 into ti_jax: FluxPipeline folders (plain, sharded, variant), hub ids, ComfyUI's
single files and the tiny-flux writer.

A tiny random (perturbed) diffusers `FluxPipeline` is saved by diffusers itself
(`save_pretrained(safe_serialization=True)`, once whole and once in small
`fp16`-variant shards) and loaded by `load_stable_diffusion`: the transformer's,
T5's, CLIP's and the VAE's float32 outputs equal the PyTorch modules' (<= 1e-5
relative), and the same model written as ComfyUI's four files
(`flux_single_file_models.write_comfyui_files`) loads to identical Flax params.
The transformer's timestep/guidance sines run on ti_jax's features on both sides
(as in tests/models/test_flux.py, whose docstring says why).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import record_parity

from ti_jax.models import flux
from ti_jax.testing import flux_single_file_models as writer
from ti_jax.weights import flux_files, pipeline, presets, safetensors_io, tiny_models
from ti_jax.weights import flux_single_file as fsf
from ti_jax.weights.loading import ModelLoadError, load_stable_diffusion, resolve_model_dir
from ti_jax.weights.original_layout import torch_shapes
from ti_jax.weights.tiny_t5_tokenizer import write_tiny_t5_tokenizer
from ti_jax.weights.tiny_tokenizer import write_tiny_clip_tokenizer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from torch_reference import flux_time_features, perturb_, rel_err  # noqa: E402  (needs torch)

TOL = 1e-5
LATENT = 8  # latent height and width: 16 packed tokens
PROMPT = "a painting of a cat"
T5_LENGTH = 16  # the T5 prompt length used here (FLUX.1-dev pads to 512)


def _torch_pipeline(configs: dict, tokenizer_dir: str):
  """A diffusers FluxPipeline of `configs` (tiny-flux's) with perturbed random weights."""
  from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                         FluxTransformer2DModel)
  from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config,
                            T5EncoderModel, T5TokenizerFast)
  vocab = write_tiny_clip_tokenizer(os.path.join(tokenizer_dir, "clip"))
  write_tiny_t5_tokenizer(os.path.join(tokenizer_dir, "t5"))
  torch.manual_seed(0)
  clip_cfg = {k: v for k, v in configs["text_encoder"].items()
              if k not in ("architectures", "model_type")}
  clip_cfg.update(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                  pad_token_id=vocab - 1)
  t5_cfg = {k: v for k, v in configs["text_encoder_2"].items() if k != "architectures"}
  return FluxPipeline(
      scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
      vae=perturb_(AutoencoderKL(**configs["vae"]), 2),
      text_encoder=perturb_(CLIPTextModel(CLIPTextConfig(**clip_cfg)), 3),
      tokenizer=CLIPTokenizer.from_pretrained(os.path.join(tokenizer_dir, "clip")),
      text_encoder_2=perturb_(T5EncoderModel(T5Config(**t5_cfg)), 4),
      tokenizer_2=T5TokenizerFast.from_pretrained(os.path.join(tokenizer_dir, "t5")),
      transformer=perturb_(FluxTransformer2DModel(**configs["transformer"]), 1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(torch pipeline, whole folder, sharded fp16-variant folder), both saved by diffusers."""
  root = tmp_path_factory.mktemp("flux-load")
  pipe = _torch_pipeline(presets.preset("tiny-flux"), str(root / "tokenizers"))
  whole, sharded = str(root / "whole"), str(root / "sharded")
  pipe.save_pretrained(whole, safe_serialization=True)
  pipe.save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB", variant="fp16")
  return pipe, whole, sharded


@pytest.fixture(scope="module")
def loaded(saved):
  return load_stable_diffusion(saved[1])


def _assert_same_params(a, b):
  """Every component's params of two loaded models are equal, leaf for leaf."""
  trees = lambda sd: [sd.transformer_params, sd.vae_params] + [e.params for e in sd.text_encoders]
  for x, y in zip(trees(a), trees(b)):
    assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y)
    jax.tree_util.tree_map(np.testing.assert_array_equal, x, y)



def _compare_outputs(pipe, sd, name: str):
  """The transformer's, T5's, CLIP's and the VAE's float32 outputs of `sd` equal `pipe`'s."""
  from diffusers import FluxPipeline
  rng = np.random.default_rng(0)
  # The text encoders on the prompt as each tokenizer pads it.
  t5_ids = pipe.tokenizer_2(PROMPT, padding="max_length", max_length=T5_LENGTH,
                            return_tensors="np").input_ids
  clip_ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77,
                            return_tensors="np").input_ids
  np.testing.assert_array_equal(
      sd.text_encoders[1].tokenizer(PROMPT, padding="max_length", max_length=T5_LENGTH,
                                    return_tensors="np").input_ids, t5_ids)
  np.testing.assert_array_equal(
      sd.text_encoders[0].tokenizer(PROMPT, padding="max_length",
                                    return_tensors="np").input_ids, clip_ids)
  clip, t5 = sd.text_encoders
  with torch.no_grad():
    ref_t5 = pipe.text_encoder_2(torch.from_numpy(t5_ids)).last_hidden_state.numpy()
    ref_clip = pipe.text_encoder(torch.from_numpy(clip_ids)).pooler_output.numpy()
  ours_t5 = t5.module.apply({"params": t5.params}, jnp.asarray(t5_ids))
  ours_clip = clip.module.apply({"params": clip.params}, jnp.asarray(clip_ids),
                                all_outputs=True)["pooler_output"]
  record_parity(f"{name} T5 last_hidden_state float32", rel_err(ours_t5, ref_t5), TOL)
  record_parity(f"{name} CLIP pooler_output float32", rel_err(ours_clip, ref_clip), TOL)
  # The transformer on random packed latents, the T5 states and CLIP's pooled vector.
  latents = rng.standard_normal((1, 16, LATENT, LATENT)).astype(np.float32)
  t, guidance = np.array([0.7], np.float32), np.array([3.5], np.float32)
  img_ids = FluxPipeline._prepare_latent_image_ids(1, LATENT // 2, LATENT // 2, "cpu",
                                                   torch.float32)
  txt_ids = np.zeros((T5_LENGTH, 3), np.float32)
  with torch.no_grad(), flux_time_features(pipe.transformer):
    ref = pipe.transformer(
        hidden_states=FluxPipeline._pack_latents(torch.from_numpy(latents), 1, 16, LATENT, LATENT),
        encoder_hidden_states=torch.from_numpy(ref_t5),
        pooled_projections=torch.from_numpy(ref_clip),
        timestep=torch.from_numpy(t), img_ids=img_ids, txt_ids=torch.from_numpy(txt_ids),
        guidance=torch.from_numpy(guidance)).sample.numpy()
  packed = flux.pack_latents(jnp.asarray(latents.transpose(0, 2, 3, 1)))
  ours = sd.transformer.apply(
      {"params": sd.transformer_params}, packed, ref_t5, ref_clip, t,
      flux.latent_image_ids(LATENT // 2, LATENT // 2), txt_ids, guidance)
  record_parity(f"{name} transformer float32", rel_err(ours, ref), TOL)
  # The VAE: the posterior mean of an image, and the decoding of latents.
  images = rng.uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    ref_mean = pipe.vae.encode(torch.from_numpy(images)).latent_dist.mean.numpy()
    ref_decoded = pipe.vae.decode(torch.from_numpy(latents[:, :, :4, :4])).sample.numpy()
  mean, _ = sd.vae.apply({"params": sd.vae_params}, images.transpose(0, 2, 3, 1),
                         method=sd.vae.encode)
  decoded = sd.vae.apply({"params": sd.vae_params}, latents[:, :, :4, :4].transpose(0, 2, 3, 1),
                         method=sd.vae.decode)
  record_parity(f"{name} vae posterior mean float32",
                rel_err(np.asarray(mean).transpose(0, 3, 1, 2), ref_mean), TOL)
  record_parity(f"{name} vae decode float32",
                rel_err(np.asarray(decoded).transpose(0, 3, 1, 2), ref_decoded), TOL)


def test_folder_loads_flux_with_a_transformer_and_clip_l_and_t5_records(saved, loaded):
  pipe = saved[0]
  assert loaded.family == "flux" and loaded.is_flux and not loaded.is_sdxl
  assert loaded.unet is None and loaded.unet_params is None
  assert loaded.transformer.config == flux.FluxConfig.from_diffusers(
      dict(pipe.transformer.config))
  assert [(e.role, e.suffix, e.is_t5, e.width) for e in loaded.text_encoders] == [
      ("text_encoder", "", False, 32), ("text_encoder_2", "_2", True, 32)]
  assert loaded.text_encoders[1].module.TOKEN_TABLE_PATH == ("shared", "embedding")
  assert loaded.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
  assert loaded.vae.config.latent_channels == 16 and not loaded.vae.config.use_quant_conv
  assert loaded.vae_params["encoder"]["conv_in"]["kernel"].dtype == np.float32  # force_upcast


def test_folder_outputs_equal_diffusers_and_transformers(saved, loaded):
  _compare_outputs(saved[0], loaded, "flux folder")


def test_sharded_variant_folder_loads_the_same_params(saved, loaded):
  sharded = saved[2]
  assert os.path.isfile(os.path.join(sharded, "transformer",
                                     "diffusion_pytorch_model.safetensors.index.fp16.json"))
  assert os.path.isfile(os.path.join(sharded, "text_encoder_2",
                                     "model.safetensors.index.fp16.json"))
  _assert_same_params(load_stable_diffusion(sharded, variant="fp16"), loaded)


def test_hub_ids_fetch_the_flux_folders_safetensors_and_no_pickles(saved, monkeypatch):
  import huggingface_hub
  calls = []

  def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
    calls.append((repo_id, list(allow_patterns)))
    return saved[1]

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  sd = load_stable_diffusion("black-forest-labs/FLUX.1-schnell")
  assert sd.is_flux and sd.source == "black-forest-labs/FLUX.1-schnell"
  assert len(calls) == 1  # every component has safetensors: no fallback fetch
  patterns = calls[0][1]
  for needed in ("model_index.json", "scheduler/*.json", "tokenizer/*", "tokenizer_2/*",
                 "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "transformer/diffusion_pytorch_model.safetensors.index.json",
                 "transformer/diffusion_pytorch_model-*.safetensors",
                 "text_encoder_2/model.safetensors.index.json",
                 "text_encoder_2/model-*.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
    assert needed in patterns, needed
  assert not any(p.endswith((".bin", ".ckpt", ".pt", ".pth", ".msgpack")) for p in patterns)
  # The repos' top-level single files (flux1-dev.safetensors, ae.safetensors) are not fetched.
  assert all("/" in p for p in patterns if p != "model_index.json")
  resolve_model_dir("black-forest-labs/FLUX.1-dev", variant="fp16")
  assert "transformer/diffusion_pytorch_model.safetensors.index.fp16.json" in calls[1][1]


def test_a_t5_narrower_than_the_transformers_context_is_refused(saved, tmp_path):
  model = tmp_path / "model"
  shutil.copytree(saved[1], model)
  cfg_path = model / "text_encoder_2" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  cfg["d_model"] = 48
  cfg_path.write_text(json.dumps(cfg))
  with pytest.raises(ModelLoadError) as err:
    load_stable_diffusion(str(model))
  assert "\n" not in str(err.value)
  assert "T5) width 48 does not match the transformer's joint_attention_dim 32" in str(err.value)


# --- ComfyUI's single files.


@pytest.fixture(scope="module")
def comfyui_files(saved, tmp_path_factory):
  """The whole folder's model as ComfyUI's four files (plain keys), in one folder."""
  return writer.write_comfyui_files(saved[1], str(tmp_path_factory.mktemp("comfyui")))


def test_comfyui_files_beside_each_other_load_to_identical_params(saved, loaded, comfyui_files):
  # The companions are found beside the transformer file by ComfyUI's names.
  sd = load_stable_diffusion(comfyui_files["transformer"], tokenizer=saved[1])
  assert sd.is_flux and sd.model_index["preset"] == "tiny-flux"
  assert sd.transformer.config == loaded.transformer.config and sd.vae == loaded.vae
  assert [e.module for e in sd.text_encoders] == [e.module for e in loaded.text_encoders]
  _assert_same_params(sd, loaded)
  assert sd.scheduler_config["use_dynamic_shifting"]  # dev's (guidance_in) scheduler


def test_prefixed_and_all_in_one_files_load_to_identical_params(saved, loaded, tmp_path):
  paths = writer.write_comfyui_files(saved[1], str(tmp_path / "prefixed"), prefixed=True)
  named = load_stable_diffusion(
      paths["transformer"], tokenizer=saved[1], vae_file=paths["vae"],
      clip_l_file=paths["text_encoder"], t5_file=paths["text_encoder_2"])
  _assert_same_params(named, loaded)
  merged = {}
  for path in paths.values():
    merged.update(safetensors_io.load(path))
  all_in_one = str(tmp_path / "flux1-dev-all-in-one.safetensors")
  safetensors_io.save(all_in_one, merged)
  _assert_same_params(load_stable_diffusion(all_in_one, tokenizer=saved[1]), loaded)


def test_half_precision_files_load_as_their_rounded_values(saved, loaded, comfyui_files, tmp_path):
  """FLUX.1's files are bf16 (transformer, ae) and fp16 (t5xxl_fp16, clip_l): they load as the
  float32 model's values rounded to those types (the renaming is exact on any dtype)."""
  import ml_dtypes
  kinds = {"transformer": ml_dtypes.bfloat16, "vae": ml_dtypes.bfloat16,
           "text_encoder": np.float16, "text_encoder_2": np.float16}
  for comp, path in comfyui_files.items():
    safetensors_io.save(str(tmp_path / os.path.basename(path)),
                        {k: np.asarray(v).astype(kinds[comp])
                         for k, v in safetensors_io.load(path).items()})
  sd = load_stable_diffusion(str(tmp_path / os.path.basename(comfyui_files["transformer"])),
                             tokenizer=saved[1])
  rounded = lambda tree, kind: jax.tree_util.tree_map(
      lambda a: np.asarray(a).astype(kind).astype(np.float32), tree)
  pairs = [(sd.transformer_params, loaded.transformer_params, kinds["transformer"]),
           (sd.vae_params, loaded.vae_params, kinds["vae"])]
  pairs += [(a.params, b.params, kinds[a.role]) for a, b in zip(sd.text_encoders,
                                                                 loaded.text_encoders)]
  for ours, full, kind in pairs:
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours, rounded(full, kind))


def _one_line_error(path, *needles, **kwargs):
  with pytest.raises(ModelLoadError) as err:
    load_stable_diffusion(str(path), **kwargs)
  message = str(err.value)
  assert "\n" not in message, message
  for needle in needles:
    assert needle in message, message


def test_a_missing_companion_file_is_a_one_line_error(saved, comfyui_files, tmp_path):
  for name in ("flux1.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"):
    shutil.copy(os.path.join(os.path.dirname(comfyui_files["vae"]), name), tmp_path / name)
  _one_line_error(tmp_path / "flux1.safetensors", "needs the Flux VAE: no ae.safetensors beside it",
                  "vae_file", tokenizer=saved[1])
  _one_line_error(tmp_path / "flux1.safetensors", "t5_file: T5-XXL file not found",
                  str(tmp_path / "t5.safetensors"), tokenizer=saved[1],
                  vae_file=comfyui_files["vae"], t5_file=str(tmp_path / "t5.safetensors"))
  # A companion of the wrong kind is named for what it is.
  _one_line_error(comfyui_files["transformer"],
                  "t5xxl_fp16.safetensors: a T5 encoder, not a CLIP text encoder",
                  tokenizer=saved[1], clip_l_file=comfyui_files["text_encoder_2"])


def test_a_lora_and_a_flux_fill_file_are_refused_in_one_line(saved, comfyui_files, tmp_path):
  lora = tmp_path / "flux-lora.safetensors"
  safetensors_io.save(str(lora), {
      "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": np.zeros((4, 32), np.float32),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": np.zeros((96, 4), np.float32)})
  _one_line_error(lora, "flux-lora.safetensors: a LoRA", "not a full model")
  state = dict(safetensors_io.load(comfyui_files["transformer"]))
  state["img_in.weight"] = np.zeros((32, 128), np.float32)  # Fill: image + mask channels in
  fill = tmp_path / "flux1-fill-dev.safetensors"
  safetensors_io.save(str(fill), state)
  _one_line_error(fill, "takes 128 input channels and predicts 64", "Flux Fill")


# --- The tiny-flux writer.


def test_tiny_flux_folder_loads_in_diffusers_and_ti_jax_with_equal_outputs(tmp_path):
  from diffusers import FluxPipeline
  folder = resolve_model_dir("tiny-flux", cache_dir=str(tmp_path))
  assert folder == str(tmp_path / "tiny-flux")
  index = json.loads((tmp_path / "tiny-flux" / "model_index.json").read_text())
  assert index["_class_name"] == "FluxPipeline"
  assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
  pipe = FluxPipeline.from_pretrained(folder)
  # Each component holds exactly the weights its PyTorch class has (no missing or unused key).
  for comp in ("transformer", "vae"):
    _, info = type(getattr(pipe, comp)).from_pretrained(os.path.join(folder, comp),
                                                         output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  for comp in ("text_encoder", "text_encoder_2"):
    _, info = type(getattr(pipe, comp)).from_pretrained(os.path.join(folder, comp),
                                                         output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
  sd = load_stable_diffusion("tiny-flux", cache_dir=str(tmp_path))
  assert sd.is_flux and sd.transformer.config.guidance_embeds
  _compare_outputs(pipe, sd, "tiny-flux writer")


def test_cli_writes_the_tiny_flux_folder(tmp_path):
  out = str(tmp_path / "flux")
  cmd = [sys.executable, "-m", "ti_jax.tiny_model", "--out_dir", out, "--preset", "tiny-flux"]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  assert "wrote tiny random-weight FLUX.1 (tiny-flux)" in done.stdout
  assert {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
          "scheduler"} <= set(os.listdir(out))
  assert not os.path.isdir(os.path.join(out, "unet"))


def test_tiny_flux_is_a_tiny_model_and_the_sd_ones_are_unchanged():
  assert "tiny-flux" in presets.TINY_MODELS and "tiny-flux" in tiny_models.TINY_PRESETS
  assert [m for m in presets.TINY_MODELS if m != "tiny-flux"] == [
      "tiny-sd15", "tiny-sd21", "tiny-ldm", "tiny-sdxl"]


# --- Full size, on shapes only.


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_full_size_files_pick_their_preset_and_fit_the_built_model(name):
  """FLUX.1's files, as shapes, give back the preset's configs, and every renamed key fits the
  model `build_modules` makes of them (`jax.eval_shape`: nothing is allocated)."""
  configs = presets.preset(name)
  shapes = pipeline.param_shapes(pipeline.build_modules(configs))
  want = {comp: torch_shapes(pipeline.component_spec(comp, configs[comp]), tree)
          for comp, tree in shapes.items()}
  fake = lambda named: {k: np.broadcast_to(np.float32(0), s) for k, s in named.items()}
  found, renamed = fsf.transformer_shapes(
      writer.bfl_shapes(want["transformer"], configs["transformer"]), "flux1.safetensors",
      expected=want["transformer"])
  assert renamed == want["transformer"]
  ae = writer.original_vae_state_dict(fake(want["vae"]), configs["vae"])
  picked, got = flux_files.flux_configs(found, {k: v.shape for k, v in ae.items()},
                                        fake(want["text_encoder"]),
                                        fake(want["text_encoder_2"]), "ae.safetensors")
  assert picked == name and got == configs
  assert {p: len(t) for p, t in want.items()} == {
      "transformer": 1156 + (4 if name == "flux-dev" else 0), "vae": 244,
      "text_encoder": 196, "text_encoder_2": 219}
