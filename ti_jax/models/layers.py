"""Building blocks shared by the Flax models: attention (XLA, Pallas, blocked), activations,
and the UNet/VAE blocks.

Module and parameter names mirror the PyTorch diffusers names (`resnets_0` for
`resnets.0`, `to_out_0` for `to_out.0`), so that checkpoint conversion is a
mechanical rename plus layout change (see `ti_jax.weights.convert`). All tensors are
NHWC: `[B, H, W, C]`.
"""

from __future__ import annotations

import functools
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

# `attention_impl` values: JAX's own choices, the Pallas TPU flash-attention kernel and
# ti_jax's blocked (memory-efficient) attention in plain JAX.
PALLAS_TPU = "pallas_tpu"
BLOCKED = "blocked"
ATTENTION_IMPLS = ("", "xla", "cudnn", PALLAS_TPU, BLOCKED)
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
  return None if implementation in (PALLAS_TPU, BLOCKED, "") else implementation


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


# Blocked attention tiles (query rows, key columns). Measured on XLA:CPU
# (benchmarks/attention.py): a [heads, 256, 512] float32 score tile stays in
# cache, where the full [B, heads, 1024, 1024] scores go to memory.
BLOCK_Q = 256
BLOCK_K = 512
# "" resolves to the blocked path on CPU once Tq * Tk reaches this: measured faster
# than XLA's path from 256-token self-attention (16x16 latents) and 1024x77
# cross-attention up; below that both take well under a millisecond.
CPU_BLOCKED_MIN_SCORES = 64 * 1024


