"""Loading diffusers-format latent diffusion folders (local or from the hub) into ti_jax models.

`load_stable_diffusion(name_or_path)` returns the Flax modules with
their params, the tokenizer(s) and the scheduler config. It reads Stable
Diffusion 1.x/2.x folders (`StableDiffusionPipeline`: unet, vae,
text_encoder = CLIP), Stable Diffusion XL folders (`StableDiffusionXLPipeline`:
also text_encoder_2 = OpenCLIP bigG with projection, tokenizer_2) and the paper's LDM-1.4B (`LDMTextToImagePipeline`:
unet, vqvae = a KL autoencoder, bert = LDMBert with a BERT tokenizer) and
FLUX.1 (`FluxPipeline`: transformer, the 16-channel vae, text_encoder = CLIP-L,
text_encoder_2 = T5 with a T5 tokenizer_2); the components are addressed by
role (unet, vae, text_encoder) whatever their folder is called. Large components
may be sharded (`*.safetensors.index.json`). Weights come from PyTorch-layout
`.safetensors` (preferred), diffusers/transformers Flax `.msgpack`, or, only
with `allow_pickle=True` and torch installed, `.bin` pickles. Every failure is a `ModelLoadError` whose message is one line.

The loaded model (`StableDiffusion`), `ModelLoadError` and the Flax module
builders are `ti_jax.weights.pipeline`'s, shared with the single-file loaders
(`single_file`; FLUX.1's: `flux_files`) and the tiny models' writer (`tiny_models`),
all of which this module dispatches to.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ti_jax.runtime import console, fileio
from ti_jax.weights import convert, flux_files, presets, safetensors_io, single_file
from ti_jax.weights.pipeline import (
  PIPELINE_FOLDERS,
  TOKENIZER_FOLDERS,
  ModelLoadError,
  StableDiffusion,
  assemble,
  build_modules,
  component_spec,
  download_from_hub,
  param_shapes,
)
from ti_jax.weights.tiny_models import ensure_tiny_model


# Weight file stems per component: diffusers models vs transformers models.
_WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                 "text_encoder": "model", "text_encoder_2": "model",
                 "transformer": "diffusion_pytorch_model"}
_FLAX_FILES = {"unet": "diffusion_flax_model.msgpack", "vae": "diffusion_flax_model.msgpack",
               "text_encoder": "flax_model.msgpack", "text_encoder_2": "flax_model.msgpack",
               "transformer": "diffusion_flax_model.msgpack"}
_BIN_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
              "text_encoder": "pytorch_model", "text_encoder_2": "pytorch_model",
              "transformer": "diffusion_pytorch_model"}
# The tokenizer classes a model_index.json may name (T5's: FLUX.1's tokenizer_2).
_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast", "BertTokenizer", "BertTokenizerFast",
               "T5TokenizerFast", "T5Tokenizer")


def _hub_patterns(variant: str | None, allow_pickle: bool) -> list[str]:
  """The first fetch: model_index, configs, tokenizers and safetensors weights.

  model_index.json is not known before the download: ask for the folders of
  every supported pipeline (patterns that match nothing cost nothing). The
  Flax/pickle fallbacks are fetched only for components without safetensors
  (`_fallback_patterns`): hub repos such as SDXL's hold both, and the Flax
  UNet alone is 10 GB.
  """
  var = f".{variant}" if variant else ""
  patterns = ["model_index.json", "scheduler/*.json"]
  patterns += [f"{sub}/*" for sub in TOKENIZER_FOLDERS.values()]
  pairs = {(role, sub) for folders in PIPELINE_FOLDERS.values() for role, sub in folders.items()}
  for comp, sub in sorted(pairs):
    stem = _WEIGHT_STEMS[comp]
    patterns += [f"{sub}/config.json", f"{sub}/{stem}{var}.safetensors",
                 f"{sub}/{stem}{var}.safetensors.index.json",
                 f"{sub}/{stem}{var}-*.safetensors"]
    if variant:  # the libraries' own name of a variant's shard index
      patterns.append(f"{sub}/{stem}.safetensors.index{var}.json")
  return patterns


def _fallback_patterns(folder: str, variant: str | None, allow_pickle: bool) -> list[str]:
  """The second fetch: Flax (and with `allow_pickle`, `.bin`) weights of components without safetensors."""
  index_path = os.path.join(folder, "model_index.json")
  if not os.path.isfile(index_path):
    return []  # read_configs reports the missing file
  try:
    folders = component_folders(read_json(index_path, "model_index.json"))
  except ModelLoadError:
    return []  # reported, with the folder, by read_configs
  var = f".{variant}" if variant else ""
  patterns = []
  for comp, sub in folders.items():
    if safetensors_files(os.path.join(folder, sub), _WEIGHT_STEMS[comp], variant):
      continue
    patterns.append(f"{sub}/{_FLAX_FILES[comp]}")
    if allow_pickle:
      patterns.append(f"{sub}/{_BIN_FILES[comp]}{var}.bin")
  return patterns


def fetch_model_from_hub(name: str, *, variant: str | None, revision: str | None,
                         allow_pickle: bool) -> str:
  """Fetches the files a hub model needs (safetensors first, fallbacks only where missing)."""
  folder = download_from_hub(name, revision=revision,
                             allow_patterns=_hub_patterns(variant, allow_pickle), what="model")
  fallbacks = _fallback_patterns(folder, variant, allow_pickle)
  if fallbacks:
    folder = download_from_hub(name, revision=revision, allow_patterns=fallbacks, what="model")
  return folder


TINY_MODELS = presets.TINY_MODELS  # kept importable here: the names this module resolves
DEFAULT_CACHE_DIR = "~/.cache/ti_jax"


def resolve_model_dir(name_or_path: str, *, variant: str | None = None,
                      revision: str | None = None, allow_pickle: bool = False,
                      cache_dir: str = DEFAULT_CACHE_DIR) -> str:
  """Returns a local diffusers folder for `name_or_path`.

  A folder is used as is; "tiny-world" is the trained model shipped in the package
  (`presets.SHIPPED_MODELS`); "tiny-sd15"/"tiny-sd21"/"tiny-ldm" name ti_jax's
  random-weight test models, written under `cache_dir` on first use; anything else is a hub
  id, of which only the needed files are fetched.
  """
  if os.path.isdir(name_or_path):
    return name_or_path
  if name_or_path in presets.SHIPPED_MODELS:
    folder = presets.SHIPPED_MODELS[name_or_path]
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
      raise ModelLoadError(f"the shipped model {name_or_path} is missing from {folder}; "
                           "reinstall ti_jax")
    return folder
  if name_or_path in TINY_MODELS:
    return ensure_tiny_model(os.path.join(os.path.expanduser(cache_dir), name_or_path),
                             preset=name_or_path)
  return fetch_model_from_hub(name_or_path, variant=variant, revision=revision,
                              allow_pickle=allow_pickle)


def read_json(path: str, what: str) -> dict:
  """A JSON object from `path`; `ModelLoadError` naming `what` if missing or unreadable."""
  if not os.path.isfile(path):
    raise ModelLoadError(f"missing {what}: {path}")
  try:
    obj = json.loads(fileio.read_small_file(path).decode("utf-8"))  # never a pipe or device
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise ModelLoadError(f"cannot read {what} {path}: {console.one_line(e)}") from None
  if not isinstance(obj, dict):
    raise ModelLoadError(f"cannot read {what} {path}: not a JSON object")
  return obj


def safetensors_files(folder: str, stem: str, variant: str | None = None) -> list[str]:
  """`folder/stem[.variant].safetensors`, or the shards its index names; [] if neither exists.

  A variant's index is `stem.variant.safetensors.index.json` or, as diffusers' and
  transformers' `save_pretrained(variant=..., max_shard_size=...)` name it,
  `stem.safetensors.index.variant.json`.
  """
  var = f".{variant}" if variant else ""
  single = os.path.join(folder, f"{stem}{var}.safetensors")
  if os.path.isfile(single):
    return [single]
  index = single + ".index.json"
  if variant and not os.path.isfile(index):
    index = os.path.join(folder, f"{stem}.safetensors.index{var}.json")
  if os.path.isfile(index):
    weight_map = read_json(index, "safetensors index").get("weight_map", {})
    # A hand-edited or truncated index must fail here in one line, not as a TypeError
    # from os.path.join below.
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) and f for f in weight_map.values()):
      raise ModelLoadError(f"cannot read safetensors index {index}: weight_map must map "
                           "tensor names to shard file names")
    return [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
  return []


def read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
  """One state dict from safetensors files (shards); one-line errors for missing or bad files."""
  state: dict[str, np.ndarray] = {}
  for f in files:
    if not os.path.isfile(f):
      raise ModelLoadError(f"missing weight shard: {f}")
    try:
      state.update(safetensors_io.load(f))
    except (OSError, ValueError) as e:
      raise ModelLoadError(f"cannot read {f}: {console.one_line(e)}") from None
  return state


def read_torch_pickle(path: str, allow_pickle: bool, how_to_allow: str) -> dict[str, np.ndarray]:
  """A PyTorch `.bin` state dict as numpy, only if `allow_pickle` (pickles can run code).

  `how_to_allow` names the switch in the refusal, e.g. "--allow_pickle".
  Half-precision tensors come back as float32 (numpy has no bfloat16).
  """
  if not allow_pickle:
    raise ModelLoadError(
        f"{path} is a pickle, which can run code when loaded; convert it to safetensors "
        f"or pass allow_pickle ({how_to_allow}) if you trust it")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ModelLoadError(f"{path} is a PyTorch pickle and needs torch installed") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for bad pickles
    raise ModelLoadError(f"cannot read {path}: {console.one_line(e)}") from None
  return {k: v.float().numpy() if v.dtype in (torch.bfloat16, torch.float16) else v.numpy()
          for k, v in state.items()}


def load_component_weights(folder: str, component: str, *, variant: str | None = None,
                           allow_pickle: bool = False, subfolder: str | None = None
                           ) -> tuple[str, Any]:
  """Reads one component's weights from `folder/subfolder` (default subfolder: the role name).

  Returns `("torch", {key: array})` for PyTorch-layout weights or
  `("flax", tree)` for a Flax msgpack. Raises `ModelLoadError` if none is usable.
  """
  sub = os.path.join(folder, subfolder or component)
  files = safetensors_files(sub, _WEIGHT_STEMS[component], variant)
  if files:
    return "torch", read_safetensors(files)
  flax_file = os.path.join(sub, _FLAX_FILES[component])
  if os.path.isfile(flax_file):
    from flax import serialization  # pylint: disable=import-outside-toplevel
    try:
      with open(flax_file, "rb") as fh:
        return "flax", serialization.msgpack_restore(fh.read())
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
      raise ModelLoadError(f"cannot read {flax_file}: {console.one_line(e)}") from None
  var = f".{variant}" if variant else ""
  bin_file = os.path.join(sub, f"{_BIN_FILES[component]}{var}.bin")
  if os.path.isfile(bin_file):
    return "torch", read_torch_pickle(bin_file, allow_pickle, "--config.allow_pickle=True")
  raise ModelLoadError(
      f"no weights for {component} in {sub} (looked for {_WEIGHT_STEMS[component]}{var}.safetensors, "
      f"its sharded index, {_FLAX_FILES[component]} and {_BIN_FILES[component]}{var}.bin)")


def component_folders(model_index: dict) -> dict[str, str]:
  """Role -> subfolder for a model_index.json (one-line error for unsupported pipelines)."""
  cls = model_index.get("_class_name") or "StableDiffusionPipeline"
  if cls not in PIPELINE_FOLDERS:
    raise ModelLoadError(f"pipeline {cls!r} is not supported (ti_jax loads "
                         f"{' and '.join(PIPELINE_FOLDERS)} folders)")
  folders = PIPELINE_FOLDERS[cls]
  vae_class = (model_index.get(folders["vae"]) or [None, None])[1]
  if vae_class not in (None, "AutoencoderKL"):
    raise ModelLoadError(f"{folders['vae']} is a {vae_class}; ti_jax supports AutoencoderKL "
                         "latent spaces only")
  return folders


def read_configs(folder: str) -> dict[str, dict]:
  """Reads model_index.json and each component's config (keyed by role) from a diffusers folder."""
  if not os.path.isdir(folder):
    raise ModelLoadError(f"model folder not found: {folder}")
  index = read_json(os.path.join(folder, "model_index.json"), "model_index.json")
  try:
    folders = component_folders(index)
  except ModelLoadError as e:
    raise ModelLoadError(f"{folder}: {e}") from None
  configs = {"model_index": index}
  for comp in folders:
    configs[comp] = read_json(os.path.join(folder, folders[comp], "config.json"),
                               f"{folders[comp]} config")
  configs["scheduler"] = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"),
                                    "scheduler config")
  return configs


