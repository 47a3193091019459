"""Writes diffusers Flux weights as the single files ComfyUI users keep, for tests.

The inverse of `ti_jax.weights.flux_single_file`, built on its mappings
(`transformer_sources` for the transformer, `original_layout` for the VAE):
a diffusers `FluxTransformer2DModel` state dict becomes a transformer file in
Black Forest Labs' original layout (`flux1-dev.safetensors`), an
`AutoencoderKL` one the original-layout `ae.safetensors`, and the text
encoders' state dicts `clip_l.safetensors` / `t5xxl_fp16.safetensors` as
ComfyUI stores them (optionally under ComfyUI's prefixes). diffusers' own
single-file converters are the oracle that these are the real layouts.

  bfl = bfl_state_dict(diffusers_state, config)          # the transformer file's tensors
  write_comfyui_files("/tmp/tiny-flux", "/tmp/files")    # a diffusers Flux folder's four files
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

from ti_jax.weights import flux_single_file, original_layout, safetensors_io

# The files a diffusers Flux folder's components become, and where ComfyUI keeps them.
COMFYUI_FILES = {"transformer": "flux1.safetensors", "vae": "ae.safetensors",
                 "text_encoder": "clip_l.safetensors", "text_encoder_2": "t5xxl_fp16.safetensors"}
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def _invert_transformer_op(parts: Mapping[str, np.ndarray]) -> np.ndarray:
  """The BFL tensor from its diffusers part(s), by op ("", "swap" or "rows:a:b/n")."""
  ops = list(parts)
  if ops == [""]:
    return parts[""]
  if ops == ["swap"]:
    return flux_single_file.apply_transformer_op("swap", parts["swap"])  # its own inverse
  ordered = sorted(ops, key=lambda op: int(op[len("rows:"):].split(":")[0]))
  return np.concatenate([parts[op] for op in ordered], axis=0)


def bfl_state_dict(state: Mapping[str, np.ndarray], config: Mapping, prefix: str = ""
                   ) -> dict[str, np.ndarray]:
  """The BFL-layout transformer file's tensors of a diffusers `FluxTransformer2DModel` state dict.

  `config`: the diffusers config; `prefix`: e.g. ComfyUI's "model.diffusion_model.".
  """
  sources = flux_single_file.transformer_sources(config)
  assert set(sources) == set(state), sorted(set(sources) ^ set(state))[:5]
  parts: dict[str, dict[str, np.ndarray]] = {}
  for key, (old, op) in sources.items():
    parts.setdefault(old, {})[op] = np.asarray(state[key])
  return {prefix + old: np.ascontiguousarray(_invert_transformer_op(by_op))
          for old, by_op in parts.items()}


def bfl_shapes(shapes: Mapping[str, tuple[int, ...]], config: Mapping
               ) -> dict[str, tuple[int, ...]]:
  """The BFL key -> shape of a diffusers transformer's key -> shape (nothing is allocated)."""
  sources = flux_single_file.transformer_sources(config)
  assert set(sources) == set(shapes), sorted(set(sources) ^ set(shapes))[:5]
  out: dict[str, tuple[int, ...]] = {}
  for key, (old, op) in sources.items():
    shape = tuple(shapes[key])
    if op.startswith("rows:"):
      total = int(op.split("/")[1])
      shape = (total,) + shape[1:]
    out[old] = shape
  return out


def original_vae_state_dict(state: Mapping[str, np.ndarray], config: Mapping, prefix: str = ""
                            ) -> dict[str, np.ndarray]:
  """The original-layout VAE file's tensors (`ae.safetensors`) of a diffusers AutoencoderKL's."""
  parts: dict[str, dict[str, np.ndarray]] = {}
  for key, value in state.items():
    source = original_layout.diffusers_to_original("sd1", "vae", key, dict(config))
    parts.setdefault(source.key[len(original_layout.VAE_PREFIX):], {})[source.op] = np.asarray(
        value)
  out = {}
  for key, by_op in parts.items():
    (op, value), = by_op.items()  # the VAE has no fused tensors
    out[prefix + key] = original_layout.invert_op(op, [value])  # a view, as the loader's
  return out


def _diffusers_component(model_dir: str, component: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config, state dict) of one component folder of a diffusers folder (one safetensors file)."""
  folder = os.path.join(model_dir, component)
  with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  name = next(n for n in _WEIGHT_FILES if os.path.isfile(os.path.join(folder, n)))
  state = safetensors_io.load(os.path.join(folder, name))
  return config, {k: np.asarray(v) for k, v in state.items()}


def write_comfyui_files(model_dir: str, out_dir: str, prefixed: bool = False) -> dict[str, str]:
  """Writes a diffusers Flux folder's components as ComfyUI's four files; component -> path.

  With `prefixed`, each file's keys carry the prefix ComfyUI's all-in-one checkpoints give
  them (`model.diffusion_model.`, `first_stage_model.`, `text_encoders.clip_l.transformer.`,
  `text_encoders.t5xxl.transformer.`). The T5 file holds only `shared.weight`, as
  `t5xxl_fp16.safetensors` does.
  """
  os.makedirs(out_dir, exist_ok=True)
  prefixes = dict(zip(COMFYUI_FILES, (flux_single_file.TRANSFORMER_PREFIXES[0],
                                      flux_single_file.VAE_PREFIXES[0],
                                      flux_single_file.CLIP_PREFIXES[0],
                                      flux_single_file.T5_PREFIXES[0])))
  paths = {}
  for comp, name in COMFYUI_FILES.items():
    config, state = _diffusers_component(model_dir, comp)
    prefix = prefixes[comp] if prefixed else ""
    if comp == "transformer":
      tensors = bfl_state_dict(state, config, prefix)
    elif comp == "vae":
      tensors = original_vae_state_dict(state, config, prefix)
    else:
      tensors = {prefix + k: v for k, v in state.items()
                 if k != "encoder.embed_tokens.weight" or "shared.weight" not in state}
    paths[comp] = os.path.join(out_dir, name)
    safetensors_io.save(paths[comp], tensors, {"format": "pt"})
  return paths
