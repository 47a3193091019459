"""Single-file Stable Diffusion checkpoints in the original (CompVis/Stability) layout.

The files A1111, ComfyUI and Civitai pass around hold the whole model in one
state dict under the original module names:

  model.diffusion_model.*              the UNet (input_blocks / middle_block / output_blocks)
  first_stage_model.*                  the KL autoencoder (encoder.down.{i}.block.{j}, mid.attn_1)
  cond_stage_model.transformer.*       SD 1.x: transformers' CLIP text model
  cond_stage_model.model.*             SD 2.x: OpenCLIP ViT-H text tower (fused in_proj)
  conditioner.embedders.0.transformer.*  SDXL base: CLIP ViT-L (text_encoder)
  conditioner.embedders.1.model.*      SDXL base: OpenCLIP bigG with projection (text_encoder_2);
                                       the UNet's added text_time embedding is label_emb.0.*

`load_single_file(path)` recognises the family from the keys and shapes,
chooses the matching architecture preset (`presets.py`), renames each key to
the diffusers/transformers name (`original_layout.diffusers_to_original`, the
one owner of that mapping, read in the other direction by the writer in
`ti_jax.testing.single_file_models`) and then converts and builds exactly as
a diffusers folder is (`pipeline.build_modules`, `convert.convert_torch_state_dict`).

The conversion happens in memory, on the memory-mapped file: the renamed
arrays are views (a slice of OpenCLIP's fused q/k/v, a squeezed 1x1 conv, a
transpose), so the only copy is the Flax tree itself, as when a folder is
loaded, and a 7 GB file is never written out a second time as a cache folder.

What weights cannot say comes from the family: the GroupNorm groups and
attention heads (from the preset whose shapes the file matches), the
scheduler (the preset's), and the prediction type: a file's
`modelspec.prediction_type` metadata when present, else epsilon for SD 1.x
and, as diffusers does for files without a training step, v-prediction for
SD 2.x (the 768 px 2.0/2.1 models; the 512 px "base" models are epsilon:
load those from their diffusers folder). Single files hold no tokenizer:
`tokenizer` names a local folder (the tokenizer files, or a diffusers folder
with tokenizer/ and, for SDXL, tokenizer_2/ subfolders) or a hub id, by
default the family's own (`DEFAULT_TOKENIZERS`), of which only tokenizer
files are fetched. SDXL's loading needs the SDXL models and presets ("sdxl",
"tiny-sdxl"); without them an SDXL file is refused in one line.

FLUX.1's single files (`double_blocks.` keys) are `flux_files`'s: the loader
(`loading.load_stable_diffusion`) sends them there before they reach this module,
which refuses them as it refuses SD3's.

Anything else (inpainting or depth UNets, the SDXL refiner, upscalers,
diffusion transformers such as SD3, a diffusers component file) is
refused with one line naming what was found.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from ti_jax.runtime import console
from ti_jax.weights import pipeline, presets, safetensors_io
from ti_jax.weights.original_layout import (
  CLIP_PREFIX,
  OPENCLIP_PREFIX,
  SDXL_CLIP_PREFIX,
  SDXL_OPENCLIP_PREFIX,
  TEXT_ENCODERS,
  UNET_PREFIX,
  VAE_PREFIX,
  apply_op,
  diffusers_to_original,
  torch_shapes,
)

ModelLoadError = pipeline.ModelLoadError


SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Per family: the presets a file may match (full size first) and the default tokenizers'
# hub repo (a tokenizer repo, or a diffusers repo with tokenizer/ and tokenizer_2/).
FAMILY_PRESETS = {"sd1": ("sd15", "tiny-sd15"), "sd2": ("sd21", "tiny-sd21"),
                  "sdxl": ("sdxl", "tiny-sdxl")}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
DEFAULT_TOKENIZERS = {
    "sd1": "openai/clip-vit-large-patch14",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
TOKENIZER_FOLDERS = pipeline.TOKENIZER_FOLDERS  # the diffusers tokenizer folder of each text encoder
_PREDICTION_TYPES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction",
                     "v_prediction": "v_prediction"}
_TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer_config.json",
                    "special_tokens_map.json", "tokenizer.json", "added_tokens.json"]

# Keys under a component prefix that hold no parameter of the diffusers model:
# buffers, OpenCLIP's unused projection and temperature, SD 2.x's last
# resblock (the text encoder is read at its penultimate layer).
_IGNORED = (
    re.compile(r"\.position_ids$"),
    re.compile(r"\.model\.(text_projection|logit_scale|attn_mask)$"),
    re.compile(r"^first_stage_model\.loss\."),
)



# ---------------------------------------------------------------------------
# Recognising the architecture.


def _has(keys, prefix: str) -> bool:
  return any(k.startswith(prefix) for k in keys)


def detect_family(shapes: Mapping[str, tuple[int, ...]], path: str) -> str:
  """"sd1", "sd2" or "sdxl" from the keys and shapes; `ModelLoadError` naming what else was found."""
  keys = list(shapes)
  transformer_blocks = ("joint_blocks.", "double_blocks.", UNET_PREFIX + "joint_blocks.",
                        UNET_PREFIX + "double_blocks.")
  if any(k.startswith(transformer_blocks) for k in keys):
    raise ModelLoadError(f"{path}: a diffusion transformer (SD3/Flux layout) is not supported")
  if not _has(keys, UNET_PREFIX):
    if any(k.startswith(("down_blocks.", "conv_in.", "encoder.down_blocks.", "text_model."))
           for k in keys):
      raise ModelLoadError(f"{path}: a diffusers/transformers component file, not a full "
                           "checkpoint; pass the diffusers folder it belongs to")
    raise ModelLoadError(f"{path}: no Stable Diffusion single-file layout recognised "
                         "(no model.diffusion_model.* UNet keys)")
  conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
  if conv_in is None:
    raise ModelLoadError(f"{path}: the UNet has no input_blocks.0.0 conv_in; not an SD layout")
  if conv_in[1] != 4:
    raise ModelLoadError(
        f"{path}: the UNet takes {conv_in[1]} input channels (an inpainting, depth or "
        "upscaling model); ti_jax loads text-to-image UNets with 4 latent channels")
  if _has(keys, "conditioner.embedders."):
    if not (_has(keys, SDXL_CLIP_PREFIX + "text_model.")
            and _has(keys, SDXL_OPENCLIP_PREFIX + "transformer.resblocks.")):
      raise ModelLoadError(f"{path}: an SDXL refiner or other conditioner layout (not CLIP "
                           "ViT-L + OpenCLIP bigG) is not supported")
    if not _has(keys, VAE_PREFIX):
      raise ModelLoadError(f"{path}: no first_stage_model.* (VAE) keys; ti_jax needs a full "
                           "checkpoint with UNet, VAE and text encoders")
    return "sdxl"
  if _has(keys, UNET_PREFIX + "label_emb."):
    raise ModelLoadError(f"{path}: a class-conditioned UNet (label_emb) is not supported")
  if not _has(keys, VAE_PREFIX):
    raise ModelLoadError(f"{path}: no first_stage_model.* (VAE) keys; ti_jax needs a full "
                         "checkpoint with UNet, VAE and text encoder")
  if _has(keys, CLIP_PREFIX + "text_model."):
    family = "sd1"
  elif _has(keys, OPENCLIP_PREFIX + "transformer.resblocks."):
    family = "sd2"
  else:
    raise ModelLoadError(f"{path}: no cond_stage_model.* text encoder of a known kind "
                         "(CLIP for SD 1.x, OpenCLIP for SD 2.x)")
  return family


def _text_signature(family: str, component: str, shapes: Mapping[str, tuple[int, ...]]) -> dict:
  """Width, MLP width, depth, vocabulary and positions of one text encoder in the file."""
  kind, prefix = TEXT_ENCODERS[family][component]
  if kind == "clip":
    t = prefix + "text_model."
    keys = {"hidden": t + "final_layer_norm.weight", "mlp": t + "encoder.layers.0.mlp.fc1.weight",
            "layers": t + "encoder.layers.", "vocab": t + "embeddings.token_embedding.weight",
            "positions": t + "embeddings.position_embedding.weight"}
  else:
    keys = {"hidden": prefix + "ln_final.weight",
            "mlp": prefix + "transformer.resblocks.0.mlp.c_fc.weight",
            "layers": prefix + "transformer.resblocks.",
            "vocab": prefix + "token_embedding.weight", "positions": prefix + "positional_embedding"}
  depth = len({k[len(keys["layers"]):].split(".")[0] for k in shapes
               if k.startswith(keys["layers"])})
  if family == "sd2":
    depth -= 1  # the diffusers SD 2.x text encoder stops before OpenCLIP's last resblock
  get = lambda name: shapes.get(keys[name], (None,))[0]
  return {"hidden_size": get("hidden"), "intermediate_size": get("mlp"),
          "num_hidden_layers": depth, "vocab_size": get("vocab"),
          "max_position_embeddings": get("positions")}


def _file_signature(family: str, shapes: Mapping[str, tuple[int, ...]]) -> dict:
  """The architecture fields the weights show, read from an original-layout file."""
  u = {k[len(UNET_PREFIX):]: v for k, v in shapes.items() if k.startswith(UNET_PREFIX)}
  blocks, layers, kinds, depths, width = [], [], [], [], None
  n = 1
  while any(k.startswith(f"input_blocks.{n}.") for k in u):
    if f"input_blocks.{n}.0.op.weight" in u:  # a downsampler ends the block
      blocks.append(width)
    else:
      width = u.get(f"input_blocks.{n}.0.in_layers.2.weight", (None,))[0]
      if len(layers) == len(blocks):  # the first resnet of a block
        layers.append(0)
        kinds.append("DownBlock2D")
        depths.append(1)
      layers[-1] += 1
      attention = f"input_blocks.{n}.1.transformer_blocks."
      if any(k.startswith(attention) for k in u):
        kinds[-1] = "CrossAttnDownBlock2D"
        depths[-1] = len({k[len(attention):].split(".")[0] for k in u if k.startswith(attention)})
    n += 1
  blocks.append(width)
  context = next((v[1] for k, v in sorted(u.items()) if k.endswith("attn2.to_k.weight")), None)
  proj_in = next((v for k, v in sorted(u.items()) if k.endswith(".proj_in.weight")), ())
  v = {k[len(VAE_PREFIX):]: s for k, s in shapes.items() if k.startswith(VAE_PREFIX)}
  vae_blocks, i = [], 0
  while f"encoder.down.{i}.block.0.conv1.weight" in v:
    vae_blocks.append(v[f"encoder.down.{i}.block.0.conv1.weight"][0])
    i += 1
  out = {
      "unet.block_out_channels": blocks, "unet.layers_per_block": layers[0] if layers else None,
      "unet.down_block_types": kinds, "unet.cross_attention_dim": context,
      "unet.use_linear_projection": len(proj_in) == 2,
      "unet.transformer_layers_per_block": depths,
      "vae.block_out_channels": vae_blocks,
      # quant_conv maps to the latent mean and log-variance: twice the latent channels.
      "vae.latent_channels": v.get("quant_conv.weight", (0,))[0] // 2,
  }
  for comp in TEXT_ENCODERS[family]:
    for name, value in _text_signature(family, comp, shapes).items():
      if name not in _READ_FROM_FILE:
        out[f"{comp}.{name}"] = value
  return out


# Text-encoder fields the preset does not fix (tiny models size their vocabulary
# to their tokenizer): always taken from the file.
_READ_FROM_FILE = ("vocab_size", "max_position_embeddings")


def _preset_signature(configs: dict, fields) -> dict:
  """The preset's values of the signature `fields` ("component.name")."""
  out = {}
  for field in fields:
    comp, name = field.split(".")
    value = configs[comp].get(name)
    if name == "transformer_layers_per_block":  # an int means the same for every block
      value = value or 1
      if isinstance(value, int):
        value = [value] * len(configs["unet"]["block_out_channels"])
    out[field] = list(value) if isinstance(value, (list, tuple)) else value
  return out