def load_tokenizer(folder: str, model_index: dict | None = None, max_length: int | None = None,
                   subfolder: str = "tokenizer"):
  """The tokenizer of a diffusers folder: the class model_index.json names (CLIP, BERT or T5).

  `max_length` (the text encoder's positions) caps `model_max_length`: BERT
  tokenizers declare 512, but LDMBert reads 77 tokens, and every prompt is
  padded or cut to `model_max_length`. `subfolder` "tokenizer_2" is SDXL's second
  (and FLUX.1's T5 tokenizer, whose encoder has no positions to cap it: None).
  """
  path = os.path.join(folder, subfolder)
  if not os.path.isdir(path):
    raise ModelLoadError(f"missing tokenizer folder: {path}")
  entry = (model_index or {}).get(subfolder) or [None, "CLIPTokenizer"]
  name = entry[1] or "CLIPTokenizer"
  if name not in _TOKENIZERS:
    raise ModelLoadError(f"{path}: tokenizer class {name!r} is not supported "
                         f"(supported: {', '.join(_TOKENIZERS)})")
  import transformers  # pylint: disable=import-outside-toplevel
  try:
    tokenizer = getattr(transformers, name).from_pretrained(path, local_files_only=True)
  except Exception as e:  # transformers raises OSError/ValueError/TypeError for bad folders
    raise ModelLoadError(f"cannot load tokenizer from {path}: {console.one_line(e)}") from None
  if max_length and tokenizer.model_max_length > max_length:
    tokenizer.model_max_length = max_length
  return tokenizer


