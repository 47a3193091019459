"""The original (CompVis/Stability) key layout of single-file checkpoints, mapped to diffusers'.

Each diffusers/transformers key of a component has one `Source` in the original
file: its key there and how the tensor is laid out (`diffusers_to_original`, the
one owner of that mapping). `ti_jax.weights.single_file` reads files through it
(`apply_op` turns an original tensor into the diffusers layout, as a view); the
test writer `ti_jax.testing.single_file_models` reads it the other way
(`invert_op`). `torch_shapes` gives the state-dict shapes a component's Flax
param tree converts from.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
from flax import traverse_util

from ti_jax.weights import convert

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x; then transformers' `text_model.*`
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL base: OpenCLIP ViT-bigG

# Per family, per text-encoder component: (kind, prefix). "clip" files hold
# transformers' CLIPTextModel keys under the prefix; "openclip" files OpenCLIP's
# (resblocks, fused in_proj).
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("clip", CLIP_PREFIX)},
    "sd2": {"text_encoder": ("openclip", OPENCLIP_PREFIX)},
    "sdxl": {"text_encoder": ("clip", SDXL_CLIP_PREFIX),
             "text_encoder_2": ("openclip", SDXL_OPENCLIP_PREFIX)},
}

_RESNET_RENAMES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                   ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                   ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION_RENAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                          "to_out.0": "proj_out"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one diffusers key's tensor is in the original file, and how it is laid out there.

  op: "" (as is), "conv1x1" (a 1x1 conv kernel [O, I, 1, 1] for a linear [O, I]),
  "T" (transposed), "qkv0"/"qkv1"/"qkv2" (a third of a fused [3D, ...] in_proj).
  """
  key: str
  op: str = ""


def _split(name: str) -> tuple[str, str]:
  """"a.b.c.weight" -> ("a.b.c", "weight")."""
  module, _, leaf = name.rpartition(".")
  return module, leaf


def _unet_source(key: str, cfg: dict) -> Source:
  """The original-layout UNet key (without prefix) of a diffusers UNet key."""
  module, leaf = _split(key)
  if module in _UNET_TOP:
    return Source(f"{_UNET_TOP[module]}.{leaf}")
  per = cfg["layers_per_block"] + 1  # an original input block per resnet, + the downsampler
  parts = key.split(".")

  def resnet(rest: str) -> str:
    for old, new in _RESNET_RENAMES:
      if rest == old or rest.startswith(old + "."):
        return new + rest[len(old):]
    return rest

  if parts[0] == "down_blocks":
    block, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.weight
      return Source(f"input_blocks.{1 + block * per + per - 1}.0.op.{leaf}")
    index = 1 + block * per + j
    if kind == "resnets":
      return Source(f"input_blocks.{index}.0.{resnet(rest)}")
    return Source(f"input_blocks.{index}.1.{rest}")
  if parts[0] == "mid_block":
    kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
    if kind == "resnets":
      return Source(f"middle_block.{2 * j}.{resnet(rest)}")
    return Source(f"middle_block.1.{rest}")
  if parts[0] == "up_blocks":
    block, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if kind == "upsamplers":  # after the resnet (and the attention, in cross-attention blocks)
      slot = 2 if "CrossAttn" in cfg["up_block_types"][block] else 1
      return Source(f"output_blocks.{block * per + per - 1}.{slot}.conv.{leaf}")
    index = block * per + j
    if kind == "resnets":
      return Source(f"output_blocks.{index}.0.{resnet(rest)}")
    return Source(f"output_blocks.{index}.1.{rest}")
  raise KeyError(key)