def configs_for(family: str, shapes: Mapping[str, tuple[int, ...]], path: str
                ) -> tuple[str, dict[str, dict]]:
  """(preset name, diffusers component configs) for the file's shapes; one-line refusal if none fits."""
  found = _file_signature(family, shapes)
  for name in FAMILY_PRESETS[family]:
    if name not in presets.PRESETS:
      continue
    configs = presets.preset(name)
    if _preset_signature(configs, found) == found:
      break
  else:
    shown = ", ".join(f"{k}={v}" for k, v in found.items())
    raise ModelLoadError(f"{path}: a {FAMILY_NAMES[family]} layout whose shapes match no known "
                         f"architecture ({', '.join(FAMILY_PRESETS[family])}): {shown}")
  for comp in TEXT_ENCODERS[family]:
    sig = _text_signature(family, comp, shapes)
    configs[comp].update({k: int(sig[k]) for k in _READ_FROM_FILE})
  return name, configs


def prediction_type(family: str, metadata: Mapping[str, str], configs: dict) -> str:
  """The file's `modelspec.prediction_type` metadata if it has one, else the family preset's."""
  declared = (metadata or {}).get("modelspec.prediction_type", "").strip().lower()
  if declared in _PREDICTION_TYPES:
    return _PREDICTION_TYPES[declared]
  return configs["scheduler"]["prediction_type"]