def load_stable_diffusion(name_or_path: str, *, dtype: Any = jnp.float32,
                          param_dtype: Any = jnp.float32, variant: str | None = None,
                          revision: str | None = None, allow_pickle: bool = False,
                          attention_impl: str | None = None,
                          cache_dir: str = DEFAULT_CACHE_DIR,
                          vae_dtype: Any = None, remat: bool = False,
                          tokenizer: str | None = None, vae_file: str | None = None,
                          clip_l_file: str | None = None,
                          t5_file: str | None = None) -> StableDiffusion:
  """Loads a diffusers-format Stable Diffusion 1.x/2.x/XL, LDM-1.4B or FLUX.1 text-to-image model.

  A file instead of a folder is an original-layout single-file checkpoint
  (`ti_jax/weights/single_file.py`); FLUX.1's BFL-layout transformer file, with its
  companions (`vae_file`, `clip_l_file`, `t5_file`), is `ti_jax/weights/flux_files.py`'s.
  A FLUX.1 model comes back with `transformer`/`transformer_params` set and no UNet
  (`StableDiffusion.is_flux`).

  Args:
    name_or_path: a local diffusers folder or a hub id such as
      "stable-diffusion-v1-5/stable-diffusion-v1-5",
      "stabilityai/stable-diffusion-xl-base-1.0" or
      "CompVis/ldm-text2im-large-256", "black-forest-labs/FLUX.1-schnell" (only the needed
      files are fetched; never pickles unless `allow_pickle`).
    dtype: compute dtype of the Flax modules (float32 or bfloat16).
    param_dtype: dtype the weights are stored in on the host/device.
    variant: weight file variant, e.g. "fp16" for `*.fp16.safetensors`.
    revision: hub revision.
    allow_pickle: permit `.bin` pickles (which can execute code) when no
      safetensors/msgpack weights exist. Needs torch.
    attention_impl: `jax.nn.dot_product_attention` implementation, or "pallas_tpu"; None or ""
      chooses (the Pallas kernel on a TPU host, JAX's choice elsewhere).
    cache_dir: where the tiny random-weight models are written.
    vae_dtype: compute and param dtype of the VAE (default: `dtype`/`param_dtype`; float32
      for SDXL, whose VAE overflows in half precision).
    remat: rematerialise the UNet's resnets and transformers (Flux: its blocks) when
      differentiated.
    tokenizer: single files only (a folder has its own): a tokenizer folder or hub id;
      None: the model family's.
    vae_file, clip_l_file, t5_file: FLUX.1 single files only: the VAE (`ae.safetensors`),
      CLIP-L (`clip_l.safetensors`) and T5 (`t5xxl_fp16.safetensors`) files; None: the
      transformer file's own component (an all-in-one file), else the file of that
      name beside it.

  Raises:
    ModelLoadError: with a one-line message for any unusable input.
  """
  # --- single-file checkpoints (A1111/ComfyUI layout): owned by single_file.py ---
  if single_file.is_single_file(name_or_path):
    if flux_files.is_flux_file(name_or_path):
      return flux_files.load_flux_single_file(
          name_or_path, tokenizer=tokenizer, dtype=dtype, param_dtype=param_dtype,
          allow_pickle=allow_pickle, attention_impl=attention_impl, vae_dtype=vae_dtype,
          remat=remat, vae_file=vae_file, clip_l_file=clip_l_file, t5_file=t5_file)
    return single_file.load_single_file(
        name_or_path, tokenizer=tokenizer, dtype=dtype, param_dtype=param_dtype,
        allow_pickle=allow_pickle, attention_impl=attention_impl, vae_dtype=vae_dtype,
        remat=remat)
  # --- end single-file ---
  folder = resolve_model_dir(name_or_path, variant=variant, revision=revision,
                             allow_pickle=allow_pickle, cache_dir=cache_dir)
  configs = read_configs(folder)
  folders = component_folders(configs["model_index"])
  if vae_dtype is None and "text_encoder_2" in folders:
    # SDXL's VAE overflows in fp16 (diffusers' force_upcast), as does FLUX.1's (force_upcast).
    vae_dtype = jnp.float32
  modules = build_modules(configs, dtype=dtype, param_dtype=param_dtype,
                          attention_impl=attention_impl, vae_dtype=vae_dtype, remat=remat)
  shapes = param_shapes(modules)
  params = {}
  for comp in folders:
    store_dtype = (vae_dtype or param_dtype) if comp == "vae" else param_dtype
    kind, weights = load_component_weights(folder, comp, variant=variant,
                                           allow_pickle=allow_pickle, subfolder=folders[comp])
    try:
      if kind == "torch":
        tree = convert.convert_torch_state_dict(component_spec(comp, configs[comp]), weights,
                                                shapes[comp],
                                                dtype=np.dtype(store_dtype))
      else:
        tree = convert.normalize_legacy_flax_tree(weights)
        convert.check_flax_tree(comp, tree, shapes[comp])
        tree = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(np.dtype(store_dtype)), tree)
    except convert.ConversionError as e:
      raise ModelLoadError(f"{folder}: {e}") from None
    params[comp] = tree
  tokenizers = {role: load_tokenizer(folder, configs["model_index"],
                                     getattr(modules[role].config, "max_position_embeddings",
                                             None), sub)
                for role, sub in TOKENIZER_FOLDERS.items() if role in modules}
  return assemble(name_or_path, folder, modules, params, tokenizers, configs["scheduler"],
                  configs["model_index"])
