"""Flax UNet2DConditionModel for Stable Diffusion 1.x, 2.x and XL.

Parameter names mirror diffusers' PyTorch `UNet2DConditionModel`, so a
diffusers checkpoint converts by renaming (`ti_jax.weights.convert`). Tensors are
NHWC. Parity with diffusers is asserted in `tests/models/test_parity.py` and
(SDXL's added "text_time" conditioning) `tests/models/test_sdxl.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ti_jax.models.config_utils import UnsupportedConfigError, check_supported
from ti_jax.models.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D

Dtype = Any

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn",)

# Fields of diffusers' UNet config that change the architecture, with the only
# values ti_jax implements (those of every SD 1.x/2.x/XL checkpoint). Anything
# else is refused at load time rather than silently mis-computed.
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    # "text_time": SDXL's pooled text embedding plus size/crop ids added to the time embedding.
    "addition_embed_type": (None, "text_time"),
    "attention_type": ("default",),
    "class_embed_type": (None,),
    "class_embeddings_concat": (False,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "cross_attention_norm": (None,),
    "downsample_padding": (1,),
    "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "mid_block_only_cross_attention": (None, False),
    "mid_block_scale_factor": (1, 1.0),
    "num_class_embeds": (None,),
    "resnet_out_scale_factor": (1, 1.0),
    "resnet_skip_time_act": (False,),
    "resnet_time_scale_shift": ("default",),
    "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,),
    "time_embedding_dim": (None,),
    "time_embedding_type": ("positional",),
    "timestep_post_act": (None,),
    "reverse_transformer_layers_per_block": (None,),
}


def _per_block(value: Any, n: int, name: str) -> tuple[Any, ...]:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise UnsupportedConfigError(
          f"unet config: {name} has {len(value)} entries but there are {n} down blocks")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The architecture fields of a diffusers `unet/config.json` (hashable)."""
  in_channels: int = 4
  out_channels: int = 4
  sample_size: int = 64
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 768
  # Heads per down block. diffusers' config calls this `attention_head_dim`
  # (a historical misnomer it keeps for compatibility); head size is
  # channels // heads.
  num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
  use_linear_projection: bool = False
  upcast_attention: bool = False
  # SDXL ("text_time"): the width of each time id's sinusoidal features and the
  # input width of `add_embedding` (pooled text width + 6 * addition_time_embed_dim).
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None

  @classmethod
  def from_diffusers(cls, cfg: Mapping[str, Any]) -> "UNetConfig":
    """Builds the config from a diffusers `unet/config.json` dict, refusing unsupported fields."""
    check_supported("unet", cfg, _REQUIRED_VALUES)
    only_cross = cfg.get("only_cross_attention", False)
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
      raise UnsupportedConfigError(
          f"unet config: only_cross_attention={only_cross!r} is not supported (ti_jax supports False)")
    down = tuple(cfg.get("down_block_types", cls.down_block_types))
    up = tuple(cfg.get("up_block_types", cls.up_block_types))
    mid = cfg.get("mid_block_type", cls.mid_block_type)
    for kind, allowed in ((down, _DOWN_TYPES), (up, _UP_TYPES), ((mid,), _MID_TYPES)):
      for t in kind:
        if t not in allowed:
          raise UnsupportedConfigError(
              f"unet config: block type {t!r} is not supported (supported: {', '.join(allowed)})")
    n = len(down)
    if len(up) != n:
      raise UnsupportedConfigError(
          f"unet config: {len(down)} down blocks but {len(up)} up blocks")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    upcast = cfg.get("upcast_attention", False)
    added = cfg.get("addition_embed_type")
    time_dim = cfg.get("addition_time_embed_dim")
    added_in = cfg.get("projection_class_embeddings_input_dim")
    if added == "text_time" and not (isinstance(time_dim, int) and isinstance(added_in, int)):
      raise UnsupportedConfigError(
          "unet config: addition_embed_type='text_time' needs integer addition_time_embed_dim "
          f"and projection_class_embeddings_input_dim (got {time_dim!r}, {added_in!r})")
    return cls(
        in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        sample_size=cfg.get("sample_size", 64) or 64,
        center_input_sample=bool(cfg.get("center_input_sample", False)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=cfg.get("freq_shift", 0),
        down_block_types=down,
        mid_block_type=mid,
        up_block_types=up,
        block_out_channels=tuple(cfg.get("block_out_channels", cls.block_out_channels)),
        layers_per_block=_per_block(cfg.get("layers_per_block", 2), n, "layers_per_block"),
        transformer_layers_per_block=_per_block(
            cfg.get("transformer_layers_per_block", 1) or 1, n, "transformer_layers_per_block"),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-5),
        cross_attention_dim=cfg.get("cross_attention_dim", 768),
        num_attention_heads=_per_block(heads, n, "attention_head_dim"),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(upcast),
        addition_embed_type=added,
        addition_time_embed_dim=time_dim if added else None,
        projection_class_embeddings_input_dim=added_in if added else None,
    )

  @property
  def time_embed_dim(self) -> int:
    """Width of the time embedding every resnet receives (4x the first block's channels)."""
    return self.block_out_channels[0] * 4


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep features, `[B] -> [B, dim]`, as diffusers' `get_timestep_embedding`."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # [B, half]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class GEGLU(nn.Module):
  inner_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.inner_dim * 2, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="proj")(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = GEGLU(self.dim * 4, self.dtype, self.param_dtype, name="net_0")(x)
    return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(x)


class BasicTransformerBlock(nn.Module):
  dim: int
  heads: int
  upcast: bool
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = lambda name: Attention(self.heads, self.dim // self.heads, self.dim,
                                  upcast=self.upcast, attention_impl=self.attention_impl,
                                  name=name, **kw)
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw)
    x = x + attn("attn1")(ln("norm1")(x))
    x = x + attn("attn2")(ln("norm2")(x), context)
    return x + FeedForward(self.dim, name="ff", **kw)(ln("norm3")(x))


