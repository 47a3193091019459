"""The single files Flux.1 users keep for ComfyUI, renamed in memory to diffusers/transformers keys.

ComfyUI users keep four files side by side:

  flux1-dev.safetensors / flux1-schnell.safetensors   the transformer in Black Forest Labs'
      original layout (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, `img_in`,
      `txt_in`, `time_in`, `vector_in`, `guidance_in` (dev only), `final_layer`), in ComfyUI's
      re-saved files under `model.diffusion_model.`
  ae.safetensors          the 16-channel VAE in the original LDM layout (`encoder.down.0.block.0`,
      `mid.attn_1`), without quant_conv/post_quant_conv
  clip_l.safetensors      CLIP-L, transformers' `text_model.*` keys
  t5xxl_fp16.safetensors  the T5 v1.1 XXL encoder, transformers' keys (`encoder.block.N...`) with
      the token table as `shared.weight` (some files: `encoder.embed_tokens.weight`, or both)

ComfyUI's all-in-one checkpoints hold the same under `model.diffusion_model.`,
`first_stage_model.` (or `vae.`), `text_encoders.clip_l.transformer.` and
`text_encoders.t5xxl.transformer.`; each function here takes its own component
from such a file by its prefix.

Each `*_state_dict` function turns one file's state dict (numpy arrays by key,
as `safetensors_io.load` gives them) into the state dict of diffusers'
`FluxTransformer2DModel`, diffusers' `AutoencoderKL`, transformers'
`CLIPTextModel` or `T5EncoderModel`, key for key as diffusers' single-file
converters give it (`convert_flux_transformer_checkpoint_to_diffusers`,
`convert_ldm_vae_checkpoint`), so that `convert.convert_torch_state_dict`
takes it on as from a diffusers folder. The arrays are views of the
memory-mapped file (a row range of the fused q/k/v, a squeezed 1x1 conv); only
the final norm's modulation, whose shift and scale halves diffusers stores in
the other order, is a (small) copy.

The VAE reuses the SD single files' mapping (`original_layout.diffusers_to_original`):
Flux's VAE is the same original layout, only without the quant convs.

A wrong or incomplete file is a one-line `ModelLoadError` naming the file and
what is wrong: a missing key, an unexpected one, a shape the architecture has
no place for, a LoRA, or a file of another model or component.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from ti_jax.weights import pipeline
from ti_jax.weights.original_layout import VAE_PREFIX, apply_op, diffusers_to_original

ModelLoadError = pipeline.ModelLoadError

# The prefixes each component may sit under (ComfyUI's re-saved and all-in-one files), the
# longest first; "" is a file of the component alone.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "")
VAE_PREFIXES = ("first_stage_model.", "vae.", "")
CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer.",
                 "conditioner.embedders.0.transformer.", "")
T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "")

# One key every file of the component holds (after its prefix).
TRANSFORMER_MARKER = "double_blocks.0.img_attn.qkv.weight"
VAE_MARKER = "encoder.down.0.block.0.conv1.weight"
CLIP_MARKER = "text_model.embeddings.token_embedding.weight"
T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"

# FLUX.1-dev and FLUX.1-schnell: the one full-size transformer (dev adds guidance_in).
FULL_SIZE = {"in_channels": 64, "num_layers": 19, "num_single_layers": 38,
             "attention_head_dim": 128, "num_attention_heads": 24,
             "joint_attention_dim": 4096, "pooled_projection_dim": 768}
MLP_RATIO = 4  # fixed in diffusers' Flux blocks

# What a file holds, by a key it would have (as a suffix, so that any prefix matches); the
# first match names the file in errors. LoRAs are found by name first (any "lora" key).
_KINDS = (
    ("double_blocks.0.img_attn.qkv.weight", "a Flux transformer in the original (BFL) layout"),
    ("joint_blocks.0.x_block.attn.qkv.weight", "an SD3 transformer"),
    ("single_transformer_blocks.0.attn.to_q.weight",
     "a diffusers-layout FluxTransformer2DModel file (load its diffusers folder instead)"),
    ("input_blocks.0.0.weight", "a Stable Diffusion (UNet) checkpoint"),
    ("down_blocks.0.resnets.0.conv1.weight", "a diffusers UNet or VAE component file"),
    ("encoder.down.0.block.0.conv1.weight", "a VAE in the original (LDM) layout"),
    ("embeddings.token_embedding.weight", "a CLIP text encoder"),
    ("transformer.resblocks.0.attn.in_proj_weight", "an OpenCLIP text encoder"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a T5 encoder"),
)


def describe(keys) -> str:
  """What a state dict with these keys holds, in words ("a LoRA ...", "a T5 encoder", ...)."""
  keys = list(keys)
  lora = next((k for k in keys if "lora" in k.lower()), None)
  if lora is not None:
    return f"a LoRA (adapter weights such as {lora}), not a full model"
  for suffix, words in _KINDS:
    if any(k.endswith(suffix) for k in keys):
      return words
  return "no known model layout"


def is_flux_transformer(keys) -> bool:
  """Whether a file with these keys holds a BFL-layout Flux transformer (any prefix), for routing
  a single file to this module rather than to the SD loader (`single_file`)."""
  return any(k in keys for k in (p + TRANSFORMER_MARKER for p in TRANSFORMER_PREFIXES))


def _component(state: Mapping[str, np.ndarray], prefixes, markers: tuple[str, ...], wanted: str,
               path: str) -> dict[str, np.ndarray]:
  """The keys of one component with its prefix removed; a one-line refusal if it is not there.

  The component is where the first of `markers` (keys its files hold) is found under a prefix.
  """
  if any("lora" in k.lower() for k in state):
    raise ModelLoadError(f"{path}: {describe(state)}; expected {wanted}")
  for marker in markers:
    for prefix in prefixes:
      if prefix + marker in state:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  raise ModelLoadError(f"{path}: {describe(state)}, not {wanted} (no {markers[0]})")


def _check_expected(renamed: Mapping[str, tuple[int, ...]],
                    expected: Mapping[str, tuple[int, ...]] | None, what: str, path: str):
  """Each key of the built model (`expected`: key -> shape) is there, with its shape."""
  if expected is None:
    return
  for key, shape in expected.items():
    if key not in renamed:
      raise ModelLoadError(f"{path}: {what} weight {key} is missing")
    if tuple(renamed[key]) != tuple(shape):
      raise ModelLoadError(f"{path}: {what} weight {key} has shape {tuple(renamed[key])}, "
                           f"the model needs {tuple(shape)}")
  extra = sorted(set(renamed) - set(expected))
  if extra:
    raise ModelLoadError(f"{path}: {what} weight {extra[0]} has no place in the model "
                         f"({len(extra)} such keys)")


# ---------------------------------------------------------------------------
# The transformer.
#
# A `TransformerSource` names the original key and how its tensor becomes the diffusers one:
#   ""                as is
#   "rows:a:b/n"      rows a..b of a fused tensor of n rows (q/k/v, the single block's q/k/v/mlp)
#   "swap"            the two halves of the rows exchanged (diffusers' AdaLayerNormContinuous
#                     reads scale then shift, BFL's final layer shift then scale)
TransformerSource = tuple[str, str]  # (BFL key, op)

_TOP = (  # diffusers module, BFL module (both with weight and bias)
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("context_embedder", "txt_in"),
    ("x_embedder", "img_in"),
    ("proj_out", "final_layer.linear"),
)
_GUIDANCE = (
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
)
_DOUBLE = (  # per double block: diffusers module, BFL module
    ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
    ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
    ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
    ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
)
_DOUBLE_QKV = (("attn.to_q", "attn.to_k", "attn.to_v", "img_attn.qkv"),
               ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "txt_attn.qkv"))
_DOUBLE_NORMS = (("attn.norm_q", "img_attn.norm.query_norm"),
                 ("attn.norm_k", "img_attn.norm.key_norm"),
                 ("attn.norm_added_q", "txt_attn.norm.query_norm"),
                 ("attn.norm_added_k", "txt_attn.norm.key_norm"))
_SINGLE = (("norm.linear", "modulation.lin"), ("proj_out", "linear2"))
_SINGLE_NORMS = (("attn.norm_q", "norm.query_norm"), ("attn.norm_k", "norm.key_norm"))
_SINGLE_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def _block_count(keys, name: str) -> int:
  """How many `name.N.` blocks the keys hold (the largest N + 1; a gap shows as a missing key)."""
  pattern = re.compile(rf"{re.escape(name)}\.(\d+)\.")
  found = {int(m.group(1)) for m in map(pattern.match, keys) if m}
  return max(found) + 1 if found else 0


def transformer_config(shapes: Mapping[str, tuple[int, ...]], path: str) -> dict:
  """The diffusers `FluxTransformer2DModel` config of an unprefixed BFL-layout transformer.

  Every field but `axes_dims_rope` (which no weight shows; FLUX.1's is (16, 56, 56)) comes
  from the shapes: dev has `guidance_in` (`guidance_embeds`), schnell does not. A Flux Fill,
  Depth or Canny model (more input channels than it predicts) and widths diffusers' blocks
  cannot hold are refused in one line.
  """
  def shape(key):
    if key not in shapes:
      raise ModelLoadError(f"{path}: Flux transformer weight {key} is missing")
    return tuple(shapes[key])

  inner, in_channels = shape("img_in.weight")
  head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
  out_channels = shape("final_layer.linear.weight")[0]
  if out_channels != in_channels:
    raise ModelLoadError(
        f"{path}: the transformer takes {in_channels} input channels and predicts {out_channels} "
        "(a Flux Fill, Depth or Canny model); ti_jax loads text-to-image Flux models")
  if inner % head_dim:
    raise ModelLoadError(f"{path}: a width of {inner} is no multiple of the head size {head_dim}")
  mlp = shape("double_blocks.0.img_mlp.0.weight")[0]
  if mlp != MLP_RATIO * inner:
    raise ModelLoadError(f"{path}: an MLP width of {mlp} for a width of {inner}; Flux's blocks "
                         f"are {MLP_RATIO} times as wide")
  config = {
      "patch_size": 1, "in_channels": in_channels, "out_channels": None,
      "num_layers": _block_count(shapes, "double_blocks"),
      "num_single_layers": _block_count(shapes, "single_blocks"),
      "attention_head_dim": head_dim, "num_attention_heads": inner // head_dim,
      "joint_attention_dim": shape("txt_in.weight")[1],
      "pooled_projection_dim": shape("vector_in.in_layer.weight")[1],
      "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
  }
  return config


def variant(config: Mapping) -> str:
  """"dev" (with the guidance embedding) or "schnell" (without) of a transformer config."""
  return "dev" if config["guidance_embeds"] else "schnell"


def is_full_size(config: Mapping) -> bool:
  """Whether a transformer config is FLUX.1's full size (19 double, 38 single blocks, 3072 wide)."""
  return all(config.get(k) == v for k, v in FULL_SIZE.items())


def transformer_sources(config: Mapping) -> dict[str, TransformerSource]:
  """Every diffusers key of the transformer `config` -> (its BFL key, op); the one mapping.

  The loader reads it one way (`transformer_state_dict`), the test writer
  (`ti_jax.testing.flux_single_file_models`) the other.
  """
  inner = config["attention_head_dim"] * config["num_attention_heads"]
  mlp = MLP_RATIO * inner
  out: dict[str, TransformerSource] = {}

  def linear(new, old, op=""):
    for leaf in ("weight", "bias"):
      out[f"{new}.{leaf}"] = (f"{old}.{leaf}", op)

  def fused(news, old, sizes):
    start, total = 0, sum(sizes)
    for new, size in zip(news, sizes):
      linear(new, old, f"rows:{start}:{start + size}/{total}")
      start += size

  for new, old in _TOP + (_GUIDANCE if config["guidance_embeds"] else ()):
    linear(new, old)
  linear("norm_out.linear", "final_layer.adaLN_modulation.1", "swap")
  for i in range(config["num_layers"]):
    new, old = f"transformer_blocks.{i}.", f"double_blocks.{i}."
    for a, b in _DOUBLE:
      linear(new + a, old + b)
    for *news, b in _DOUBLE_QKV:
      fused([new + a for a in news], old + b, (inner,) * 3)
    for a, b in _DOUBLE_NORMS:
      out[f"{new}{a}.weight"] = (f"{old}{b}.scale", "")
  for i in range(config["num_single_layers"]):
    new, old = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
    for a, b in _SINGLE:
      linear(new + a, old + b)
    fused([new + a for a in _SINGLE_LINEAR1], old + "linear1", (inner,) * 3 + (mlp,))
    for a, b in _SINGLE_NORMS:
      out[f"{new}{a}.weight"] = (f"{old}{b}.scale", "")
  return out


def _rows(op: str) -> tuple[int, int, int]:
  """"rows:a:b/n" -> (a, b, n)."""
  span, total = op[len("rows:"):].split("/")
  start, stop = span.split(":")
  return int(start), int(stop), int(total)


def op_shape(op: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The diffusers shape of an original tensor of `shape` under `op`."""
  if op.startswith("rows:"):
    start, stop, _ = _rows(op)
    return (stop - start,) + tuple(shape[1:])
  return tuple(shape)


def apply_transformer_op(op: str, array: np.ndarray) -> np.ndarray:
  """The diffusers tensor from its BFL one: a view, except "swap" (a copy of the halves)."""
  if op.startswith("rows:"):
    start, stop, _ = _rows(op)
    return array[start:stop]
  if op == "swap":
    shift, scale = np.split(array, 2, axis=0)
    return np.concatenate([scale, shift], axis=0)
  return array


def _check_source_shape(key: str, op: str, shape: tuple[int, ...], path: str):
  """A fused tensor must have exactly the rows its parts add up to."""
  if op.startswith("rows:") and shape[0] != _rows(op)[2]:
    raise ModelLoadError(f"{path}: Flux transformer weight {key} has {shape[0]} rows, the "
                         f"blocks' width needs {_rows(op)[2]}")
  if op == "swap" and shape[0] % 2:
    raise ModelLoadError(f"{path}: Flux transformer weight {key} has an odd number of rows")


def _renamed_transformer(state: Mapping, path: str) -> tuple[dict, dict[str, TransformerSource]]:
  """(config, diffusers key -> source) of a BFL transformer, after checking its keys and shapes."""
  shapes = {k: tuple(v.shape) for k, v in state.items()}
  config = transformer_config(shapes, path)
  sources = transformer_sources(config)
  for new, (old, op) in sources.items():
    if old not in shapes:
      raise ModelLoadError(f"{path}: Flux transformer weight {old} is missing (for {new})")
    _check_source_shape(old, op, shapes[old], path)
  used = {old for old, _ in sources.values()}
  extra = sorted(k for k in shapes if k not in used)
  if extra:
    raise ModelLoadError(f"{path}: unexpected key {extra[0]} for a Flux transformer "
                         f"({len(extra)} such keys); its architecture differs from FLUX.1's")
  return config, sources


def transformer_shapes(shapes: Mapping[str, tuple[int, ...]], path: str,
                       expected: Mapping[str, tuple[int, ...]] | None = None
                       ) -> tuple[dict, dict[str, tuple[int, ...]]]:
  """(config, diffusers key -> shape) of a BFL transformer's key -> shape (no tensor is read).

  What `transformer_state_dict` does, on shapes: the full-size files can be planned
  and checked from their header alone.
  """
  state = _component({k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()},
                     TRANSFORMER_PREFIXES, (TRANSFORMER_MARKER,), "a Flux transformer", path)
  config, sources = _renamed_transformer(state, path)
  out = {new: op_shape(op, state[old].shape) for new, (old, op) in sources.items()}
  _check_expected(out, expected, "Flux transformer", path)
  return config, out


def transformer_state_dict(state: Mapping[str, np.ndarray], path: str,
                           expected: Mapping[str, tuple[int, ...]] | None = None
                           ) -> tuple[dict, dict[str, np.ndarray]]:
  """(config, diffusers `FluxTransformer2DModel` state dict) of a BFL-layout transformer file.

  Args:
    state: the file's tensors by key, with or without ComfyUI's `model.diffusion_model.`
      prefix (an all-in-one checkpoint's other components are left out).
    path: the file, for errors.
    expected: optionally the diffusers key -> shape of the model the loader built from
      `config` (its Flax params through `original_layout.torch_shapes`): each must be there
      with that shape, and nothing else.

  Raises:
    ModelLoadError: one line naming `path` and the problem.
  """
  state = _component(state, TRANSFORMER_PREFIXES, (TRANSFORMER_MARKER,), "a Flux transformer", path)
  config, sources = _renamed_transformer(state, path)
  out = {new: apply_transformer_op(op, state[old]) for new, (old, op) in sources.items()}
  _check_expected({k: v.shape for k, v in out.items()}, expected, "Flux transformer", path)
  return config, out


# ---------------------------------------------------------------------------
# The VAE: the SD files' original layout (`original_layout`), without quant convs.


def vae_config(shapes: Mapping[str, tuple[int, ...]], path: str) -> dict:
  """The diffusers `AutoencoderKL` fields an original-layout VAE's shapes show (any prefix).

  The norm groups and the scaling/shift factors are no weight's: they come from the preset.
  """
  state = _component(shapes, VAE_PREFIXES, (VAE_MARKER,), "a VAE", path)
  blocks, i = [], 0
  while f"encoder.down.{i}.block.0.conv1.weight" in state:
    blocks.append(state[f"encoder.down.{i}.block.0.conv1.weight"][0])
    i += 1
  layers = _block_count(state, "encoder.down.0.block")
  need = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight")
  missing = [k for k in need if k not in state]
  if missing:
    raise ModelLoadError(f"{path}: VAE weight {missing[0]} is missing")
  return {
      "in_channels": state["encoder.conv_in.weight"][1],
      "out_channels": state["decoder.conv_out.weight"][0],
      # The encoder's last conv gives the latent mean and log-variance: twice the channels.
      "latent_channels": state["encoder.conv_out.weight"][0] // 2,
      "block_out_channels": blocks, "layers_per_block": layers,
      "down_block_types": ["DownEncoderBlock2D"] * len(blocks),
      "up_block_types": ["UpDecoderBlock2D"] * len(blocks),
      "use_quant_conv": "quant_conv.weight" in state,
      "use_post_quant_conv": "post_quant_conv.weight" in state,
  }


def vae_state_dict(state: Mapping[str, np.ndarray], path: str, config: Mapping,
                   expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """The diffusers `AutoencoderKL` state dict of an original-layout VAE file (Flux's `ae`).

  `config` is the VAE's diffusers config (`vae_config` or the preset's), `expected` the
  diffusers key -> shape of the model built from it: every key is looked up through the SD
  files' mapping and must have its shape; a key of the file the model has no place for is
  refused. The file's own prefix (`first_stage_model.`, `vae.` or none) is removed first.
  """
  state = _component(state, VAE_PREFIXES, (VAE_MARKER,), "a VAE", path)
  out, used = {}, set()
  for key in expected:
    source = diffusers_to_original("sd1", "vae", key, dict(config))
    old = source.key[len(VAE_PREFIX):]
    if old not in state:
      raise ModelLoadError(f"{path}: VAE weight {key} is missing (looked for {old})")
    out[key] = apply_op(source.op, state[old])
    used.add(old)
  extra = sorted(k for k in state if k not in used)
  if extra:
    raise ModelLoadError(f"{path}: unexpected key {extra[0]} for the VAE ({len(extra)} such "
                         "keys); its architecture differs from the one configured")
  _check_expected({k: v.shape for k, v in out.items()}, expected, "VAE", path)
  return out


# ---------------------------------------------------------------------------
# The text encoders: already transformers' keys, under a prefix in all-in-one files.

# Keys of a CLIP file that transformers' CLIPTextModel has no parameter for: the position-ids
# buffer, the projection and temperature of a full CLIPModel (Flux reads the pooled output
# unprojected), its vision tower.
_CLIP_IGNORED = re.compile(r"^(text_model\.embeddings\.position_ids|text_projection\.weight|"
                           r"logit_scale|vision_model\..*|visual_projection\.weight)$")
# The modules under `text_model.` (which transformers 5 saves without that name).
_CLIP_TEXT_MODULES = ("embeddings", "encoder", "final_layer_norm")
# Keys of a T5 file outside T5EncoderModel: an encoder-decoder checkpoint's decoder and head.
_T5_IGNORED = re.compile(r"^(decoder\.|lm_head\.)")
T5_TOKEN_KEYS = ("shared.weight", "encoder.embed_tokens.weight")  # one tied table


def clip_state_dict(state: Mapping[str, np.ndarray], path: str,
                    expected: Mapping[str, tuple[int, ...]] | None = None
                    ) -> dict[str, np.ndarray]:
  """transformers' `CLIPTextModel` state dict of a CLIP-L file (`clip_l.safetensors`).

  The keys are the hub layout's (`text_model.*`, as in the files and diffusers folders),
  also for a file saved by transformers 5 without that name. ComfyUI's and the SD
  checkpoints' prefixes are removed; the keys of a full CLIPModel that the text model has no
  place for (its projection and vision tower) are dropped. With `expected` (key -> shape of
  the model to load into) every key must be there with its shape.
  """
  state = _component(state, CLIP_PREFIXES, (CLIP_MARKER, CLIP_MARKER[len("text_model."):]),
                     "a CLIP text encoder", path)
  named = {"text_model." + k if k.split(".")[0] in _CLIP_TEXT_MODULES else k: v
           for k, v in state.items()}
  out = {k: v for k, v in named.items() if not _CLIP_IGNORED.match(k)}
  extra = sorted(k for k in out if not k.startswith("text_model."))
  if extra:
    raise ModelLoadError(f"{path}: unexpected key {extra[0]} for a CLIP text encoder")
  _check_expected({k: v.shape for k, v in out.items()}, expected, "CLIP text encoder", path)
  return out


def t5_state_dict(state: Mapping[str, np.ndarray], path: str,
                  expected: Mapping[str, tuple[int, ...]] | None = None
                  ) -> dict[str, np.ndarray]:
  """transformers' `T5EncoderModel` state dict of a T5 file (`t5xxl_fp16.safetensors`).

  The token table is one tensor under two names in transformers (`shared.weight`, tied to
  `encoder.embed_tokens.weight`); files hold either or both, and the result holds both (the
  same array, `shared.weight`'s when there are two). ComfyUI's prefix is removed; an
  encoder-decoder checkpoint's decoder and head are dropped.
  """
  state = _component(state, T5_PREFIXES, (T5_MARKER,), "a T5 encoder", path)
  out = {k: v for k, v in state.items() if not _T5_IGNORED.match(k)}
  table = next((out[k] for k in T5_TOKEN_KEYS if k in out), None)
  if table is None:
    raise ModelLoadError(f"{path}: T5 weight shared.weight (the token table) is missing")
  out.update({k: table for k in T5_TOKEN_KEYS})
  extra = sorted(k for k in out if not (k.startswith("encoder.") or k == "shared.weight"))
  if extra:
    raise ModelLoadError(f"{path}: unexpected key {extra[0]} for a T5 encoder")
  _check_expected({k: v.shape for k, v in out.items()}, expected, "T5 encoder", path)
  return out
