"""Flax LDMBert: the text encoder of the paper's model, LDM-1.4B ("ldm-text2im-large-256").

LDMBert is a BART-style pre-norm transformer encoder without a causal mask:
learned token and position tables, 32 layers of (LayerNorm, self-attention
whose q/k/v have no bias) and (LayerNorm, GELU MLP), and a final LayerNorm. The
UNet cross-attends to the last hidden state, all 77 positions (padding
included: the pipeline passes no attention mask).

Parameter names mirror diffusers' PyTorch `LDMBertModel` without the leading
`model.` (`model.layers.3.self_attn.q_proj.weight` -> `layers_3/self_attn/q_proj/kernel`).
Its `to_logits` head is not part of the encoder and is not loaded. The layers
are the shared pre-norm block of `ti_jax.models.transformer` (`block()` holds
LDMBert's differences from CLIP).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ti_jax.models.config_utils import UnsupportedConfigError
from ti_jax.models.layers import ACTIVATIONS
from ti_jax.models.transformer import EncoderBlockConfig, encoder_layers

Dtype = Any

# The activations BART-style encoders (LDMBert's family) use.
_ACTIVATIONS = {k: ACTIVATIONS[k] for k in ("gelu", "gelu_new", "relu")}


@dataclasses.dataclass(frozen=True)
class LDMBertConfig:
  """The fields of an `LDMBertModel` config.json that shape the model (defaults: LDM-1.4B)."""
  vocab_size: int = 30522
  max_position_embeddings: int = 77
  d_model: int = 1280
  encoder_layers: int = 32
  encoder_ffn_dim: int = 5120
  encoder_attention_heads: int = 8
  head_dim: int = 64
  activation_function: str = "gelu"
  layer_norm_eps: float = 1e-5  # torch.nn.LayerNorm's default; LDMBert does not set it

  @property
  def hidden_size(self) -> int:
    """Width of the output (what the UNet's cross_attention_dim must equal)."""
    return self.d_model

  @classmethod
  def from_transformers(cls, cfg: Mapping[str, Any]) -> "LDMBertConfig":
    """Builds the config from an LDMBert config dict, refusing what the model cannot run."""
    act = cfg.get("activation_function", "gelu")
    if act not in _ACTIVATIONS:
      raise UnsupportedConfigError(
          f"bert config: activation_function={act!r} is not supported "
          f"(supported: {', '.join(_ACTIVATIONS)})")
    if cfg.get("scale_embedding", False):
      raise UnsupportedConfigError("bert config: scale_embedding=true is not supported "
                                   "(diffusers' LDMBertModel ignores it too)")
    return cls(
        vocab_size=cfg.get("vocab_size", 30522),
        max_position_embeddings=cfg.get("max_position_embeddings", 77),
        d_model=cfg.get("d_model", cfg.get("hidden_size", 1280)),
        encoder_layers=cfg.get("encoder_layers", 32),
        encoder_ffn_dim=cfg.get("encoder_ffn_dim", 5120),
        encoder_attention_heads=cfg.get("encoder_attention_heads",
                                        cfg.get("num_attention_heads", 8)),
        head_dim=cfg.get("head_dim", 64),
        activation_function=act,
    )

  def block(self) -> EncoderBlockConfig:
    """LDMBert's block: no q/k/v bias, inner width heads * head_dim, fc1/fc2 in the block."""
    return EncoderBlockConfig(
        hidden_size=self.d_model, intermediate_size=self.encoder_ffn_dim,
        num_heads=self.encoder_attention_heads, head_dim=self.head_dim,
        activation=self.activation_function, layer_norm_eps=self.layer_norm_eps,
        qkv_bias=False, attn_norm_name="self_attn_layer_norm", mlp_norm_name="final_layer_norm",
        mlp_name=None)


def is_ldm_bert_config(cfg: Mapping[str, Any]) -> bool:
  """Whether a text-encoder config.json describes an LDMBert (rather than CLIP)."""
  arch = (cfg.get("architectures") or [""])[0]
  return cfg.get("model_type") == "ldmbert" or arch == "LDMBertModel"


class LDMBertModel(nn.Module):
  """`input_ids [B, T] -> last_hidden_state [B, T, d_model]` (after the final layer norm).

  Same calling convention as `CLIPTextModel`: `inputs_embeds` ([B, T, D]
  token embeddings before positions) replaces the token lookup, which is how
  learned pseudo-word vectors enter; `attention_mask` ([B, T], 1 = attend)
  is optional and unused by the LDM pipeline.
  """
  config: LDMBertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  # Where the token table lives in this module's params.
  TOKEN_TABLE_PATH = ("embed_tokens", "embedding")

  @nn.compact
  def __call__(self, input_ids: jax.Array, inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    token_table = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=self.param_dtype,
                           name="embed_tokens")
    if inputs_embeds is None:
      inputs_embeds = token_table(input_ids)  # [B, T, D]
    positions = nn.Embed(cfg.max_position_embeddings, cfg.d_model, param_dtype=self.param_dtype,
                         name="embed_positions")(jnp.arange(inputs_embeds.shape[1])[None, :])
    x = (inputs_embeds + positions).astype(self.dtype)
    mask = None
    if attention_mask is not None:
      mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]
    x = encoder_layers(x, mask, cfg.block(), cfg.encoder_layers, self.attention_impl,
                       self.dtype, self.param_dtype)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="layer_norm", **kw)(x)