class Transformer2D(nn.Module):
  """Spatial transformer: GroupNorm, proj_in, transformer blocks, proj_out, residual."""
  channels: int
  heads: int
  num_layers: int
  groups: int
  use_linear_projection: bool
  upcast: bool
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    residual = x
    x = nn.GroupNorm(self.groups, epsilon=1e-6, name="norm", **kw)(x)
    proj = (lambda name: nn.Dense(self.channels, name=name, **kw)) if self.use_linear_projection \
        else (lambda name: nn.Conv(self.channels, (1, 1), name=name, **kw))
    if self.use_linear_projection:
      x = proj("proj_in")(x.reshape(b, h * w, c))
    else:
      x = proj("proj_in")(x).reshape(b, h * w, self.channels)
    for i in range(self.num_layers):
      x = BasicTransformerBlock(self.channels, self.heads, self.upcast, self.attention_impl,
                                name=f"transformer_blocks_{i}", **kw)(x, context)
    if self.use_linear_projection:
      x = proj("proj_out")(x).reshape(b, h, w, self.channels)
    else:
      x = proj("proj_out")(x.reshape(b, h, w, self.channels))
    return x + residual


class _BlockSettings(nn.Module):
  """Fields shared by the down, mid and up blocks."""
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  remat: bool = False

  def resnet(self, out_channels, name):
    cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
    return cls(out_channels, self.config.norm_num_groups, self.config.norm_eps,
               dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def transformer(self, channels, heads, layers, name):
    cfg = self.config
    cls = nn.remat(Transformer2D) if self.remat else Transformer2D
    return cls(channels, heads, layers, cfg.norm_num_groups, cfg.use_linear_projection,
               cfg.upcast_attention, self.attention_impl, dtype=self.dtype,
               param_dtype=self.param_dtype, name=name)


class DownBlock(_BlockSettings):
  """CrossAttnDownBlock2D (with_attention) or DownBlock2D; returns output and skip tensors."""
  index: int = 0

  @nn.compact
  def __call__(self, x, temb, context):
    cfg, i = self.config, self.index
    out_ch = cfg.block_out_channels[i]
    with_attention = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
    skips = []
    for j in range(cfg.layers_per_block[i]):
      x = self.resnet(out_ch, f"resnets_{j}")(x, temb)
      if with_attention:
        x = self.transformer(out_ch, cfg.num_attention_heads[i],
                             cfg.transformer_layers_per_block[i], f"attentions_{j}")(x, context)
      skips.append(x)
    if i < len(cfg.block_out_channels) - 1:
      x = Downsample2D(out_ch, 1, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="downsamplers_0")(x)
      skips.append(x)
    return x, skips


class MidBlock(_BlockSettings):
  """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

  @nn.compact
  def __call__(self, x, temb, context):
    cfg = self.config
    ch = cfg.block_out_channels[-1]
    x = self.resnet(ch, "resnets_0")(x, temb)
    x = self.transformer(ch, cfg.num_attention_heads[-1], cfg.transformer_layers_per_block[-1],
                         "attentions_0")(x, context)
    return self.resnet(ch, "resnets_1")(x, temb)


class UpBlock(_BlockSettings):
  """CrossAttnUpBlock2D or UpBlock2D; consumes skip tensors from the end of `skips`."""
  index: int = 0

  @nn.compact
  def __call__(self, x, skips, temb, context):
    # skips: this block's skip tensors in the order the down path made them.
    cfg, i = self.config, self.index
    skips = list(skips)
    n = len(cfg.block_out_channels)
    rev = n - 1 - i  # the down block this up block mirrors
    out_ch = cfg.block_out_channels[rev]
    with_attention = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
    for j in range(cfg.layers_per_block[rev] + 1):
      x = jnp.concatenate([x, skips.pop()], axis=-1)  # [B, h, w, C + C_skip]
      x = self.resnet(out_ch, f"resnets_{j}")(x, temb)
      if with_attention:
        x = self.transformer(out_ch, cfg.num_attention_heads[rev],
                             cfg.transformer_layers_per_block[rev], f"attentions_{j}")(x, context)
    if i < n - 1:
      x = Upsample2D(out_ch, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="upsamplers_0")(x)
    return x


class UNet2DConditionModel(nn.Module):
  """Stable Diffusion's conditional UNet: `(latents [B,h,w,4], t [B], context [B,77,D]) -> [B,h,w,4]`.

  SDXL (`addition_embed_type="text_time"`) also takes `added_cond =
  {"text_embeds": [B, P], "time_ids": [B, 6]}` (diffusers' `added_cond_kwargs`
  names): the pooled text embedding and (original h, w, crop top, left,
  target h, w), embedded and added to the time embedding.
  """
  config: UNetConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  # Recompute each resnet and transformer in the backward pass instead of
  # keeping its activations: less memory for larger batches, more FLOPs.
  remat: bool = False

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array,
               encoder_hidden_states: jax.Array,
               added_cond: Mapping[str, jax.Array] | None = None) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_kw = dict(config=cfg, attention_impl=self.attention_impl, remat=self.remat, **kw)
    channels = cfg.block_out_channels
    sample = sample.astype(self.dtype)
    context = encoder_hidden_states.astype(self.dtype)  # [B, T, D]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    if cfg.center_input_sample:
      sample = 2 * sample - 1.0

    t = timestep_embedding(timesteps, channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = _TimestepMLP(cfg.time_embed_dim, name="time_embedding", **kw)(t.astype(self.dtype))
    if cfg.addition_embed_type == "text_time":
      temb = temb + _text_time_embedding(cfg, added_cond, sample.shape[0], kw)
    elif added_cond is not None:
      raise ValueError("added_cond was given but the UNet config has no addition_embed_type")

    x = nn.Conv(channels[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in", **kw)(sample)
    skips = [x]
    for i in range(len(channels)):
      x, block_skips = DownBlock(index=i, name=f"down_blocks_{i}", **block_kw)(x, temb, context)
      skips.extend(block_skips)
    x = MidBlock(name="mid_block", **block_kw)(x, temb, context)
    for i in range(len(channels)):
      take = cfg.layers_per_block[len(channels) - 1 - i] + 1
      skips, block_skips = skips[:-take], tuple(skips[-take:])
      x = UpBlock(index=i, name=f"up_blocks_{i}", **block_kw)(x, block_skips, temb, context)

    x = nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, name="conv_norm_out", **kw)(x)
    return nn.Conv(cfg.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out", **kw)(
        nn.silu(x))


def _text_time_embedding(cfg: UNetConfig, added_cond: Mapping[str, jax.Array] | None,
                         batch: int, kw: dict) -> jax.Array:
  """SDXL's added embedding `[B, time_embed_dim]`, built in the calling UNet's scope."""
  if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
    raise ValueError('this UNet (addition_embed_type="text_time") needs '
                     'added_cond={"text_embeds": [B, P], "time_ids": [B, 6]}')
  text = jnp.broadcast_to(added_cond["text_embeds"], (batch,) + added_cond["text_embeds"].shape[1:])
  ids = jnp.broadcast_to(added_cond["time_ids"], (batch,) + added_cond["time_ids"].shape[1:])
  ids_emb = timestep_embedding(ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                               cfg.freq_shift).reshape(batch, -1)  # [B, 6 * addition_time_embed_dim]
  added = jnp.concatenate([text.astype(jnp.float32), ids_emb], axis=-1).astype(kw["dtype"])
  return _TimestepMLP(cfg.time_embed_dim, name="add_embedding", **kw)(added)


class _TimestepMLP(nn.Module):
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    t = nn.Dense(self.features, name="linear_1", **kw)(t)
    return nn.Dense(self.features, name="linear_2", **kw)(nn.silu(t))
