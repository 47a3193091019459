"""The pre-norm transformer encoder block shared by CLIP text, CLIP vision and LDMBert.

All three run the same block, `x + attn(norm(x))` then `x + mlp(norm(x))`;
they differ only in what `EncoderBlockConfig` holds: the MLP activation,
whether q/k/v carry a bias, the attention's inner width (CLIP: the hidden
size split over the heads; LDMBert: heads * head_dim, narrower than the model)
and the parameter names their PyTorch checkpoints use (`ti_jax.weights.convert`
maps those names onto this tree, so they are part of the contract).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ti_jax.models.layers import ACTIVATIONS, xla_implementation

Dtype = Any


@dataclasses.dataclass(frozen=True)
class EncoderBlockConfig:
  """One encoder block's sizes, activation and checkpoint names.

  `attn_norm_name`/`mlp_norm_name` name the two layer norms; `mlp_name` is
  the scope holding `fc1`/`fc2` (CLIP: "mlp"), or None where they sit in the
  block itself (LDMBert).
  """
  hidden_size: int
  intermediate_size: int
  num_heads: int
  head_dim: int
  activation: str
  layer_norm_eps: float
  qkv_bias: bool = True
  attn_norm_name: str = "layer_norm1"
  mlp_norm_name: str = "layer_norm2"
  mlp_name: str | None = "mlp"


class _BlockPart(nn.Module):
  """The fields every part of the block takes."""
  config: EncoderBlockConfig
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def kw(self) -> dict:
    """The dtypes a submodule of this part takes."""
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class SelfAttention(_BlockPart):
  """Multi-head self-attention with transformers' names q_proj/k_proj/v_proj/out_proj."""

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`x [B, T, D]` -> `[B, T, D]`; `mask`: bool, broadcastable to [B, 1, T, T], True = attend."""
    cfg, kw = self.config, self.kw
    inner = cfg.num_heads * cfg.head_dim
    split = lambda t: t.reshape(t.shape[:2] + (cfg.num_heads, cfg.head_dim))  # [B, T, N, H]
    q, k, v = (split(nn.Dense(inner, use_bias=cfg.qkv_bias, name=n, **kw)(x))
               for n in ("q_proj", "k_proj", "v_proj"))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                       implementation=xla_implementation(self.attention_impl))
    return nn.Dense(cfg.hidden_size, name="out_proj", **kw)(out.reshape(x.shape[:2] + (inner,)))


def _feed_forward(x: jax.Array, cfg: EncoderBlockConfig, kw: dict) -> jax.Array:
  """fc1 -> activation -> fc2, built in the scope of the module that calls it."""
  h = ACTIVATIONS[cfg.activation](nn.Dense(cfg.intermediate_size, name="fc1", **kw)(x))
  return nn.Dense(cfg.hidden_size, name="fc2", **kw)(h)


class _FeedForward(_BlockPart):
  """`_feed_forward` in a scope of its own (CLIP's `mlp`)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _feed_forward(x, self.config, self.kw)


class EncoderBlock(_BlockPart):
  """Pre-norm block: `x + self_attn(norm(x))`, then `x + mlp(norm(x))`; `[B, T, D]` in and out."""

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
    cfg, kw = self.config, self.kw
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=name, **kw)
    x = x + SelfAttention(cfg, self.attention_impl, name="self_attn", **kw)(
        ln(cfg.attn_norm_name)(x), mask)
    h = ln(cfg.mlp_norm_name)(x)
    if cfg.mlp_name is None:
      return x + _feed_forward(h, cfg, kw)
    return x + _FeedForward(cfg, name=cfg.mlp_name, **kw)(h)


def encoder_layers(x: jax.Array, mask: jax.Array | None, config: EncoderBlockConfig,
                   num_layers: int, attention_impl: str | None, dtype: Dtype,
                   param_dtype: Dtype) -> jax.Array:
  """Runs `num_layers` blocks named `layers_{i}` in the calling compact module's scope."""
  for i in range(num_layers):
    x = EncoderBlock(config, attention_impl, name=f"layers_{i}", dtype=dtype,
                     param_dtype=param_dtype)(x, mask)
  return x
