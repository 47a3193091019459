"""FLUX.1 from the single files users keep for ComfyUI, as `pipeline.StableDiffusion` ("flux").

ComfyUI users keep FLUX.1 as four files: the transformer in Black Forest
Labs' layout (`flux1-dev.safetensors`, `flux1-schnell.safetensors`, or ComfyUI's
re-saved and all-in-one files under `model.diffusion_model.`), the VAE
(`ae.safetensors`), CLIP-L (`clip_l.safetensors`) and T5-XXL
(`t5xxl_fp16.safetensors`). `load_flux_single_file` takes the transformer file
and finds each companion in this order: the file named by its argument
(`vae_file`, `clip_l_file`, `t5_file`), the transformer file itself when it is an
all-in-one checkpoint holding the component under ComfyUI's prefix, the file of
ComfyUI's usual name beside the transformer file; else a one-line error names
the argument.

The renaming to diffusers/transformers keys is `flux_single_file`'s (in memory,
views of the memory-mapped files); the architecture is the transformer file's
(`flux_single_file.transformer_config`) on the preset of its size ("flux-dev" or
"flux-schnell" by its guidance embedding when full size, else "tiny-flux"), whose
scheduler config the model takes. Single files hold no tokenizer: `tokenizer`
names a folder with tokenizer/ (CLIP) and tokenizer_2/ (T5), such as a diffusers
FLUX.1 folder, or a hub id (default: FLUX.1-schnell's, which is not gated), of
which only the tokenizer folders are fetched.

`loading.load_stable_diffusion` sends a single file here when `is_flux_file`
(its header's keys) says so, and every other single file to `single_file`.
A LoRA, a Flux Fill/Depth/Canny model or a diffusers-layout transformer file is
refused in one line naming what it is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from ti_jax.runtime import console
from ti_jax.weights import flux_single_file, pipeline, presets, safetensors_io
from ti_jax.weights.original_layout import torch_shapes
from ti_jax.weights.single_file import (
  SAFETENSORS_SUFFIXES,
  TOKENIZER_FOLDERS,
  load_tokenizer,
  read_checkpoint,
)

ModelLoadError = pipeline.ModelLoadError

# FLUX.1-schnell's repo is not gated; its tokenizer/ and tokenizer_2/ are dev's too.
DEFAULT_TOKENIZER = "black-forest-labs/FLUX.1-schnell"
# The companion files: role -> (argument, ComfyUI's usual file name, what it is).
FLUX_COMPANIONS = {
    "vae": ("vae_file", "ae.safetensors", "the Flux VAE"),
    "text_encoder": ("clip_l_file", "clip_l.safetensors", "CLIP-L"),
    "text_encoder_2": ("t5_file", "t5xxl_fp16.safetensors", "T5-XXL"),
}

# Block names of Flux's transformer in either layout; a LoRA for it names them too.
_FLUX_BLOCKS = ("double_blocks", "single_blocks", "single_transformer_blocks")


def is_flux_file(path: str) -> bool:
  """Whether a single file is FLUX.1's, from its safetensors header alone: its BFL transformer,
  or a LoRA or diffusers-layout file of it (which `load_flux_single_file` refuses by name).

  Anything else (pickles, unreadable files included) is `single_file`'s to load or report.
  """
  path = os.path.expanduser(path)
  if not (os.path.isfile(path) and path.lower().endswith(SAFETENSORS_SUFFIXES)):
    return False
  try:
    keys = [k for k in safetensors_io.read_header(path) if k != "__metadata__"]
  except (OSError, ValueError):
    return False
  if flux_single_file.is_flux_transformer(set(keys)):
    return True
  return any(block in k for k in keys for block in _FLUX_BLOCKS)


def _holds_component(state: Mapping[str, Any], prefixes, markers: tuple[str, ...]) -> bool:
  """Whether an all-in-one file holds a component under one of its (non-empty) prefixes."""
  return any(p and p + m in state for p in prefixes for m in markers)


_COMPANION_PARTS = {  # role -> (the prefixes of all-in-one files, keys its files hold)
    "vae": (flux_single_file.VAE_PREFIXES, (flux_single_file.VAE_MARKER,)),
    # transformers 5 saves CLIPTextModel without the `text_model.` name.
    "text_encoder": (flux_single_file.CLIP_PREFIXES,
                     (flux_single_file.CLIP_MARKER,
                      flux_single_file.CLIP_MARKER[len("text_model."):])),
    "text_encoder_2": (flux_single_file.T5_PREFIXES, (flux_single_file.T5_MARKER,)),
}


def flux_companion(role: str, given: str | None, path: str, state: Mapping[str, Any],
                   allow_pickle: bool) -> tuple[str, Mapping[str, Any]]:
  """(file, state dict) holding one companion of the transformer file `path` (see the module
  docstring: the named file, else `path` itself if it holds the component, else ComfyUI's
  usual name beside it); a one-line `ModelLoadError` when there is none."""
  arg, default, what = FLUX_COMPANIONS[role]
  if given:
    given = os.path.expanduser(given)
    if not os.path.isfile(given):
      raise ModelLoadError(f"{arg}: {what} file not found: {given}")
    return given, read_checkpoint(given, allow_pickle)[0]
  if _holds_component(state, *_COMPANION_PARTS[role]):
    return path, state
  beside = os.path.join(os.path.dirname(path), default)
  if os.path.isfile(beside):
    return beside, read_checkpoint(beside, allow_pickle)[0]
  raise ModelLoadError(f"{path}: a Flux transformer needs {what}: no {default} beside it; "
                       f"name the file with {arg}")


def flux_configs(transformer_config: dict, vae_shapes: Mapping[str, tuple[int, ...]],
                 clip: Mapping[str, Any], t5: Mapping[str, Any], vae_path: str
                 ) -> tuple[str, dict[str, dict]]:
  """(preset name, component configs) of FLUX.1 files: the preset of the transformer's size
  ("flux-dev"/"flux-schnell" full size, else "tiny-flux") with the fields the files show."""
  variant = flux_single_file.variant(transformer_config)
  name = f"flux-{variant}" if flux_single_file.is_full_size(transformer_config) else "tiny-flux"
  configs = presets.preset(name)
  configs["transformer"].update(transformer_config)
  configs["vae"].update(flux_single_file.vae_config(vae_shapes, vae_path))
  configs["text_encoder"].update(
      vocab_size=int(clip["text_model.embeddings.token_embedding.weight"].shape[0]),
      max_position_embeddings=int(clip["text_model.embeddings.position_embedding.weight"].shape[0]))
  configs["text_encoder_2"].update(vocab_size=int(t5["shared.weight"].shape[0]))
  return name, configs


def _flux_tokenizers(tokenizer: str | None, configs: dict) -> dict:
  """CLIP's and T5's tokenizers from a folder with tokenizer/ and tokenizer_2/ (or a hub id)."""
  name = tokenizer or DEFAULT_TOKENIZER
  if os.path.isdir(os.path.expanduser(name)):
    folder = os.path.expanduser(name)
  else:
    folder = pipeline.download_from_hub(name, revision=None,
                                        allow_patterns=["tokenizer/*", "tokenizer_2/*"],
                                        what="tokenizer")
  clip = load_tokenizer(folder, "text_encoder",
                        configs["text_encoder"]["max_position_embeddings"])
  sub = os.path.join(folder, TOKENIZER_FOLDERS["text_encoder_2"])
  if not os.path.isdir(sub):
    raise ModelLoadError(f"missing T5 tokenizer folder for text_encoder_2: {sub}")
  import transformers  # pylint: disable=import-outside-toplevel
  try:
    t5 = transformers.T5TokenizerFast.from_pretrained(sub, local_files_only=True)
  except Exception as e:  # noqa: BLE001  transformers raises OSError/ValueError/TypeError
    raise ModelLoadError(f"cannot load tokenizer from {sub}: {console.one_line(e)}") from None
  return {"text_encoder": clip, "text_encoder_2": t5}


def load_flux_single_file(path: str, state: Mapping[str, Any] | None = None, *,
                          tokenizer: str | None = None, dtype: Any = jnp.float32,
                          param_dtype: Any = jnp.float32, allow_pickle: bool = False,
                          attention_impl: str | None = None, vae_dtype: Any = None,
                          remat: bool = False, vae_file: str | None = None,
                          clip_l_file: str | None = None,
                          t5_file: str | None = None) -> pipeline.StableDiffusion:
  """Loads FLUX.1 from ComfyUI's files as `pipeline.StableDiffusion` (family "flux").

  Args:
    path: the BFL-layout transformer file (`flux1-dev.safetensors`; any ComfyUI prefix).
    state: its tensors if already read (`read_checkpoint`), else read here.
    tokenizer: a folder with tokenizer/ (CLIP) and tokenizer_2/ (T5), e.g. a diffusers
      FLUX.1 folder, or a hub id; None: FLUX.1-schnell's (`DEFAULT_TOKENIZER`).
    vae_file, clip_l_file, t5_file: the companion files (`flux_companion`).
    dtype, param_dtype, allow_pickle, attention_impl, vae_dtype, remat: as in
      `loading.load_stable_diffusion` (the VAE defaults to float32, as for folders).

  Raises:
    ModelLoadError: one line: a missing companion, a LoRA, a Flux Fill/Depth/Canny model,
      a missing or unexpected key, a shape the architecture has no place for.
  """
  path = os.path.expanduser(path)
  if state is None:
    state = read_checkpoint(path, allow_pickle)[0]
  transformer_config, _ = flux_single_file.transformer_state_dict(state, path)
  files = {role: flux_companion(role, given, path, state, allow_pickle)
           for role, given in (("vae", vae_file), ("text_encoder", clip_l_file),
                               ("text_encoder_2", t5_file))}
  clip_path, t5_path, vae_path = (files[r][0] for r in ("text_encoder", "text_encoder_2", "vae"))
  vae_shapes = {k: tuple(v.shape) for k, v in files["vae"][1].items()}
  preset_name, configs = flux_configs(
      transformer_config, vae_shapes, flux_single_file.clip_state_dict(files["text_encoder"][1],
                                                                       clip_path),
      flux_single_file.t5_state_dict(files["text_encoder_2"][1], t5_path), vae_path)
  if vae_dtype is None:
    vae_dtype = jnp.float32  # as for FLUX.1 folders (force_upcast)
  build = lambda: pipeline.build_modules(configs, dtype=dtype, param_dtype=param_dtype,
                                         attention_impl=attention_impl, vae_dtype=vae_dtype,
                                         remat=remat)
  modules = build()
  flax_shapes = pipeline.param_shapes(modules)
  specs = {comp: pipeline.component_spec(comp, configs[comp]) for comp in flax_shapes}
  expected = {comp: torch_shapes(specs[comp], flax_shapes[comp]) for comp in flax_shapes}
  expected["text_encoder_2"]["encoder.embed_tokens.weight"] = expected["text_encoder_2"][
      "shared.weight"]  # the tied table's second name (`t5_state_dict` gives both)
  # The renaming again, now checked key for key and shape for shape against the model.
  weights = {
      "transformer": flux_single_file.transformer_state_dict(
          state, path, expected["transformer"])[1],
      "vae": flux_single_file.vae_state_dict(files["vae"][1], vae_path, configs["vae"],
                                             expected["vae"]),
      "text_encoder": flux_single_file.clip_state_dict(
          files["text_encoder"][1], clip_path, expected["text_encoder"]),
      "text_encoder_2": flux_single_file.t5_state_dict(
          files["text_encoder_2"][1], t5_path, expected["text_encoder_2"]),
  }
  params = pipeline.convert_components(specs, weights, flax_shapes, path,
                                       param_dtype=param_dtype, vae_dtype=vae_dtype)
  # The tokenizers last: a bad file is reported before anything is fetched.
  tokenizers = _flux_tokenizers(tokenizer, configs)
  if preset_name in presets.TINY_MODELS:
    # As for the SD tiny models: CLIP's special tokens are its tokenizer's (no shape changes).
    tok = tokenizers["text_encoder"]
    configs["text_encoder"].update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    modules = build()
  model_index = {"_class_name": "FluxPipeline", "single_file": os.path.basename(path),
                 "preset": preset_name}
  return pipeline.assemble(path, path, modules, params, tokenizers, configs["scheduler"],
                           model_index)
