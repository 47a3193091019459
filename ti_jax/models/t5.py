"""Flax T5 encoder (FLUX.1's second text encoder: google/t5-v1_1-xxl), as transformers'
`T5EncoderModel` computes it.

Parameter names mirror the PyTorch ones with list indices folded
(`encoder.block.0.layer.1.DenseReluDense.wi_0.weight` ->
`block_0/layer_1/DenseReluDense/wi_0/kernel`) and the token table at the top
(`shared`), so `ti_jax.weights.convert.T5_ENCODER` maps a checkpoint onto this
tree. What sets T5 apart from the CLIP encoders here:

* no position embeddings: a learned relative-position bias, one scalar per head
  and distance bucket, owned by the first block and added to every block's
  attention logits;
* no 1/sqrt(head_dim) scaling of the logits (T5 folds it into the weights);
* RMS norm without mean subtraction or bias, computed in float32 (`T5LayerNorm`);
* a gated feed-forward (v1.1: `gelu_new(x @ wi_0) * (x @ wi_1) @ wo`); no biases anywhere.

Learned pseudo-word vectors enter through `inputs_embeds` (the token
embeddings, there being no positions to add), as in `CLIPTextModel`.
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
from ti_jax.models.layers import ACTIVATIONS, xla_implementation

Dtype = Any

def feed_forward_kind(feed_forward_proj: str) -> tuple[str, bool]:
  """`(activation, gated)` for a transformers `feed_forward_proj` ("gated-gelu" -> gelu_new, gated).

  As in transformers' T5Config: "gated-X" is gated with X, "X" plain, and
  "gated-gelu" means the tanh approximation (`gelu_new`), the one v1.1 trained with.
  """
  parts = feed_forward_proj.split("-")
  gated = len(parts) == 2 and parts[0] == "gated"
  if len(parts) > 2 or (len(parts) == 2 and not gated):
    raise UnsupportedConfigError(
        f"text encoder config: feed_forward_proj={feed_forward_proj!r} is not of the form "
        "'gated-ACT' or 'ACT'")
  act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
  if act not in ACTIVATIONS:
    raise UnsupportedConfigError(
        f"text encoder config: feed_forward_proj={feed_forward_proj!r} is not supported "
        f"(activations: {', '.join(ACTIVATIONS)})")
  return act, gated


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
  """The fields of a transformers T5 `config.json` that shape the encoder."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"

  @classmethod
  def from_transformers(cls, cfg: Mapping[str, Any]) -> "T5EncoderConfig":
    """Builds the config from a transformers T5Config dict, refusing what ti_jax cannot run.

    Absent fields take transformers' T5Config defaults (those of the original T5,
    e.g. `feed_forward_proj="relu"`), as transformers would.
    """
    arch = (cfg.get("architectures") or ["T5EncoderModel"])[0]
    if arch not in ("T5EncoderModel", "T5ForConditionalGeneration", "T5Model"):
      raise UnsupportedConfigError(
          f"text encoder config: architecture {arch!r} is not supported (a T5 encoder only)")
    if cfg.get("model_type", "t5") != "t5":
      raise UnsupportedConfigError(
          f"text encoder config: model_type={cfg['model_type']!r} is not supported ('t5' only; "
          "UMT5's per-layer position bias is another model)")
    if cfg.get("is_decoder", False):
      raise UnsupportedConfigError("text encoder config: is_decoder=True is not an encoder")
    proj = cfg.get("feed_forward_proj", "relu")
    feed_forward_kind(proj)  # raises on an unsupported one
    return cls(
        vocab_size=cfg.get("vocab_size", 32128),
        d_model=cfg.get("d_model", 512),
        d_kv=cfg.get("d_kv", 64),
        d_ff=cfg.get("d_ff", 2048),
        num_layers=cfg.get("num_layers", 6),
        num_heads=cfg.get("num_heads", 8),
        relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=proj,
    )


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int, bidirectional: bool = True) -> np.ndarray:
  """T5's bucket of every (query, key) distance: int32 `[query_length, key_length]`.

  transformers' `T5Attention._relative_position_bucket` on `key - query`: with
  `bidirectional` half of the buckets are for keys after the query; of each half,
  the first half are exact distances, the rest logarithmic up to `max_distance`
  (farther ones share the last bucket). Computed here with numpy in float32, the
  steps torch takes, on the static lengths, so the table is a constant of the program.
  """
  relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  buckets = np.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative > 0).astype(relative.dtype) * num_buckets
    relative = np.abs(relative)
  else:
    relative = -np.minimum(relative, 0)
  max_exact = num_buckets // 2
  with np.errstate(divide="ignore"):
    scaled = (np.log(relative.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
  large = max_exact + np.where(relative < max_exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  buckets += np.where(relative < max_exact, relative, large)
  return buckets.astype(np.int32)


class T5LayerNorm(nn.Module):
  """RMS norm: a scale, no bias or mean, the mean square in float32 (transformers' T5LayerNorm)."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
    return scale.astype(self.dtype) * y


class T5Attention(nn.Module):
  """Self-attention with names q/k/v/o, unscaled logits plus the relative-position `bias`.

  With `has_relative_attention_bias` (the first block) it owns the bucket
  table `relative_attention_bias` and computes the bias `[1, N, T, T]` itself;
  it returns `(output, bias)` so later blocks reuse that bias.
  """
  config: T5EncoderConfig
  has_relative_attention_bias: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None,
               bias: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    cfg = self.config
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    inner = cfg.num_heads * cfg.d_kv
    split = lambda t: t.reshape(t.shape[:2] + (cfg.num_heads, cfg.d_kv))  # [B, T, N, H]
    q, k, v = (split(nn.Dense(inner, name=n, **kw)(x)) for n in ("q", "k", "v"))
    if self.has_relative_attention_bias:
      t = x.shape[1]
      table = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                       param_dtype=self.param_dtype, name="relative_attention_bias")
      buckets = relative_position_buckets(t, t, cfg.relative_attention_num_buckets,
                                          cfg.relative_attention_max_distance)
      bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]  # [1, N, T, T]
    if bias is None:
      raise ValueError("a T5 block without the relative attention bias needs the first block's")
    out = jax.nn.dot_product_attention(q, k, v, bias=bias.astype(self.dtype), mask=mask, scale=1.0,
                                       implementation=xla_implementation(self.attention_impl))
    return nn.Dense(cfg.d_model, name="o", **kw)(out.reshape(x.shape[:2] + (inner,))), bias


class T5DenseReluDense(nn.Module):
  """The feed-forward: `act(x @ wi_0) * (x @ wi_1) @ wo` when gated, else `act(x @ wi) @ wo`."""
  config: T5EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    act, gated = feed_forward_kind(cfg.feed_forward_proj)
    if gated:
      h = ACTIVATIONS[act](nn.Dense(cfg.d_ff, name="wi_0", **kw)(x)) * nn.Dense(
          cfg.d_ff, name="wi_1", **kw)(x)
    else:
      h = ACTIVATIONS[act](nn.Dense(cfg.d_ff, name="wi", **kw)(x))
    return nn.Dense(cfg.d_model, name="wo", **kw)(h)


class _SelfAttentionLayer(nn.Module):
  """transformers' `T5LayerSelfAttention` (`layer.0`): `x + attn(norm(x))`."""
  config: T5EncoderConfig
  has_relative_attention_bias: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, bias):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = T5LayerNorm(self.config.layer_norm_epsilon, name="layer_norm", **kw)(x)
    out, bias = T5Attention(self.config, self.has_relative_attention_bias, self.attention_impl,
                            name="SelfAttention", **kw)(h, mask, bias)
    return x + out, bias


class _FeedForwardLayer(nn.Module):
  """transformers' `T5LayerFF` (`layer.1`): `x + DenseReluDense(norm(x))`."""
  config: T5EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = T5LayerNorm(self.config.layer_norm_epsilon, name="layer_norm", **kw)(x)
    return x + T5DenseReluDense(self.config, name="DenseReluDense", **kw)(h)


class T5Block(nn.Module):
  """One encoder block (`block.{i}`): self-attention `layer_0`, feed-forward `layer_1`."""
  config: T5EncoderConfig
  has_relative_attention_bias: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, bias):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x, bias = _SelfAttentionLayer(self.config, self.has_relative_attention_bias,
                                  self.attention_impl, name="layer_0", **kw)(x, mask, bias)
    return _FeedForwardLayer(self.config, name="layer_1", **kw)(x), bias


class T5EncoderModel(nn.Module):
  """`input_ids [B, T] -> last_hidden_state [B, T, d_model]` (after the final RMS norm).

  `attention_mask` ([B, T], 1 = token, 0 = padding) keeps padding out of every
  query's keys, as transformers does; FLUX's pipeline passes none (its padding
  is attended). Pass `inputs_embeds` ([B, T, d_model], e.g.
  `pseudo_words.embed_tokens` of the `shared` table) to replace the token
  lookup, which is how learned pseudo-word vectors enter.
  """
  config: T5EncoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  # Where the token table lives in this module's params.
  TOKEN_TABLE_PATH = ("shared", "embedding")

  @nn.compact
  def __call__(self, input_ids: jax.Array, inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shared = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=self.param_dtype, name="shared")
    if inputs_embeds is None:
      inputs_embeds = shared(input_ids)  # [B, T, D]
    x = inputs_embeds.astype(self.dtype)
    mask = None
    if attention_mask is not None:
      mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]: the keys
    bias = None
    for i in range(cfg.num_layers):
      x, bias = T5Block(cfg, i == 0, self.attention_impl, name=f"block_{i}", **kw)(x, mask, bias)
    return T5LayerNorm(cfg.layer_norm_epsilon, name="final_layer_norm", **kw)(x)