def _vae_source(key: str, cfg: dict) -> Source:
  """The original-layout VAE key (without prefix) of a diffusers AutoencoderKL key."""
  parts = key.split(".")
  _, leaf = _split(key)
  if parts[0] not in ("encoder", "decoder"):
    return Source(key)  # quant_conv, post_quant_conv
  side, what = parts[0], parts[1]
  if what in ("conv_in", "conv_out"):
    return Source(key)
  if what == "conv_norm_out":
    return Source(f"{side}.norm_out.{leaf}")
  if what == "mid_block":
    kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
    if kind == "resnets":
      return Source(f"{side}.mid.block_{j + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}")
    rest_module, _ = _split(rest)
    op = "conv1x1" if leaf == "weight" and rest_module != "group_norm" else ""
    return Source(f"{side}.mid.attn_1.{_VAE_ATTENTION_RENAMES[rest_module]}.{leaf}", op)
  # encoder.down_blocks.i / decoder.up_blocks.i (the original numbers up blocks from the bottom)
  block, kind, rest = int(parts[2]), parts[3], ".".join(parts[4:])
  if what == "down_blocks":
    stage = f"{side}.down.{block}"
  else:
    stage = f"{side}.up.{len(cfg['up_block_types']) - 1 - block}"
  if kind in ("downsamplers", "upsamplers"):  # ...samplers.0.conv.weight
    return Source(f"{stage}.{kind[:-2]}.{'.'.join(parts[5:])}")
  return Source(f"{stage}.block.{rest.replace('conv_shortcut', 'nin_shortcut')}")


def _openclip_source(key: str, prefix: str) -> Source:
  """The original-layout OpenCLIP key (with `prefix`) of a transformers CLIP text key."""
  module, leaf = _split(key)
  fixed = {"text_model.embeddings.token_embedding": "token_embedding",
           "text_model.final_layer_norm": "ln_final"}
  if key == "text_model.embeddings.position_embedding.weight":
    return Source(prefix + "positional_embedding")
  if key == "text_projection.weight":
    return Source(prefix + "text_projection", "T")
  if module in fixed:
    return Source(f"{prefix}{fixed[module]}.{leaf}")
  m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", module)
  if not m:
    raise KeyError(key)
  layer, sub = m.groups()
  base = f"{prefix}transformer.resblocks.{layer}."
  qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
  if sub in qkv:
    return Source(f"{base}attn.in_proj_{leaf}", f"qkv{qkv.index(sub)}")
  return Source(f"{base}{_OPENCLIP_LAYER[sub]}.{leaf}")


def diffusers_to_original(family: str, component: str, key: str, config: dict) -> Source:
  """Where the tensor of diffusers/transformers `key` of `component` lies in an original file.

  `config` is the component's diffusers config. The one mapping between the two
  layouts: the loader reads it one way, the test writer the other.
  """
  if component == "unet":
    source = _unet_source(key, config)
    return Source(UNET_PREFIX + source.key, source.op)
  if component == "vae":
    source = _vae_source(key, config)
    return Source(VAE_PREFIX + source.key, source.op)
  kind, prefix = TEXT_ENCODERS[family][component]
  if kind == "clip":
    return Source(prefix + key)
  return _openclip_source(key, prefix)


def apply_op(op: str, array: np.ndarray) -> np.ndarray:
  """The diffusers-layout tensor from its original-layout one (a view, no copy)."""
  if op == "conv1x1":
    return array[:, :, 0, 0]
  if op == "T":
    return array.T
  if op.startswith("qkv"):
    third = array.shape[0] // 3
    i = int(op[3])
    return array[i * third:(i + 1) * third]
  return array


def invert_op(op: str, arrays: list[np.ndarray]) -> np.ndarray:
  """The original-layout tensor from its diffusers-layout part(s) (q, k, v in order for in_proj)."""
  if op == "conv1x1":
    return arrays[0][:, :, None, None]
  if op == "T":
    return arrays[0].T
  if op.startswith("qkv"):
    return np.concatenate(arrays, axis=0)
  return arrays[0]


def torch_shapes(spec: convert.ComponentSpec, flax_shapes: Any) -> dict[str, tuple[int, ...]]:
  """PyTorch key -> PyTorch shape of the state dict that converts onto a Flax param-shape tree."""
  out = {}
  for path, leaf_value in traverse_util.flatten_dict(flax_shapes).items():
    *module, leaf = path
    shape = tuple(leaf_value.shape)
    if leaf == "kernel":
      shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
      leaf = "weight"
    elif leaf in ("scale", "embedding"):
      leaf = "weight"
    # CLIPTextModelWithProjection's text_projection sits beside `text_model.*`.
    unprefixed = module and module[0] in getattr(spec, "unprefixed", ())
    prefix = "" if unprefixed else spec.strip_prefix
    out[prefix + convert.path_to_torch_key(module) + "." + leaf] = shape
  return out