# ---------------------------------------------------------------------------
# Reading the file and renaming its keys.


def read_checkpoint(path: str, allow_pickle: bool) -> tuple[dict[str, np.ndarray], dict]:
  """(state dict, safetensors metadata) of a single file; pickles only with `allow_pickle`."""
  lower = path.lower()
  if not os.path.isfile(path):
    raise ModelLoadError(f"checkpoint file not found: {path}")
  if lower.endswith(SAFETENSORS_SUFFIXES):
    try:
      metadata = safetensors_io.read_header(path).get("__metadata__") or {}
      return safetensors_io.load(path), metadata
    except (OSError, ValueError) as e:
      raise ModelLoadError(f"cannot read {path}: {console.one_line(e)}") from None
  if not lower.endswith(PICKLE_SUFFIXES):
    raise ModelLoadError(f"{path}: not a model folder nor a .safetensors/.ckpt checkpoint file")
  if not allow_pickle:
    raise ModelLoadError(
        f"{path} is a pickle, which can run code when loaded; convert it to safetensors "
        "or pass allow_pickle (--config.allow_pickle=True) if you trust it")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ModelLoadError(f"{path} is a PyTorch pickle and needs torch installed") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  torch raises many types for bad pickles
    raise ModelLoadError(f"cannot read {path}: {console.one_line(e)}") from None
  state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
  if not isinstance(state, dict):
    raise ModelLoadError(f"{path}: the pickle holds no state dict")
  return {k: v.float().numpy() if v.dtype in (torch.bfloat16, torch.float16) else v.numpy()
          for k, v in state.items() if isinstance(v, torch.Tensor)}, {}


