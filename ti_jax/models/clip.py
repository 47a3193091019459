"""Flax CLIP (vision and text towers with projections) for image/text similarity metrics.

Parameter names mirror transformers' `CLIPModel` (`text_model.*`,
`vision_model.*`, `visual_projection`, `text_projection`, `logit_scale`) with
list indices folded into module names (`layers.0` -> `layers_0`), so
`ti_jax.weights.convert` maps a transformers checkpoint onto the tree. Both
towers run the shared pre-norm block (`ti_jax.models.transformer`) through
clip_text's `CLIPEncoder`; the vision tower runs it without a mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ti_jax.models.clip_text import (
  CLIP_ACTIVATIONS,
  CLIPEncoder,
  CLIPTextConfig,
  CLIPTextModel,
  clip_block,
  eos_positions,
)
from ti_jax.models.config_utils import UnsupportedConfigError
from ti_jax.models.transformer import EncoderBlockConfig

Dtype = Any

# transformers' CLIPTextConfig/CLIPConfig defaults, which apply to fields a
# CLIP `config.json` leaves out (they differ from Stable Diffusion's encoder).
_TEXT_DEFAULTS = {
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
_DEFAULT_EOS_TOKEN_ID = 49407
_DEFAULT_PROJECTION_DIM = 512
_DEFAULT_LOGIT_SCALE = 2.6592


def _positive_int(component: str, cfg: Mapping[str, Any], field: str, default: int) -> int:
  value = cfg.get(field, default)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise UnsupportedConfigError(f"{component} config: {field}={value!r} must be a positive integer")
  return value


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The fields of a transformers `CLIPVisionConfig` that shape the vision tower."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_transformers(cls, cfg: Mapping[str, Any]) -> CLIPVisionConfig:
    """Builds the config from a transformers `vision_config` dict, refusing unsupported fields.

    Raises:
      UnsupportedConfigError: with a one-line message naming the field.
    """
    name = "vision_config"
    model_type = cfg.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
      raise UnsupportedConfigError(
          f"{name}: model_type {model_type!r} is not supported (clip_vision_model only)")
    act = cfg.get("hidden_act", cls.hidden_act)
    if act not in CLIP_ACTIVATIONS:
      raise UnsupportedConfigError(
          f"{name}: hidden_act={act!r} is not supported (supported: {', '.join(CLIP_ACTIVATIONS)})")
    ints = {f: _positive_int(name, cfg, f, getattr(cls, f)) for f in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "image_size", "patch_size", "num_channels")}
    if ints["hidden_size"] % ints["num_attention_heads"]:
      raise UnsupportedConfigError(
          f"{name}: hidden_size {ints['hidden_size']} is not divisible by num_attention_heads "
          f"{ints['num_attention_heads']}")
    if ints["patch_size"] > ints["image_size"]:
      raise UnsupportedConfigError(
          f"{name}: patch_size {ints['patch_size']} is larger than image_size {ints['image_size']}")
    return cls(hidden_act=act, layer_norm_eps=float(cfg.get("layer_norm_eps", cls.layer_norm_eps)),
               **ints)

  @property
  def grid_size(self) -> int:
    """Patches per image side (a trailing partial patch is dropped, as by PyTorch's strided conv)."""
    return self.image_size // self.patch_size

  def block(self) -> EncoderBlockConfig:
    """The vision tower's encoder block: CLIP's, with these sizes."""
    return clip_block(self.hidden_size, self.intermediate_size, self.num_attention_heads,
                      self.hidden_act, self.layer_norm_eps)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A transformers `CLIPModel` config: both towers, the projection width and the pooling token."""
  text: CLIPTextConfig = dataclasses.field(
      default_factory=lambda: CLIPTextConfig(**_TEXT_DEFAULTS))
  vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
  projection_dim: int = _DEFAULT_PROJECTION_DIM
  eos_token_id: int = _DEFAULT_EOS_TOKEN_ID
  logit_scale_init_value: float = _DEFAULT_LOGIT_SCALE

  @classmethod
  def from_transformers(cls, cfg: Mapping[str, Any]) -> CLIPConfig:
    """Builds the config from a transformers CLIP `config.json` dict.

    Fields the file leaves out take transformers' defaults; the legacy
    `text_config_dict`/`vision_config_dict` entries override `text_config`/
    `vision_config` as they do in transformers.

    Raises:
      UnsupportedConfigError: with a one-line message for a config that is not
        a CLIPModel or asks for something ti_jax does not implement.
    """
    model_type = cfg.get("model_type", "clip")
    if model_type != "clip":
      raise UnsupportedConfigError(f"CLIP config: model_type {model_type!r} is not supported (clip only)")
    arch = (cfg.get("architectures") or ["CLIPModel"])[0]
    if arch != "CLIPModel":
      raise UnsupportedConfigError(f"CLIP config: architecture {arch!r} is not supported (CLIPModel only)")
    text = dict(_TEXT_DEFAULTS, **(cfg.get("text_config") or {}), **(cfg.get("text_config_dict") or {}))
    vision = dict(cfg.get("vision_config") or {}, **(cfg.get("vision_config_dict") or {}))
    text_type = text.pop("model_type", "clip_text_model")
    if text_type != "clip_text_model":
      raise UnsupportedConfigError(
          f"text_config: model_type {text_type!r} is not supported (clip_text_model only)")
    text.pop("architectures", None)  # sub-configs carry a null or their own tower's class
    eos = text.get("eos_token_id", _DEFAULT_EOS_TOKEN_ID)
    if isinstance(eos, bool) or not isinstance(eos, int):
      raise UnsupportedConfigError(f"text_config: eos_token_id={eos!r} must be an integer")
    return cls(
        text=CLIPTextConfig.from_transformers(text),
        vision=CLIPVisionConfig.from_transformers(vision),
        projection_dim=_positive_int("CLIP config", cfg, "projection_dim", _DEFAULT_PROJECTION_DIM),
        eos_token_id=eos,
        logit_scale_init_value=float(cfg.get("logit_scale_init_value", _DEFAULT_LOGIT_SCALE)),
    )


class _VisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels):
    cfg = self.config
    d = cfg.hidden_size
    p = cfg.patch_size
    patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      name="patch_embedding")(pixels)  # [B, G, G, D]
    # Row-major flattening gives the same patch order as PyTorch's NCHW flatten(2).
    patches = patches.reshape(patches.shape[0], -1, d)  # [B, G*G, D]
    cls = self.param("class_embedding", nn.initializers.normal(d ** -0.5), (d,), self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (patches.shape[0], 1, d))  # [B, 1, D]
    x = jnp.concatenate([cls, patches], axis=1)  # [B, 1 + G*G, D]
    positions = nn.Embed(cfg.grid_size ** 2 + 1, d, param_dtype=self.param_dtype,
                         name="position_embedding")(jnp.arange(x.shape[1]))
    return x + positions.astype(self.dtype)[None]


class CLIPVisionModel(nn.Module):
  """`pixels [B, S, S, C] -> (last_hidden_state [B, 1 + G*G, D], pooled [B, D])`.

  `pixels` are already resized, cropped and normalized (NHWC float); `S` must
  equal `config.image_size`. The pooled output is the class token after
  `post_layernorm`, as transformers' `CLIPVisionModel.pooler_output`.
  """
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    if pixels.shape[1:] != (cfg.image_size, cfg.image_size, cfg.num_channels):
      raise ValueError(f"CLIP vision tower takes [B, {cfg.image_size}, {cfg.image_size}, "
                       f"{cfg.num_channels}] pixels, got {list(pixels.shape)}")
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=name, **kw)
    x = _VisionEmbeddings(cfg, name="embeddings", **kw)(pixels.astype(self.dtype))
    x = ln("pre_layrnorm")(x)  # transformers' spelling, kept so the checkpoint keys match
    # Every patch sees every other: no mask.
    x = CLIPEncoder(cfg.block(), cfg.num_hidden_layers, self.attention_impl, name="encoder",
                    **kw)(x, None)
    return x, ln("post_layernorm")(x[:, 0])


class CLIPModel(nn.Module):
  """transformers' `CLIPModel` features: un-normalized image and text projections `[B, P]`.

  Call `apply(..., method=CLIPModel.get_image_features)` or
  `get_text_features`; `__call__` runs both (and is what `init` traces).
  """
  config: CLIPConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  def setup(self):
    cfg = self.config
    kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
    self.text_model = CLIPTextModel(cfg.text, attention_impl=self.attention_impl, **kw)
    self.vision_model = CLIPVisionModel(cfg.vision, attention_impl=self.attention_impl, **kw)
    self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, **kw)
    self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, **kw)
    self.logit_scale = self.param(
        "logit_scale", nn.initializers.constant(cfg.logit_scale_init_value), (), self.param_dtype)

  def get_image_features(self, pixels: jax.Array) -> jax.Array:
    """`pixels [B, S, S, C]` (normalized NHWC) -> image features [B, P], not normalized."""
    _, pooled = self.vision_model(pixels)
    return self.visual_projection(pooled)

  def get_text_features(self, input_ids: jax.Array,
                        attention_mask: jax.Array | None = None) -> jax.Array:
    """`input_ids [B, T]` -> text features [B, P], not normalized.

    The mask is optional: attention is causal and padding follows the eos, so
    padded positions never reach the pooled state.
    """
    hidden = self.text_model(input_ids, attention_mask=attention_mask)  # [B, T, D]
    pos = eos_positions(input_ids, self.config.eos_token_id)  # [B]
    pooled = jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0]  # [B, D]
    return self.text_projection(pooled)

  def __call__(self, input_ids: jax.Array, pixels: jax.Array) -> dict[str, jax.Array]:
    """Both towers: `{"image_embeds", "text_embeds", "logits_per_image"}` as in transformers.

    The embeds are L2-normalized; `logits_per_image [B_img, B_txt]` is their
    cosine similarity times `exp(logit_scale)`.
    """
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    image = unit(self.get_image_features(pixels))
    text = unit(self.get_text_features(input_ids))
    logits = jnp.exp(self.logit_scale).astype(image.dtype) * image @ text.T
    return {"image_embeds": image, "text_embeds": text, "logits_per_image": logits}

  def dummy_inputs(self) -> tuple[jax.Array, jax.Array]:
    """Minimal inputs for `init`/`jax.eval_shape` (only their shapes matter)."""
    v = self.config.vision
    return (jnp.zeros((1, 1), jnp.int32),
            jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32))
