"""Building blocks shared by the Flax UNet and VAE.

Module and parameter names mirror the PyTorch diffusers names (`resnets_0` for
`resnets.0`, `to_out_0` for `to_out.0`), so that checkpoint conversion is a
mechanical rename plus layout change (see `ti_jax.convert`). All tensors are
NHWC: `[B, H, W, C]`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# transformers' activation names (`hidden_act`, `activation_function`) as JAX functions.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

# `attention_impl` values: JAX's own choices plus the Pallas TPU flash-attention kernel.
PALLAS_TPU = "pallas_tpu"
ATTENTION_IMPLS = ("", "xla", "cudnn", PALLAS_TPU)
_PALLAS_BLOCK = 128  # the kernel's default tile; sequence lengths are padded to it
_LANES = 128  # TPU vector lane width: head dims are padded to a multiple of it


def resolve_attention_impl(implementation: str | None, devices=None) -> str | None:
  """The UNet attention to build for a configured `attention_impl` ("" or None: choose).

  On TPUs the choice is the Pallas flash-attention kernel: XLA's attention
  materialises `[B, heads, T, T]` scores, the kernel never does, and it pads any
  sequence and head size to its tiles. Elsewhere None leaves the choice to
  `jax.nn.dot_product_attention`, as before. `devices` default to JAX's
  default backend.
  """
  if implementation:
    return implementation
  platform = devices[0].platform if devices else jax.default_backend()
  return PALLAS_TPU if platform == "tpu" else None


def xla_implementation(implementation: str | None) -> str | None:
  """The `jax.nn.dot_product_attention` implementation for a configured one.

  The Pallas kernel serves the UNet's long image sequences; the text
  encoders' 77-token (masked) attention stays on XLA.
  """
  return None if implementation in (PALLAS_TPU, "") else implementation


def _pallas_tpu_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
  """Flash attention with JAX's Pallas TPU kernel on `[B, T, N, H]` tensors.

  The kernel tiles sequences in blocks of 128 and keeps the head dimension in
  the 128-wide lanes, so sequences are zero-padded to a multiple of 128 (padded
  keys are masked out with segment ids, padded query rows dropped) and heads
  to a multiple of 128 lanes (zeros change neither q.k nor the kept outputs).
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=import-outside-toplevel
  b, tq, _, h = query.shape
  tk = key.shape[1]
  up = lambda n, m: -(-n // m) * m
  pq, pk, ph = up(tq, _PALLAS_BLOCK), up(tk, _PALLAS_BLOCK), up(h, _LANES)

  def to_kernel(x, length):  # [B, T, N, H] -> [B, N, T', H']
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, ph - h)))
    return x.transpose(0, 2, 1, 3)

  segment_ids = None
  if pk != tk:
    segment_ids = fa.SegmentIds(
        q=jnp.ones((b, pq), jnp.int32),
        kv=jnp.broadcast_to((jnp.arange(pk) < tk).astype(jnp.int32), (b, pk)))
  out = fa.flash_attention(to_kernel(query, pq), to_kernel(key, pk), to_kernel(value, pk),
                           segment_ids=segment_ids, sm_scale=float(h) ** -0.5)  # [B, N, T', H']
  return out.transpose(0, 2, 1, 3)[:, :tq, :, :h]


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
              upcast: bool = False, is_causal: bool = False,
              bias: jax.Array | None = None,
              implementation: str | None = None) -> jax.Array:
  """Scaled dot-product attention on `[B, T, heads, head_dim]` tensors.

  Args:
    query: `[B, Tq, N, H]`.
    key, value: `[B, Tk, N, H]`.
    upcast: compute in float32 (SD 2.x sets `upcast_attention`; bf16 logits
      overflow there).
    is_causal: apply a lower-triangular mask (CLIP text encoder).
    bias: optional additive logits bias broadcastable to `[B, N, Tq, Tk]`.
    implementation: passed to `jax.nn.dot_product_attention` ("xla", "cudnn"
      or None for JAX's choice), or "pallas_tpu" for the Pallas TPU flash
      attention kernel (no bias or causal mask; TPU only, or in
      `pltpu.force_tpu_interpret_mode()`).

  Returns:
    `[B, Tq, N, H]` in the dtype of `query`.
  """
  out_dtype = query.dtype
  if upcast:
    query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
  if implementation == PALLAS_TPU:
    if bias is not None or is_causal:
      raise ValueError("the pallas_tpu attention path takes no bias or causal mask")
    return _pallas_tpu_attention(query, key, value).astype(out_dtype)
  out = jax.nn.dot_product_attention(query, key, value, bias=bias,
                                     is_causal=is_causal,
                                     implementation=xla_implementation(implementation))
  return out.astype(out_dtype)


def multihead_attention(x: jax.Array, context: jax.Array | None, *, heads: int, head_dim: int,
                        out_features: int, qkv_bias: bool = False, upcast: bool = False,
                        attention_impl: str | None = None, dtype: Dtype = jnp.float32,
                        param_dtype: Dtype = jnp.float32) -> jax.Array:
  """Projections to_q/to_k/to_v, attention, to_out_0, created in the calling compact module.

  Being a function rather than a module keeps the projections directly under
  the caller's scope, as in diffusers (`attn1.to_q`, `attentions.0.to_q`).
  x: [B, Tq, C]; context: [B, Tk, Cctx] or None for self-attention.
  """
  context = x if context is None else context
  inner = heads * head_dim
  dense = lambda name, bias: nn.Dense(inner, use_bias=bias, dtype=dtype,
                                      param_dtype=param_dtype, name=name)
  split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))
  q = split(dense("to_q", qkv_bias)(x))        # [B, Tq, N, H]
  k = split(dense("to_k", qkv_bias)(context))  # [B, Tk, N, H]
  v = split(dense("to_v", qkv_bias)(context))
  out = attention(q, k, v, upcast=upcast, implementation=attention_impl)
  out = out.reshape(out.shape[:2] + (inner,))
  return nn.Dense(out_features, dtype=dtype, param_dtype=param_dtype, name="to_out_0")(out)


class Attention(nn.Module):
  """Multi-head (cross-)attention with diffusers' parameter names (to_q/to_k/to_v/to_out_0)."""
  heads: int
  head_dim: int
  out_features: int
  qkv_bias: bool = False
  upcast: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    return multihead_attention(
        x, context, heads=self.heads, head_dim=self.head_dim, out_features=self.out_features,
        qkv_bias=self.qkv_bias, upcast=self.upcast, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype)


class ResnetBlock2D(nn.Module):
  """diffusers' ResnetBlock2D ("default" time-embedding norm, scale factor 1)."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  # Keep the residual sum in float32 under bf16 compute. The VAE sets this:
  # its deep residual stack loses ~2% in bf16 otherwise, and it runs rarely
  # (latents are cached), so the extra activation memory does not matter.
  residual_fp32: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.GroupNorm(self.groups, epsilon=self.eps, name=name, dtype=jnp.float32, param_dtype=self.param_dtype)
    conv = lambda name: nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)),
                                name=name, **kw)
    h = conv("conv1")(nn.silu(norm("norm1")(x)))
    if temb is not None:
      t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = conv("conv2")(nn.silu(norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), name="conv_shortcut", **kw)(x)
    if self.residual_fp32:
      return x.astype(jnp.float32) + h.astype(jnp.float32)
    return x + h


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv. `padding` 1 is symmetric (UNet); 0 pads right/bottom by one (VAE)."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
    return nn.Conv(self.out_channels, (3, 3), strides=(2, 2), padding=pad,
                   dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)),
                   dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