def component_state_dicts(family: str, state: Mapping[str, np.ndarray], configs: dict,
                          expected: dict[str, dict[str, tuple[int, ...]]], path: str
                          ) -> dict[str, dict[str, np.ndarray]]:
  """Per component, the diffusers-named state dict taken from an original-layout file.

  `expected`: per component, diffusers key -> shape of the model built from `configs`.
  A key the model needs but the file lacks, or a component key the model has
  no place for, is a one-line `ModelLoadError`.
  """
  out, used = {}, set()
  for comp, keys in expected.items():
    out[comp] = {}
    for key in keys:
      source = diffusers_to_original(family, comp, key, configs[comp])
      if source.key not in state:
        raise ModelLoadError(f"{path}: {comp} weight {key} is missing (looked for {source.key})")
      out[comp][key] = apply_op(source.op, state[source.key])
      used.add(source.key)
  prefixes = (UNET_PREFIX, VAE_PREFIX) + tuple(p for _, p in TEXT_ENCODERS[family].values())
  last_block = (f"{OPENCLIP_PREFIX}transformer.resblocks."
                f"{configs['text_encoder']['num_hidden_layers']}.")
  for key in state:
    if key in used or not key.startswith(prefixes) or any(p.search(key) for p in _IGNORED):
      continue
    if family == "sd2" and key.startswith(last_block):
      continue
    raise ModelLoadError(f"{path}: unexpected key {key} for a {FAMILY_NAMES[family]} model; "
                         "its architecture differs from the one recognised")
  return out


# ---------------------------------------------------------------------------
# Tokenizer and the whole model.


def tokenizer_folder(family: str, tokenizer: str | None) -> str:
  """A local folder holding the family's tokenizer(s); hub ids are fetched (tokenizer files only)."""
  name = tokenizer or DEFAULT_TOKENIZERS[family]
  if os.path.isdir(os.path.expanduser(name)):
    return os.path.expanduser(name)
  patterns = [f"{TOKENIZER_FOLDERS[comp]}/*" for comp in TEXT_ENCODERS[family]]
  return pipeline.download_from_hub(name, revision=None, allow_patterns=patterns + _TOKENIZER_FILES,
                                    what="tokenizer")


def load_tokenizer(folder: str, component: str, max_length: int):
  """The CLIP tokenizer of `component` from `folder`: its diffusers subfolder, else (for the
  first text encoder) the folder itself."""
  import transformers  # pylint: disable=import-outside-toplevel
  sub = os.path.join(folder, TOKENIZER_FOLDERS[component])
  if os.path.isdir(sub):
    folder = sub
  elif component != "text_encoder":
    raise ModelLoadError(f"missing tokenizer folder for {component}: {sub}")
  try:
    tok = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)
  except Exception as e:  # noqa: BLE001  transformers raises OSError/ValueError/TypeError for bad folders
    raise ModelLoadError(f"cannot load tokenizer from {folder}: {console.one_line(e)}") from None
  tok.model_max_length = min(tok.model_max_length, max_length)
  return tok


