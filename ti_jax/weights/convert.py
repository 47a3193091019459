"""Conversion between PyTorch-layout diffusers/transformers weights and ti_jax's Flax params.

ti_jax's Flax modules use the PyTorch parameter names with list indices folded
into the module name (`down_blocks.0.resnets.1.conv1.weight` ->
`down_blocks_0/resnets_1/conv1/kernel`), so conversion is a rename plus a
layout change decided by the target leaf:

  conv weight   [O, I, kh, kw] -> kernel [kh, kw, I, O]
  linear weight [O, I]         -> kernel [I, O]
  norm weight   [C]            -> scale  [C]
  embedding     [V, D]         -> embedding [V, D]

The conversion is planned on shapes alone (`plan_conversion`), so the
full-size structure tests can check real SD checkpoints without memory, and
every mismatch is reported as one line with the key and both shapes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

# Module names that are lists in PyTorch (`resnets.0`) and so carry an index
# suffix in Flax (`resnets_0`). Used to turn Flax names back into PyTorch keys.
INDEXED_MODULES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "to_out", "net", "layers",
    "block", "layer",  # transformers' T5 (`encoder.block.0.layer.1`)
    "single_transformer_blocks",  # Flux
})

# Names used by older checkpoints (diffusers' legacy VAE attention, diffusers'
# Flax models) for what are now to_q/to_k/to_v/to_out.0.
_LEGACY_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}


class ConversionError(ValueError):
  """Checkpoint weights do not fit the model built from its config."""


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
  """How one model component's checkpoint keys relate to its Flax tree."""
  name: str  # "unet", "vae", "text_encoder": used in error messages
  strip_prefix: str = ""  # e.g. "text_model." for transformers' CLIPTextModel
  ignore: tuple[str, ...] = ()  # regexes of checkpoint keys that hold no parameter
  # Top-level modules whose keys sit outside `strip_prefix` (CLIPTextModelWithProjection's
  # `text_projection` beside `text_model.*`).
  unprefixed: tuple[str, ...] = ()


UNET = ComponentSpec("unet")
# diffusers' FluxTransformer2DModel (folder "transformer").
FLUX_TRANSFORMER = ComponentSpec("transformer")
VAE = ComponentSpec("vae")
TEXT_ENCODER = ComponentSpec("text_encoder", strip_prefix="text_model.",
                             ignore=(r"(^|\.)position_ids$",))
# SDXL's second text encoder, transformers' CLIPTextModelWithProjection:
# `text_projection.weight` sits beside `text_model.*`.
TEXT_ENCODER_2 = dataclasses.replace(TEXT_ENCODER, name="text_encoder_2",
                                     unprefixed=("text_projection",))
# diffusers' LDMBertModel: the encoder sits under `model.`; the unused
# `to_logits` language-model head is dropped.
LDM_BERT = ComponentSpec("text_encoder", strip_prefix="model.",
                         ignore=(r"^to_logits\.", r"(^|\.)position_ids$"))
# transformers' T5EncoderModel (FLUX's text_encoder_2): the stack under `encoder.`, the token
# table `shared` beside it; `encoder.embed_tokens` is the same tensor as `shared` (tied).
T5_ENCODER = ComponentSpec("text_encoder_2", strip_prefix="encoder.", unprefixed=("shared",),
                           ignore=(r"^encoder\.embed_tokens\.weight$",))


def torch_key_to_path(key: str) -> tuple[str, ...]:
  """`down_blocks.0.attentions.1.to_out.0.weight` -> (`down_blocks_0`, ..., `to_out_0`, `weight`)."""
  path: list[str] = []
  for part in key.split("."):
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(_LEGACY_RENAMES.get(part, part))
  return tuple(path)


def path_to_torch_key(path: Iterable[str]) -> str:
  """Inverse of `torch_key_to_path` for module names (not leaf names)."""
  parts = []
  for name in path:
    m = re.fullmatch(r"(.+)_(\d+)", name)
    if m and m.group(1) in INDEXED_MODULES:
      parts.extend([m.group(1), m.group(2)])
    else:
      parts.append(name)
  return ".".join(parts)


# Layout ops: name -> (shape function, array function).
_OPS: dict[str, tuple[Callable[[tuple], tuple], Callable[[np.ndarray], np.ndarray]]] = {
    "copy": (lambda s: tuple(s), lambda a: a),
    "linear": (lambda s: (s[1], s[0]), lambda a: a.T),
    "conv": (lambda s: (s[2], s[3], s[1], s[0]), lambda a: a.transpose(2, 3, 1, 0)),
    # Legacy VAE attention stored q/k/v/proj as 1x1 convs [O, I, 1, 1].
    "conv1x1_to_linear": (lambda s: (s[1], s[0]), lambda a: a[:, :, 0, 0].T),
}


def _choose_op(leaf: str, shape: tuple[int, ...], module_path: tuple[str, ...],
               target: Mapping[tuple[str, ...], tuple[int, ...]]) -> tuple[tuple[str, ...], str]:
  """Picks the Flax leaf and layout op for a PyTorch `weight`/`bias` of `shape`."""
  if leaf == "bias":
    return module_path + ("bias",), "copy"
  if leaf != "weight":
    return module_path + (leaf,), "copy"
  if module_path + ("embedding",) in target:
    return module_path + ("embedding",), "copy"
  if module_path + ("scale",) in target:
    return module_path + ("scale",), "copy"
  kernel = module_path + ("kernel",)
  if len(shape) == 4:
    if len(target.get(kernel, ())) == 2 and shape[2:] == (1, 1):
      return kernel, "conv1x1_to_linear"
    return kernel, "conv"
  if len(shape) == 2:
    return kernel, "linear"
  return kernel, "copy"


