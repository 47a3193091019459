"""Writes a complete diffusers-format latent diffusion folder with tiny random weights.

The folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/) loads in ti_jax and in diffusers' PyTorch
`StableDiffusionPipeline.from_pretrained`; the "tiny-ldm" preset writes the
paper's LDM layout instead (vqvae/, bert/ with an LDMBert, a BERT
tokenizer) for `LDMTextToImagePipeline.from_pretrained`, and "tiny-sdxl"
SDXL's (also text_encoder_2/ with projection, tokenizer_2/, Euler) for
`StableDiffusionXLPipeline.from_pretrained`, and "tiny-flux" FLUX.1-dev's
(transformer/, the 16-channel vae/, CLIP text_encoder/, T5 text_encoder_2/ with
the tiny T5 tokenizer in tokenizer_2/, flow-matching Euler) for
`FluxPipeline.from_pretrained`. The offline quick start (the
configs' `:tiny` variants, `load_stable_diffusion("tiny-sd15")`), tests and CI
run the real loading code without the network. The weights are random: images
made with it are noise-like by design.

  python -m ti_jax.tiny_model --out_dir /tmp/tiny-sd --preset tiny-sd15
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np

from ti_jax.weights import convert, presets, safetensors_io
from ti_jax.weights.pipeline import (
  PIPELINE_FOLDERS,
  build_modules,
  component_spec,
  param_shapes,
)
from ti_jax.weights.tiny_t5_tokenizer import write_tiny_t5_tokenizer
from ti_jax.weights.tiny_tokenizer import (
  write_tiny_bert_tokenizer,
  write_tiny_clip_tokenizer,
)

TINY_PRESETS = presets.TINY_MODELS  # the presets this module writes (owned by presets.py)


# Recorded in the configs as the writing library's version; diffusers and
# transformers only compare it to warn about very old files.
_DIFFUSERS_VERSION = "0.42.0"


_TRANSFORMERS_VERSION = "5.0.0"


def write_json(path: str, obj: dict) -> None:
  """Writes `obj` as sorted, indented JSON, as diffusers and transformers write configs."""
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def write_model_folder(out_dir: str, configs: dict, params: dict, tokenizer_writer,
                       tokenizer_2_writer=None) -> None:
  """Writes a diffusers folder from component configs and ti_jax Flax params.

  Args:
    out_dir: destination folder (created).
    configs: {"unet", "vae", "text_encoder", "scheduler"} config dicts (SDXL: also
      "text_encoder_2"; FLUX.1: "transformer" instead of "unet", T5's "text_encoder_2").
    params: {"unet", "vae", "text_encoder"[, "text_encoder_2"]} Flax param trees.
    tokenizer_writer: `fn(tokenizer_dir)` that writes the tokenizer files.
    tokenizer_2_writer: the same for tokenizer_2/ (default: `tokenizer_writer`; FLUX.1: T5's).
  """
  if "transformer" in configs:
    write_flux_folder(out_dir, configs, params, tokenizer_writer,
                      tokenizer_2_writer or write_tiny_t5_tokenizer)
    return
  os.makedirs(out_dir, exist_ok=True)
  ldm = configs["text_encoder"].get("model_type") == "ldmbert"
  sdxl = "text_encoder_2" in configs
  pipeline = ("LDMTextToImagePipeline" if ldm else
              "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline")
  folders = PIPELINE_FOLDERS[pipeline]
  classes = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}
  for comp in folders:
    sub = os.path.join(out_dir, folders[comp])
    os.makedirs(sub, exist_ok=True)
    spec = component_spec(comp, configs[comp])
    state = {k: v.astype(np.float32) for k, v in
             convert.flax_params_to_torch_state_dict(spec, params[comp]).items()}
    if comp == "text_encoder" and ldm:
      # LDMBertModel's language-model head: unused by the pipeline, but part
      # of the PyTorch model, so it is written to load without missing keys.
      table = state["model.embed_tokens.weight"]  # [V, D]
      state["to_logits.weight"] = np.ascontiguousarray(table)
      state["to_logits.bias"] = np.zeros(table.shape[0], np.float32)
      cfg = dict(configs[comp], transformers_version=_TRANSFORMERS_VERSION, dtype="float32")
      safetensors_io.save(os.path.join(sub, "model.safetensors"), state, {"format": "pt"})
    elif comp in ("text_encoder", "text_encoder_2"):
      arch = "CLIPTextModelWithProjection" if comp == "text_encoder_2" else "CLIPTextModel"
      cfg = dict(configs[comp], architectures=[arch], model_type="clip_text_model",
                 transformers_version=_TRANSFORMERS_VERSION, dtype="float32")
      safetensors_io.save(os.path.join(sub, "model.safetensors"), state, {"format": "pt"})
    else:
      cfg = dict(configs[comp], _class_name=classes[comp], _diffusers_version=_DIFFUSERS_VERSION)
      safetensors_io.save(os.path.join(sub, "diffusion_pytorch_model.safetensors"), state,
                          {"format": "pt"})
    write_json(os.path.join(sub, "config.json"), cfg)
  os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
  write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"),
              dict(configs["scheduler"], _diffusers_version=_DIFFUSERS_VERSION))
  tokenizer_writer(os.path.join(out_dir, "tokenizer"))
  if sdxl:
    tokenizer_writer(os.path.join(out_dir, "tokenizer_2"))
    write_json(os.path.join(out_dir, "model_index.json"), {
        "_class_name": pipeline,
        "_diffusers_version": _DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": True,
        "image_encoder": [None, None],
        "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
    return
  if ldm:
    write_json(os.path.join(out_dir, "model_index.json"), {
        "_class_name": pipeline,
        "_diffusers_version": _DIFFUSERS_VERSION,
        "bert": ["latent_diffusion", "LDMBertModel"],
        "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],
        "tokenizer": ["transformers", "BertTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vqvae": ["diffusers", "AutoencoderKL"],
    })
    return
  write_json(os.path.join(out_dir, "model_index.json"), {
      "_class_name": pipeline,
      "_diffusers_version": _DIFFUSERS_VERSION,
      "feature_extractor": [None, None],
      "requires_safety_checker": False,
      "safety_checker": [None, None],
      "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
  })


def _write_component(sub: str, comp: str, config: dict, params) -> None:
  """One FLUX.1 component folder: config.json and float32 safetensors weights."""
  os.makedirs(sub, exist_ok=True)
  spec = component_spec(comp, config)
  state = {k: np.asarray(v, np.float32) for k, v in
           convert.flax_params_to_torch_state_dict(spec, params).items()}
  if comp in ("transformer", "vae"):
    name = {"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL"}[comp]
    cfg = dict(config, _class_name=name, _diffusers_version=_DIFFUSERS_VERSION)
    weights = "diffusion_pytorch_model.safetensors"
  else:
    cfg = dict(config, transformers_version=_TRANSFORMERS_VERSION, dtype="float32")
    if comp == "text_encoder":
      cfg.update(architectures=["CLIPTextModel"], model_type="clip_text_model")
    weights = "model.safetensors"  # T5: `shared.weight` only, as transformers saves it (tied)
  safetensors_io.save(os.path.join(sub, weights), state, {"format": "pt"})
  write_json(os.path.join(sub, "config.json"), cfg)


def write_flux_folder(out_dir: str, configs: dict, params: dict, tokenizer_writer,
                      tokenizer_2_writer) -> None:
  """Writes a diffusers `FluxPipeline` folder (see `write_model_folder`)."""
  os.makedirs(out_dir, exist_ok=True)
  folders = PIPELINE_FOLDERS["FluxPipeline"]
  for comp, sub in folders.items():
    _write_component(os.path.join(out_dir, sub), comp, configs[comp], params[comp])
  os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
  write_json(os.path.join(out_dir, "scheduler", "scheduler_config.json"),
             dict(configs["scheduler"], _diffusers_version=_DIFFUSERS_VERSION))
  tokenizer_writer(os.path.join(out_dir, "tokenizer"))
  tokenizer_2_writer(os.path.join(out_dir, "tokenizer_2"))
  write_json(os.path.join(out_dir, "model_index.json"), {
      "_class_name": "FluxPipeline",
      "_diffusers_version": _DIFFUSERS_VERSION,
      "feature_extractor": [None, None],
      "image_encoder": [None, None],
      "scheduler": ["diffusers", configs["scheduler"]["_class_name"]],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "text_encoder_2": ["transformers", "T5EncoderModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "tokenizer_2": ["transformers", "T5TokenizerFast"],
      "transformer": ["diffusers", "FluxTransformer2DModel"],
      "vae": ["diffusers", "AutoencoderKL"],
  })


def random_params(shapes, rng: np.random.Generator):
  """Random weights for a param-shape tree, drawn with numpy.

  Kernels ~ N(0, 1/fan_in), norms' scale ~ 1 + N(0, 0.02^2), biases and
  embeddings ~ N(0, 0.02^2). numpy is used instead of `module.init` because
  XLA takes ~25 s to compile the init of the UNet and VAE on CPU.
  """
  def draw(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      return rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
    if name == "scale":
      return 1.0 + 0.02 * rng.standard_normal(shape, dtype=np.float32)
    return 0.02 * rng.standard_normal(shape, dtype=np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def write_tiny_model(out_dir: str, preset: str = "tiny-sd15", seed: int = 0) -> str:
  """Writes a tiny random-weight model folder for `preset` (see TINY_PRESETS); returns out_dir."""
  configs = presets.preset(preset)
  ldm = configs["text_encoder"].get("model_type") == "ldmbert"
  tokenizer_writer = write_tiny_bert_tokenizer if ldm else write_tiny_clip_tokenizer
  with tempfile.TemporaryDirectory() as tmp:
    vocab_size = tokenizer_writer(tmp)
  # SDXL's two encoders share the tiny tokenizer (written twice, as tokenizer and tokenizer_2);
  # FLUX.1's T5 has its own (its preset's vocabulary holds the tiny T5 tokenizer's ids).
  flux = "transformer" in configs
  text_roles = [r for r in ("text_encoder", "text_encoder_2") if r in configs
                and not (flux and r == "text_encoder_2")]
  for role in text_roles:
    configs[role]["vocab_size"] = vocab_size
    if not ldm:
      # The tiny tokenizer's specials are its last two ids; pad is eos, as in SD 1.x.
      configs[role].update(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                           pad_token_id=vocab_size - 1)
  shapes = param_shapes(build_modules(configs))
  rng = np.random.default_rng(seed)
  params = {name: random_params(tree, rng) for name, tree in shapes.items()}
  write_model_folder(out_dir, configs, params, tokenizer_writer)
  return out_dir


def ensure_written(out_dir: str, marker: str, write) -> str:
  """Runs `write(folder)` unless `out_dir/marker` exists; safe against interrupted writes.

  The folder is written beside `out_dir` and renamed into place, so a
  half-written one is never seen; when another process (a multi-host run on
  one machine) gets there first, its folder is kept.
  """
  if os.path.isfile(os.path.join(out_dir, marker)):
    return out_dir
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
  try:
    write(tmp)
    try:
      os.replace(tmp, out_dir)
    except OSError:
      if not os.path.isfile(os.path.join(out_dir, marker)):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def ensure_tiny_model(out_dir: str, preset: str = "tiny-sd15", seed: int = 0) -> str:
  """Writes the tiny model unless `out_dir` already holds one; safe against interrupted writes."""
  return ensure_written(out_dir, "model_index.json",
                        lambda folder: write_tiny_model(folder, preset, seed))