def _blocks(x: jax.Array, size: int) -> jax.Array:
  """`[B, N, T, H]` (T a multiple of `size`) -> `[T / size, B, N, size, H]`."""
  b, n, t, h = x.shape
  return x.reshape(b, n, t // size, size, h).transpose(2, 0, 1, 3, 4)


def _unblocks(x: jax.Array) -> jax.Array:
  """Inverse of `_blocks`."""
  nb, b, n, size, h = x.shape
  return x.transpose(1, 2, 0, 3, 4).reshape(b, n, nb * size, h)


def _key_mask(tk: int, block_k: int, nk: int) -> jax.Array:
  """`[nk, block_k]` True for real keys, False for the zero padding of the last block."""
  return (jnp.arange(nk * block_k) < tk).reshape(nk, block_k)


_NEG = float(jnp.finfo(jnp.float32).min)  # masked logit: exp(_NEG - finite max) == 0


def _scores(q: jax.Array, k: jax.Array, valid: jax.Array, scale: float) -> jax.Array:
  """Masked float32 logits `[B, N, bq, bk]` of one (query block, key block) pair."""
  s = jnp.einsum("bnqh,bnkh->bnqk", q, k, preferred_element_type=jnp.float32) * scale
  return jnp.where(valid, s, _NEG)


def _blocked_forward(q, k, v, tk, block_q, block_k):
  """Online-softmax attention over key blocks, one query block at a time.

  q: `[B, N, Tq', H]`, k/v: `[B, N, Tk', H]` padded to the block sizes; `tk`
  keys are real. Returns the output `[B, N, Tq', H]` (float32) and the log-sum-exp
  of each query row's logits `[B, N, Tq']`, which the backward pass uses to
  rebuild the probabilities block by block.
  """
  scale = q.shape[-1] ** -0.5
  kb, vb = _blocks(k, block_k), _blocks(v, block_k)  # [nk, B, N, bk, H]
  mask = _key_mask(tk, block_k, kb.shape[0])

  def one_query_block(qi):  # qi: [B, N, bq, H]
    def over_keys(carry, blk):
      m, l, acc = carry  # running max [B, N, bq], sum [B, N, bq], output [B, N, bq, H]
      kj, vj, valid = blk
      s = _scores(qi, kj, valid, scale)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      acc = acc * corr[..., None] + jnp.einsum(
          "bnqk,bnkh->bnqh", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
      return (m_new, l * corr + p.sum(-1), acc), None

    b, n, bq, h = qi.shape
    init = (jnp.full((b, n, bq), _NEG, jnp.float32), jnp.zeros((b, n, bq), jnp.float32),
            jnp.zeros((b, n, bq, h), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(over_keys, init, (kb, vb, mask))
    return acc / l[..., None], m + jnp.log(l)

  out, lse = jax.lax.map(one_query_block, _blocks(q, block_q))
  nq, b, n, bq = lse.shape
  return _unblocks(out), lse.transpose(1, 2, 0, 3).reshape(b, n, nq * bq)


def _blocked_backward(q, k, v, out, lse, d_out, tk, block_q, block_k):
  """Gradients of `_blocked_forward`'s output w.r.t. q, k, v, block by block.

  The probabilities of each block are rebuilt from the saved log-sum-exp
  (FlashAttention's backward), so no `[Tq, Tk]` array is ever held.
  """
  scale = q.shape[-1] ** -0.5
  kb, vb = _blocks(k, block_k), _blocks(v, block_k)  # [nk, B, N, bk, H]
  mask = _key_mask(tk, block_k, kb.shape[0])
  # rowsum(dO * O): the softmax-Jacobian term of every query row, [B, N, Tq']
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)
  lse_b = lse.reshape(lse.shape[:2] + (-1, block_q)).transpose(2, 0, 1, 3)  # [nq, B, N, bq]
  delta_b = delta.reshape(delta.shape[:2] + (-1, block_q)).transpose(2, 0, 1, 3)

  def over_queries(dkv, blk):
    qi, doi, lse_i, delta_i = blk

    def over_keys(dq_i, kblk):
      kj, vj, valid = kblk
      p = jnp.exp(_scores(qi, kj, valid, scale) - lse_i[..., None])  # [B, N, bq, bk]
      dv_j = jnp.einsum("bnqk,bnqh->bnkh", p.astype(doi.dtype), doi,
                        preferred_element_type=jnp.float32)
      dp = jnp.einsum("bnqh,bnkh->bnqk", doi, vj, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta_i[..., None])).astype(qi.dtype)
      dq_i = dq_i + scale * jnp.einsum("bnqk,bnkh->bnqh", ds, kj,
                                       preferred_element_type=jnp.float32)
      dk_j = scale * jnp.einsum("bnqk,bnqh->bnkh", ds, qi, preferred_element_type=jnp.float32)
      return dq_i, (dk_j, dv_j)

    dq_i, (dk, dv) = jax.lax.scan(over_keys, jnp.zeros(qi.shape, jnp.float32), (kb, vb, mask))
    return (dkv[0] + dk, dkv[1] + dv), dq_i

  zeros = jnp.zeros(kb.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(over_queries, (zeros, zeros),
                              (_blocks(q, block_q), _blocks(d_out, block_q), lse_b, delta_b))
  return (_unblocks(dq).astype(q.dtype), _unblocks(dk).astype(k.dtype),
          _unblocks(dv).astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _blocked_core(q, k, v, tk, block_q, block_k):
  return _blocked_forward(q, k, v, tk, block_q, block_k)[0].astype(q.dtype)


def _blocked_core_fwd(q, k, v, tk, block_q, block_k):
  out, lse = _blocked_forward(q, k, v, tk, block_q, block_k)
  out = out.astype(q.dtype)
  return out, (q, k, v, out, lse)


def _blocked_core_bwd(tk, block_q, block_k, residuals, d_out):
  return _blocked_backward(*residuals, d_out, tk, block_q, block_k)


_blocked_core.defvjp(_blocked_core_fwd, _blocked_core_bwd)


def blocked_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                      block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> jax.Array:
  """Memory-efficient attention in plain JAX on `[B, T, N, H]` tensors (no bias or mask).

  Queries are processed `block_q` rows at a time, keys `block_k` at a time with
  an online softmax (Rabe & Staats 2021; FlashAttention's recurrence), so the
  largest intermediate is one `[B, N, block_q, block_k]` tile instead of the
  `[B, N, Tq, Tk]` scores; the custom backward pass rebuilds the tiles from the
  saved log-sum-exp instead of storing them. Blocks shrink to the sequence
  when it is shorter; longer sequences are zero-padded to whole blocks (padded
  keys are masked, padded query rows dropped). Same result as softmax(q.k)v
  up to float rounding.
  """
  tq, tk = query.shape[1], key.shape[1]
  bq, bk = min(block_q, tq), min(block_k, tk)
  up = lambda n, m: -(-n // m) * m

  def to_core(x, length):  # [B, T, N, H] -> [B, N, T', H]
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  out = _blocked_core(to_core(query, up(tq, bq)), to_core(key, up(tk, bk)),
                      to_core(value, up(tk, bk)), tk, bq, bk)
  return out.transpose(0, 2, 1, 3)[:, :tq]


def _auto_blocked(query: jax.Array, key: jax.Array) -> bool:
  """Whether "" (JAX's choice) runs the blocked path: long sequences on XLA:CPU."""
  return (jax.default_backend() == "cpu"
          and query.shape[1] * key.shape[1] >= CPU_BLOCKED_MIN_SCORES)


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
      or None for JAX's choice), "pallas_tpu" for the Pallas TPU flash
      attention kernel (no bias or causal mask; TPU only, or in
      `pltpu.force_tpu_interpret_mode()`), or "blocked" for
      `blocked_attention` (no bias or causal mask; any device). "" or None
      on CPU runs the blocked path for long sequences without bias or mask
      (`CPU_BLOCKED_MIN_SCORES`), where it is faster than XLA's.

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
  if not implementation and bias is None and not is_causal and _auto_blocked(query, key):
    implementation = BLOCKED
  if implementation == BLOCKED:
    if bias is not None or is_causal:
      raise ValueError("the blocked attention path takes no bias or causal mask")
    return blocked_attention(query, key, value).astype(out_dtype)
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
