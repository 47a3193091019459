"""Writes a diffusers folder's weights as one original-layout (A1111/ComfyUI) checkpoint file.

The inverse of `ti_jax.weights.single_file`, built on its key mapping (`original_layout`), for
tests: the tiny models become single files whose loading can be compared with
their folders, and diffusers' own original->diffusers converters check the
mapping. Like real files, the output also carries what the loader must skip:
the noise schedule buffers, CLIP's position_ids, and for SD 2.x OpenCLIP's
last resblock (the text encoder reads the penultimate one), text_projection
and logit_scale.

  write_single_file(ensure_tiny_model(dir, "tiny-sd21"), "/tmp/tiny-sd21.safetensors", "sd2")
"""

from __future__ import annotations

import os

import numpy as np

from ti_jax.weights import loading, original_layout, safetensors_io


def diffusers_state_dicts(model_dir: str) -> dict[str, dict[str, np.ndarray]]:
  """Per component (unet, vae, text_encoder[, text_encoder_2]), the PyTorch-layout state dict
  of a diffusers folder."""
  folders = loading.component_folders(loading.read_configs(model_dir)["model_index"])
  out = {}
  for comp in folders:
    kind, state = loading.load_component_weights(model_dir, comp, subfolder=folders[comp])
    assert kind == "torch", f"{model_dir}: {comp} weights are not PyTorch-layout safetensors"
    out[comp] = {k: np.asarray(v) for k, v in state.items()}
  return out


def original_state_dict(family: str, configs: dict[str, dict],
                        states: dict[str, dict[str, np.ndarray]], seed: int = 0
                        ) -> dict[str, np.ndarray]:
  """The original-layout state dict of diffusers component state dicts (`configs`: theirs).

  `states` holds unet, vae and the family's text encoders (`original_layout.TEXT_ENCODERS`).
  """
  rng = np.random.default_rng(seed)
  parts: dict[str, dict[str, np.ndarray]] = {}  # original key -> op -> tensor
  for comp, state in states.items():
    for key, value in state.items():
      if key.endswith("position_ids"):
        continue
      source = original_layout.diffusers_to_original(family, comp, key, configs[comp])
      parts.setdefault(source.key, {})[source.op] = value
  out = {}
  for key, by_op in parts.items():
    ops = sorted(by_op)
    if ops[0].startswith("qkv"):
      assert ops == ["qkv0", "qkv1", "qkv2"], (key, ops)
    out[key] = np.ascontiguousarray(
        original_layout.invert_op(ops[0], [by_op[op] for op in ops])).astype(np.float32)
  out["alphas_cumprod"] = np.linspace(1.0, 0.0, 1000, dtype=np.float32)  # a buffer real files hold
  for comp, (kind, prefix) in original_layout.TEXT_ENCODERS[family].items():
    text = configs[comp]
    if kind == "clip":
      out[prefix + "text_model.embeddings.position_ids"] = (
          np.arange(text["max_position_embeddings"], dtype=np.int64)[None])
      continue
    out[prefix + "logit_scale"] = np.array(np.log(100.0), np.float32)
    if family != "sd2":
      continue
    # SD 2.x files hold OpenCLIP's last resblock and projection, which diffusers' model drops.
    n = text["num_hidden_layers"]
    block = f"{prefix}transformer.resblocks."
    for key in [k for k in out if k.startswith(f"{block}{n - 1}.")]:
      extra = key.replace(f"{block}{n - 1}.", f"{block}{n}.")
      out[extra] = rng.standard_normal(out[key].shape).astype(np.float32) * 0.02
    width = text["hidden_size"]
    out[prefix + "text_projection"] = (
        rng.standard_normal((width, text["projection_dim"])).astype(np.float32) / np.sqrt(width))
  return out


def write_single_file(model_dir: str, out_path: str, family: str,
                      metadata: dict[str, str] | None = None) -> str:
  """Writes the diffusers folder `model_dir` as the original-layout `out_path`; returns it."""
  configs = loading.read_configs(model_dir)
  state = original_state_dict(family, configs, diffusers_state_dicts(model_dir))
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  safetensors_io.save(out_path, state, dict(metadata or {}, format="pt"))
  return out_path