@dataclasses.dataclass(frozen=True)
class Plan:
  """A checked mapping from checkpoint keys to Flax paths with the layout op for each."""
  component: str
  entries: tuple[tuple[str, tuple[str, ...], str], ...]  # (checkpoint key, flax path, op)


def plan_conversion(spec: ComponentSpec, source_shapes: Mapping[str, tuple[int, ...]],
                    target_params: Any) -> Plan:
  """Maps every checkpoint key onto the Flax param tree, checking names and shapes.

  Args:
    spec: which component this is.
    source_shapes: checkpoint key -> shape, PyTorch layout.
    target_params: the Flax param tree (arrays or `jax.ShapeDtypeStruct`s),
      without the outer `{"params": ...}`.

  Raises:
    ConversionError: on an unexpected key, a missing parameter or a shape
      mismatch; the message is one line naming the key and both shapes.
  """
  target = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(target_params).items()}
  ignore = [re.compile(p) for p in spec.ignore]
  entries, seen = [], set()
  for key, shape in source_shapes.items():
    if any(p.search(key) for p in ignore):
      continue
    shape = tuple(int(d) for d in shape)
    stripped = key[len(spec.strip_prefix):] if key.startswith(spec.strip_prefix) else key
    *module, leaf = torch_key_to_path(stripped)
    path, op = _choose_op(leaf, shape, tuple(module), target)
    if path not in target:
      raise ConversionError(
          f"{spec.name}: checkpoint key {key!r} {shape} has no counterpart in the model "
          f"built from its config (looked for {'/'.join(path)})")
    converted = _OPS[op][0](shape)
    if converted != target[path]:
      raise ConversionError(
          f"{spec.name}: shape mismatch for {key!r}: checkpoint {shape} (as Flax {converted}) "
          f"vs model {'/'.join(path)} {target[path]}")
    if path in seen:
      raise ConversionError(f"{spec.name}: two checkpoint keys map to {'/'.join(path)} (last: {key!r})")
    seen.add(path)
    entries.append((key, path, op))
  missing = sorted(set(target) - seen)
  if missing:
    raise ConversionError(
        f"{spec.name}: checkpoint lacks {len(missing)} parameter(s) the config needs, "
        f"first: {'/'.join(missing[0])} {target[missing[0]]}")
  return Plan(spec.name, tuple(entries))


def apply_plan(plan: Plan, state_dict: Mapping[str, Any], dtype: Any = np.float32) -> dict:
  """Converts checkpoint arrays (numpy or anything `np.asarray` takes) into a nested Flax tree."""
  flat = {}
  for key, path, op in plan.entries:
    array = np.asarray(state_dict[key])
    flat[path] = np.ascontiguousarray(_OPS[op][1](array)).astype(dtype)
  return traverse_util.unflatten_dict(flat)


def convert_torch_state_dict(spec: ComponentSpec, state_dict: Mapping[str, Any],
                             target_params: Any, dtype: Any = np.float32) -> dict:
  """Plans and applies the conversion of a PyTorch-layout state dict (numpy arrays)."""
  shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
  return apply_plan(plan_conversion(spec, shapes, target_params), state_dict, dtype)


def flax_params_to_torch_state_dict(spec: ComponentSpec, params: Any) -> dict[str, np.ndarray]:
  """Inverse conversion: Flax params -> PyTorch-layout state dict (numpy), for writing checkpoints."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    *module, leaf = path
    array = np.asarray(value)
    if leaf == "kernel":
      array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
      leaf = "weight"
    elif leaf in ("scale", "embedding"):
      leaf = "weight"
    prefix = "" if module and module[0] in spec.unprefixed else spec.strip_prefix
    key = prefix + path_to_torch_key(module) + "." + leaf
    out[key] = np.ascontiguousarray(array)
  return out


def normalize_legacy_flax_tree(params: Any) -> dict:
  """Renames a diffusers/transformers Flax (msgpack) tree to ti_jax's names.

  Those trees already use Flax layouts; they differ in attention names
  (query/key/value/proj_attn) and in transformers' `layers/0` nesting.
  """
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, value in flat.items():
    if path and path[0] == "text_model":
      path = path[1:]
    new: list[str] = []
    for name in path:
      if name.isdigit() and new:
        new[-1] = f"{new[-1]}_{name}"
      else:
        new.append(_LEGACY_RENAMES.get(name, name))
    out[tuple(new)] = value
  return traverse_util.unflatten_dict(out)


def check_flax_tree(component: str, params: Any, target_params: Any) -> None:
  """Checks that a Flax tree matches the model's expected tree key for key and shape."""
  got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(target_params).items()}
  for path in sorted(set(got) | set(want)):
    name = "/".join(path)
    if path not in want:
      raise ConversionError(f"{component}: checkpoint parameter {name} {got[path]} is not in the model")
    if path not in got:
      raise ConversionError(f"{component}: checkpoint lacks parameter {name} {want[path]}")
    if got[path] != want[path]:
      raise ConversionError(
          f"{component}: shape mismatch for {name}: checkpoint {got[path]} vs model {want[path]}")