def is_single_file(name_or_path: str) -> bool:
  """Whether `pretrained_model_name_or_path` names a file (a single-file checkpoint) not a folder.

  A missing `*.safetensors`/`*.ckpt` path counts, so that it is reported as a missing file
  rather than looked up as a hub id.
  """
  path = os.path.expanduser(name_or_path)
  return os.path.isfile(path) or (
      not os.path.isdir(path) and path.lower().endswith((*SAFETENSORS_SUFFIXES, ".ckpt")))


def load_single_file(path: str, *, tokenizer: str | None = None, dtype: Any = jnp.float32,
                     param_dtype: Any = jnp.float32, allow_pickle: bool = False,
                     attention_impl: str | None = None, vae_dtype: Any = None,
                     remat: bool = False) -> pipeline.StableDiffusion:
  """Loads an original-layout SD 1.x/2.x/XL single-file checkpoint as `pipeline.StableDiffusion`.

  Args:
    path: a `.safetensors` file (or, with `allow_pickle`, a `.ckpt` pickle).
    tokenizer: a local tokenizer or diffusers folder, or a hub id; None: the
      family's default (`DEFAULT_TOKENIZERS`).
    dtype, param_dtype, attention_impl, vae_dtype, remat: as in
      `loading.load_stable_diffusion`.

  Raises:
    ModelLoadError: one line, for any file that is not a supported checkpoint.
  """
  path = os.path.expanduser(path)
  state, metadata = read_checkpoint(path, allow_pickle)
  shapes = {k: tuple(v.shape) for k, v in state.items()}
  family = detect_family(shapes, path)
  if not any(name in presets.PRESETS for name in FAMILY_PRESETS[family]):
    raise ModelLoadError(f"{path}: an {FAMILY_NAMES[family]} checkpoint; this version of ti_jax "
                         f"has no {FAMILY_NAMES[family]} models")
  preset_name, configs = configs_for(family, shapes, path)
  configs["scheduler"]["prediction_type"] = prediction_type(family, metadata, configs)
  components = ("unet", "vae", *TEXT_ENCODERS[family])
  if family == "sdxl" and vae_dtype is None:
    vae_dtype = jnp.float32  # SDXL's VAE overflows in half precision, as for its folders
  modules = pipeline.build_modules(configs, dtype=dtype, param_dtype=param_dtype,
                                   attention_impl=attention_impl, vae_dtype=vae_dtype, remat=remat)
  flax_shapes = pipeline.param_shapes(modules)
  specs = {comp: pipeline.component_spec(comp, configs[comp]) for comp in components}
  expected = {comp: torch_shapes(specs[comp], flax_shapes[comp]) for comp in components}
  weights = component_state_dicts(family, state, configs, expected, path)
  params = pipeline.convert_components(specs, weights, flax_shapes, path,
                                       param_dtype=param_dtype, vae_dtype=vae_dtype)
  # The tokenizers last: a bad file is reported before anything is fetched.
  folder = tokenizer_folder(family, tokenizer)
  tokenizers = {comp: load_tokenizer(folder, comp, configs[comp]["max_position_embeddings"])
                for comp in TEXT_ENCODERS[family]}
  if preset_name in presets.TINY_MODELS:
    # ti_jax's tiny models take their special tokens from their tokenizer (the full-size
    # presets keep the public configs' legacy ids, which decide CLIP's pooled position);
    # the shapes do not change, so the params stay.
    for comp, tok in tokenizers.items():
      configs[comp].update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    modules = pipeline.build_modules(configs, dtype=dtype, param_dtype=param_dtype,
                                     attention_impl=attention_impl, vae_dtype=vae_dtype,
                                     remat=remat)
  pipeline_class = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
  model_index = {"_class_name": pipeline_class, "single_file": os.path.basename(path),
                 "preset": preset_name}
  return pipeline.StableDiffusion(
      source=path, path=path,
      unet=modules["unet"], unet_params=params["unet"],
      vae=modules["vae"], vae_params=params["vae"],
      text_encoders=pipeline.text_encoders(modules, params, tokenizers),
      scheduler_config=configs["scheduler"], model_index=model_index)
