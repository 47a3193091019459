"""Flax FluxTransformer2DModel (FLUX.1-dev, FLUX.1-schnell), with diffusers' parameter names.

Flux denoises a sequence of packed latents: the VAE's `[B, H, W, 16]` latents
become `[B, H/2 * W/2, 64]` tokens (2x2 patches, `pack_latents`). Each token and
each T5 text token gets a 3-axis position id (`latent_image_ids`, `text_ids`);
rotary embeddings over those ids (`rope`) are the only positional signal.
The transformer runs `num_layers` double-stream blocks (image and text keep
their own weights and meet in one joint attention), then `num_single_layers`
single-stream blocks over the concatenated sequence (attention and MLP in
parallel), conditioned throughout on `temb` = timestep + pooled CLIP text
(+ the guidance value for guidance-distilled dev) embeddings via adaptive
layer norms.

Module names mirror diffusers' PyTorch `FluxTransformer2DModel`
(`transformer_blocks_0/attn/to_q`, `single_transformer_blocks_3/proj_mlp`),
so `ti_jax.weights.convert` maps a diffusers checkpoint by renaming. Parity
with diffusers is asserted in `tests/models/test_flux.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ti_jax.models.config_utils import UnsupportedConfigError
from ti_jax.models.layers import attention

Dtype = Any

# FluxPosEmbed's theta (a constant in diffusers, not a config field).
ROPE_THETA = 10000.0
# Width of the sinusoidal timestep / guidance features (diffusers' `Timesteps(256)`).
TIME_PROJ_DIM = 256
# Flux takes the timestep and guidance as fractions of this (diffusers multiplies by 1000).
TIMESTEP_SCALE = 1000.0
# Every norm in the transformer uses this epsilon.
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class FluxConfig:
  """The architecture fields of a diffusers `transformer/config.json` (hashable)."""
  patch_size: int = 1
  in_channels: int = 64
  out_channels: int = 64
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  # dev embeds the guidance scale (guidance distillation); schnell does not.
  guidance_embeds: bool = False
  # The head dimensions rotated by each position axis (index, row, column); they sum to the head dim.
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)

  @classmethod
  def from_diffusers(cls, cfg: Mapping[str, Any]) -> "FluxConfig":
    """Builds the config from a diffusers transformer `config.json` dict, refusing what ti_jax cannot run."""
    head_dim = cfg.get("attention_head_dim", cls.attention_head_dim)
    axes = tuple(cfg.get("axes_dims_rope") or cls.axes_dims_rope)
    if sum(axes) != head_dim or any(d % 2 for d in axes):
      raise UnsupportedConfigError(
          f"flux transformer config: axes_dims_rope {list(axes)} must be even and sum to "
          f"attention_head_dim {head_dim}")
    in_channels = cfg.get("in_channels", cls.in_channels)
    return cls(
        patch_size=cfg.get("patch_size", 1),
        in_channels=in_channels,
        out_channels=cfg.get("out_channels") or in_channels,
        num_layers=cfg.get("num_layers", cls.num_layers),
        num_single_layers=cfg.get("num_single_layers", cls.num_single_layers),
        attention_head_dim=head_dim,
        num_attention_heads=cfg.get("num_attention_heads", cls.num_attention_heads),
        joint_attention_dim=cfg.get("joint_attention_dim", cls.joint_attention_dim),
        pooled_projection_dim=cfg.get("pooled_projection_dim", cls.pooled_projection_dim),
        guidance_embeds=bool(cfg.get("guidance_embeds", False)),
        axes_dims_rope=axes,
    )

  @property
  def inner_dim(self) -> int:
    """The width of the residual stream (heads x head dim; 3072 for FLUX.1)."""
    return self.num_attention_heads * self.attention_head_dim


# ---------------------------------------------------------------------------
# Latent packing and position ids, as diffusers' FluxPipeline builds them.


def pack_latents(latents: jax.Array) -> jax.Array:
  """`[B, H, W, C]` (NHWC VAE latents, H and W even) -> `[B, H/2 * W/2, 4C]` tokens.

  Each token is a 2x2 patch with features ordered (channel, row, column), as
  `FluxPipeline._pack_latents` orders them from NCHW latents.
  """
  b, h, w, c = latents.shape
  x = latents.reshape(b, h // 2, 2, w // 2, 2, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: jax.Array, height: int, width: int) -> jax.Array:
  """Inverse of `pack_latents`: `[B, H/2 * W/2, 4C]` -> `[B, H, W, C]` for latent size (H, W).

  diffusers' `_unpack_latents` takes the pixel size and the VAE factor; this
  takes the latent size itself (pixels // 8).
  """
  b, _, d = packed.shape
  x = packed.reshape(b, height // 2, width // 2, d // 4, 2, 2)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, height, width, d // 4)


def latent_image_ids(height: int, width: int) -> np.ndarray:
  """Position ids `[h * w, 3]` (float32) of a packed `h x w` token grid: (0, row, column).

  `height`, `width` are the packed grid's (latent size // 2), as in
  `FluxPipeline._prepare_latent_image_ids`.
  """
  ids = np.zeros((height, width, 3), np.float32)
  ids[..., 1] = np.arange(height)[:, None]
  ids[..., 2] = np.arange(width)[None, :]
  return ids.reshape(height * width, 3)


def text_ids(length: int) -> np.ndarray:
  """Position ids `[length, 3]` of the text tokens: all zeros, as `FluxPipeline.encode_prompt` makes."""
  return np.zeros((length, 3), np.float32)


# ---------------------------------------------------------------------------
# Rotary position embedding.


def rope(ids: jax.Array, axes_dims: tuple[int, ...],
         theta: float = ROPE_THETA) -> tuple[jax.Array, jax.Array]:
  """`(cos, sin)`, each `[S, sum(axes_dims)]` float32, of position ids `[S, n_axes]`.

  Axis i rotates `axes_dims[i]` consecutive head dimensions with frequencies
  `theta ** (-2k / axes_dims[i])`; each frequency covers two adjacent
  dimensions (a rotated pair), hence the repeat. diffusers' FluxPosEmbed.
  The frequencies are float64 constants rounded once; the angles and their
  cos/sin are float32 (diffusers': float64, then rounded), which differs by
  ~6e-8 x the position (positions stay below a few hundred).
  """
  ids = jnp.asarray(ids, jnp.float32)
  cos, sin = [], []
  for axis, dim in enumerate(axes_dims):
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # [dim / 2]
    angles = ids[:, axis:axis + 1] * jnp.asarray(inv_freq, jnp.float32)[None, :]  # [S, dim / 2]
    cos.append(jnp.repeat(jnp.cos(angles), 2, axis=-1))
    sin.append(jnp.repeat(jnp.sin(angles), 2, axis=-1))
  return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x: jax.Array, freqs: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotates adjacent pairs `(x[2k], x[2k+1])` of `x [B, S, N, H]` by the angles of `freqs`.

  In float32, back to x's dtype (diffusers' `apply_rotary_emb` with
  `use_real_unbind_dim=-1`).
  """
  cos, sin = (f[None, :, None, :] for f in freqs)  # [1, S, 1, H]
  x32 = x.astype(jnp.float32)
  pairs = x32.reshape(x.shape[:-1] + (-1, 2))
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return (x32 * cos + rotated * sin).astype(x.dtype)


# ---------------------------------------------------------------------------
# Blocks.


class _Part(nn.Module):
  """Fields every Flux submodule takes."""
  config: FluxConfig
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def dense(self, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    """A Dense layer in this module's dtypes."""
    return nn.Dense(features, use_bias=use_bias, dtype=self.dtype,
                    param_dtype=self.param_dtype, name=name)

  def rms_norm(self, x: jax.Array, name: str) -> jax.Array:
    """RMS norm over the last axis with a learned scale (torch.nn.RMSNorm), in float32."""
    return nn.RMSNorm(epsilon=_EPS, dtype=jnp.float32, param_dtype=self.param_dtype,
                      name=name)(x).astype(x.dtype)


def _layer_norm(x: jax.Array) -> jax.Array:
  """LayerNorm without scale or bias (eps 1e-6), statistics in float32, back to x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + _EPS)).astype(x.dtype)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """`norm(x) * (1 + scale) + shift`, the adaptive layer norm; shift/scale are `[B, D]`."""
  return _layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


def time_features(t: jax.Array, dim: int = TIME_PROJ_DIM, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features `[B, dim]` (cos half first) of `t [B]` scaled to 0..1000, float32.

  diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`. The
  arguments reach 1000 radians (3500 for dev's guidance), where one float32 ulp
  of a frequency moves a feature by ~6e-5: torch's and XLA's float32 `exp` each
  miss the correctly rounded frequency by an ulp in some entries, so the
  frequencies here are constants computed in float64 and rounded once.
  """
  half = dim // 2
  # The exponents as diffusers computes them (float32), then exp in float64.
  exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / half
  freqs = jnp.asarray(np.exp(exponent.astype(np.float64)), jnp.float32)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _gelu_tanh(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=True)


class _AdaNormProjection(_Part):
  """`linear(silu(temb))` split into `chunks` `[B, D]` modulation vectors (AdaLayerNormZero's)."""
  chunks: int = 6

  @nn.compact
  def __call__(self, temb: jax.Array) -> list[jax.Array]:
    emb = self.dense(self.chunks * self.config.inner_dim, "linear")(nn.silu(temb))
    return jnp.split(emb, self.chunks, axis=-1)


class _Proj(_Part):
  """A `proj` Dense inside its own scope (diffusers' GELU module holds one)."""
  features: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self.dense(self.features, "proj")(x)


class _FeedForward(_Part):
  """diffusers' FeedForward with "gelu-approximate": net.0.proj (4x), tanh GELU, net.2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = self.config.inner_dim
    h = _gelu_tanh(_Proj(self.config, features=4 * dim, name="net_0", dtype=self.dtype,
                         param_dtype=self.param_dtype)(x))
    return self.dense(dim, "net_2")(h)


class FluxAttention(_Part):
  """Multi-head attention with RMS-normed queries and keys and rotary positions.

  With `context` (double-stream blocks) the text tokens get their own
  projections (`add_q_proj`, ...), are put before the image tokens in one joint
  attention, and come back through `to_add_out`; the image tokens through
  `to_out_0`. Without `context` (single-stream blocks, diffusers' `pre_only`)
  the attention output is returned without an output projection.
  """

  @nn.compact
  def __call__(self, x: jax.Array, freqs: tuple[jax.Array, jax.Array],
               context: jax.Array | None = None):
    cfg = self.config
    inner, heads, head_dim = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
    split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))  # [B, T, N, H]

    def qkv(h, names, norms):
      q, k, v = (split(self.dense(inner, n)(h)) for n in names)
      return self.rms_norm(q, norms[0]), self.rms_norm(k, norms[1]), v

    q, k, v = qkv(x, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
    if context is not None:
      cq, ck, cv = qkv(context, ("add_q_proj", "add_k_proj", "add_v_proj"),
                       ("norm_added_q", "norm_added_k"))
      q, k, v = (jnp.concatenate([c, t], axis=1) for c, t in ((cq, q), (ck, k), (cv, v)))
    q, k = apply_rope(q, freqs), apply_rope(k, freqs)
    out = attention(q, k, v, implementation=self.attention_impl)
    out = out.reshape(out.shape[:2] + (inner,))  # [B, T, inner]
    if context is None:
      return out
    text, image = out[:, :context.shape[1]], out[:, context.shape[1]:]
    return self.dense(inner, "to_out_0")(image), self.dense(inner, "to_add_out")(text)


class FluxTransformerBlock(_Part):
  """Double-stream block: image and text, each with its own norms, projections and MLP,
  attending jointly. `(x [B, S, D], context [B, T, D], temb [B, D]) -> (x, context)`."""

  @nn.compact
  def __call__(self, x, context, temb, freqs):
    kw = dict(config=self.config, attention_impl=self.attention_impl, dtype=self.dtype,
              param_dtype=self.param_dtype)
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = _AdaNormProjection(
        name="norm1", **kw)(temb)
    c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = _AdaNormProjection(
        name="norm1_context", **kw)(temb)
    attn, c_attn = FluxAttention(name="attn", **kw)(
        _modulate(x, shift, scale), freqs, _modulate(context, c_shift, c_scale))
    x = x + gate[:, None] * attn
    x = x + gate_mlp[:, None] * _FeedForward(name="ff", **kw)(_modulate(x, shift_mlp, scale_mlp))
    context = context + c_gate[:, None] * c_attn
    context = context + c_gate_mlp[:, None] * _FeedForward(name="ff_context", **kw)(
        _modulate(context, c_shift_mlp, c_scale_mlp))
    return x, context


class FluxSingleTransformerBlock(_Part):
  """Single-stream block over the joined `[text; image]` sequence `[B, T + S, D]`:
  attention and a tanh-GELU MLP side by side, concatenated into `proj_out`."""
  mlp_ratio: float = 4.0

  @nn.compact
  def __call__(self, x, temb, freqs):
    kw = dict(config=self.config, attention_impl=self.attention_impl, dtype=self.dtype,
              param_dtype=self.param_dtype)
    shift, scale, gate = _AdaNormProjection(name="norm", chunks=3, **kw)(temb)
    h = _modulate(x, shift, scale)
    mlp = _gelu_tanh(self.dense(int(self.config.inner_dim * self.mlp_ratio), "proj_mlp")(h))
    attn = FluxAttention(name="attn", **kw)(h, freqs)
    out = self.dense(self.config.inner_dim, "proj_out")(jnp.concatenate([attn, mlp], axis=-1))
    return x + gate[:, None] * out


class _SiluMLP(_Part):
  """linear_1, SiLU, linear_2: diffusers' TimestepEmbedding and PixArtAlphaTextProjection("silu")."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = self.config.inner_dim
    return self.dense(dim, "linear_2")(nn.silu(self.dense(dim, "linear_1")(x)))


class _TimeTextEmbedding(_Part):
  """`temb [B, D]`: the timestep's (and for dev the guidance's) sinusoidal features through
  their MLPs, plus the pooled text vector through its own (CombinedTimestep[Guidance]TextProjEmbeddings)."""

  @nn.compact
  def __call__(self, timestep, pooled, guidance=None):
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    features = lambda t: time_features(t).astype(self.dtype)
    temb = _SiluMLP(name="timestep_embedder", **kw)(features(timestep))
    if self.config.guidance_embeds:
      if guidance is None:
        raise ValueError("this Flux transformer embeds guidance (guidance_embeds=True): "
                         "pass guidance [B]")
      temb = temb + _SiluMLP(name="guidance_embedder", **kw)(features(guidance))
    return temb + _SiluMLP(name="text_embedder", **kw)(pooled.astype(self.dtype))


class FluxTransformer2DModel(nn.Module):
  """Flux's denoiser: `(packed latents [B, S, 64], T5 states [B, T, 4096], pooled CLIP [B, 768],
  t [B], image ids [S, 3], text ids [T, 3], guidance [B] or None) -> [B, S, 64]`.

  `timestep` and `guidance` are as diffusers' transformer takes them: the
  sigma in [0, 1] and the guidance scale, each later multiplied by 1000.
  They stay float32 under bf16 compute (diffusers rounds them to bf16).
  """
  config: FluxConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  # Recompute each block in the backward pass instead of keeping its activations.
  remat: bool = False

  @nn.compact
  def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array,
               pooled_projections: jax.Array, timestep: jax.Array, img_ids: jax.Array,
               txt_ids: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    kw = dict(config=cfg, attention_impl=self.attention_impl, dtype=self.dtype,
              param_dtype=self.param_dtype)
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    batch = hidden_states.shape[0]
    per_sample = lambda t: jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    x = dense(cfg.inner_dim, "x_embedder")(hidden_states.astype(self.dtype))
    temb = _TimeTextEmbedding(name="time_text_embed", **kw)(
        per_sample(timestep) * TIMESTEP_SCALE, pooled_projections,
        None if guidance is None else per_sample(guidance) * TIMESTEP_SCALE)
    context = dense(cfg.inner_dim, "context_embedder")(encoder_hidden_states.astype(self.dtype))
    freqs = rope(jnp.concatenate([jnp.asarray(txt_ids), jnp.asarray(img_ids)], axis=0),
                 cfg.axes_dims_rope)

    double = nn.remat(FluxTransformerBlock) if self.remat else FluxTransformerBlock
    for i in range(cfg.num_layers):
      x, context = double(name=f"transformer_blocks_{i}", **kw)(x, context, temb, freqs)
    # The single-stream blocks run on [text; image]; diffusers joins and splits the two
    # inside each block, which is the same arithmetic.
    text_len = context.shape[1]
    x = jnp.concatenate([context, x], axis=1)
    single = nn.remat(FluxSingleTransformerBlock) if self.remat else FluxSingleTransformerBlock
    for i in range(cfg.num_single_layers):
      x = single(name=f"single_transformer_blocks_{i}", **kw)(x, temb, freqs)
    x = x[:, text_len:]

    # norm_out (AdaLayerNormContinuous): its linear gives (scale, shift), in that order.
    scale, shift = _AdaNormProjection(name="norm_out", chunks=2, **kw)(temb)
    x = _modulate(x, shift, scale)
    return dense(cfg.patch_size ** 2 * cfg.out_channels, "proj_out")(x)
