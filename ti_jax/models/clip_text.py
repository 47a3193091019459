"""Flax CLIP text transformer (the text encoder of Stable Diffusion 1.x/2.x).

Parameter names mirror transformers' `CLIPTextModel` without the leading
`text_model.`. The token table is an explicit input option (`token_embeddings`)
so textual inversion can splice learned rows into it without copying the
module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ti_jax.models.config_utils import UnsupportedConfigError
from ti_jax.models.layers import ACTIVATIONS, xla_implementation

Dtype = Any

# The activations CLIP checkpoints use.
_ACTIVATIONS = {k: ACTIVATIONS[k] for k in ("quick_gelu", "gelu", "gelu_new")}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of a transformers `text_encoder/config.json` that shape the model."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_transformers(cls, cfg: Mapping[str, Any]) -> "CLIPTextConfig":
    """Builds the config from a transformers CLIPTextConfig dict, refusing unsupported fields."""
    arch = cfg.get("architectures") or ["CLIPTextModel"]
    if arch[0] not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
      raise UnsupportedConfigError(
          f"text_encoder config: architecture {arch[0]!r} is not supported (CLIPTextModel only)")
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
      raise UnsupportedConfigError(
          f"text_encoder config: hidden_act={act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    hidden, heads = cfg.get("hidden_size", 768), cfg.get("num_attention_heads", 12)
    if hidden % heads:
      raise UnsupportedConfigError(
          f"text_encoder config: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    return cls(
        vocab_size=cfg.get("vocab_size", 49408),
        hidden_size=hidden,
        intermediate_size=cfg.get("intermediate_size", 3072),
        num_hidden_layers=cfg.get("num_hidden_layers", 12),
        num_attention_heads=heads,
        max_position_embeddings=cfg.get("max_position_embeddings", 77),
        hidden_act=act,
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
    )


class _EncoderLayer(nn.Module):
  config: CLIPTextConfig
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=name, **kw)
    x = x + _SelfAttention(cfg, self.attention_impl, name="self_attn", **kw)(ln("layer_norm1")(x), mask)
    return x + _MLP(cfg, name="mlp", **kw)(ln("layer_norm2")(x))


class _SelfAttention(nn.Module):
  """Causal self-attention with transformers' names q_proj/k_proj/v_proj/out_proj."""
  config: CLIPTextConfig
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    # mask: bool [B or 1, 1, T, T], True where a query may attend to a key.
    cfg = self.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    dense = lambda name: nn.Dense(cfg.hidden_size, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=name)
    split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))  # [B, T, N, H]
    q, k, v = (split(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                       implementation=xla_implementation(self.attention_impl))
    return dense("out_proj")(out.reshape(x.shape[:2] + (cfg.hidden_size,)))


class _MLP(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _ACTIVATIONS[cfg.hidden_act](nn.Dense(cfg.intermediate_size, name="fc1", **kw)(x))
    return nn.Dense(cfg.hidden_size, name="fc2", **kw)(x)


class _Embeddings(nn.Module):
  config: CLIPTextConfig
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.token_embedding = nn.Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=self.param_dtype)
    self.position_embedding = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                       param_dtype=self.param_dtype)

  def __call__(self, input_ids, inputs_embeds=None):
    if inputs_embeds is None:
      inputs_embeds = self.token_embedding(input_ids)  # [B, T, D]
    positions = jnp.arange(inputs_embeds.shape[1])[None, :]
    return inputs_embeds + self.position_embedding(positions)


class _Encoder(nn.Module):
  config: CLIPTextConfig
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    for i in range(self.config.num_hidden_layers):
      x = _EncoderLayer(self.config, self.attention_impl, name=f"layers_{i}", dtype=self.dtype,
                        param_dtype=self.param_dtype)(x, mask)
    return x


class CLIPTextModel(nn.Module):
  """`input_ids [B, T] -> last_hidden_state [B, T, D]` (after the final layer norm).

  Pass `inputs_embeds` ([B, T, D], token embeddings before positions) to
  replace the token lookup, which is how learned pseudo-word vectors enter.
  """
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  # Where the token table lives in this module's params.
  TOKEN_TABLE_PATH = ("embeddings", "token_embedding", "embedding")

  @nn.compact
  def __call__(self, input_ids: jax.Array, inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _Embeddings(cfg, self.param_dtype, name="embeddings")(input_ids, inputs_embeds)
    x = x.astype(self.dtype)
    t = x.shape[1]
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]  # [1, 1, T, T] causal
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    x = _Encoder(cfg, self.attention_impl, name="encoder", **kw)(x, mask)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)
