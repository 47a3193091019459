"""Flax CLIP text transformer (the text encoders of Stable Diffusion 1.x/2.x/XL).

Parameter names mirror transformers' `CLIPTextModel` (and, with
`text_projection`, `CLIPTextModelWithProjection`: SDXL's second encoder)
without the leading `text_model.`. Learned pseudo-word vectors enter through `inputs_embeds`
(token embeddings before positions), so textual inversion needs no copy of
the module or of its token table. The encoder blocks are `ti_jax.models.transformer.EncoderBlock`;
`CLIPEncoder` and `clip_block` also serve the CLIP vision tower (clip.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ti_jax.models.config_utils import UnsupportedConfigError
from ti_jax.models.layers import ACTIVATIONS
from ti_jax.models.transformer import EncoderBlock, EncoderBlockConfig, encoder_layers

Dtype = Any

# transformers' `eos_token_id` of CLIP configs written before its PR #24773;
# such configs pool at the largest token id instead of the first eos.
LEGACY_EOS_TOKEN_ID = 2

# The activations CLIP checkpoints use.
CLIP_ACTIVATIONS = {k: ACTIVATIONS[k] for k in ("quick_gelu", "gelu", "gelu_new")}


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
  # Set for `CLIPTextModelWithProjection`: the width of its bias-free
  # `text_projection` of the pooled (eos) state; None for `CLIPTextModel`.
  projection_dim: int | None = None
  # Which position is pooled (see `eos_positions`); 2 is the legacy rule.
  eos_token_id: int = LEGACY_EOS_TOKEN_ID

  @classmethod
  def from_transformers(cls, cfg: Mapping[str, Any]) -> "CLIPTextConfig":
    """Builds the config from a transformers CLIPTextConfig dict, refusing unsupported fields."""
    arch = cfg.get("architectures") or ["CLIPTextModel"]
    if arch[0] not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
      raise UnsupportedConfigError(
          f"text_encoder config: architecture {arch[0]!r} is not supported "
          "(CLIPTextModel and CLIPTextModelWithProjection only)")
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in CLIP_ACTIVATIONS:
      raise UnsupportedConfigError(
          f"text_encoder config: hidden_act={act!r} is not supported (supported: {', '.join(CLIP_ACTIVATIONS)})")
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
        projection_dim=(cfg.get("projection_dim", 512)
                        if arch[0] == "CLIPTextModelWithProjection" else None),
        eos_token_id=cfg.get("eos_token_id", 2),
    )

  def block(self) -> EncoderBlockConfig:
    """The encoder block these sizes describe (the hidden size split over the heads)."""
    return clip_block(self.hidden_size, self.intermediate_size, self.num_attention_heads,
                      self.hidden_act, self.layer_norm_eps)


def clip_block(hidden_size: int, intermediate_size: int, num_heads: int, act: str,
               layer_norm_eps: float) -> EncoderBlockConfig:
  """CLIP's block (text and vision alike): biased q/k/v, `layer_norm1/2`, fc1/fc2 under `mlp`."""
  return EncoderBlockConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_heads=num_heads, head_dim=hidden_size // num_heads,
                            activation=act, layer_norm_eps=layer_norm_eps)


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


class CLIPEncoder(nn.Module):
  """The stack of encoder blocks (transformers' `encoder.layers.{i}`).

  With `with_penultimate`, returns `(last, penultimate)`: the outputs of the
  last and of the second-to-last block (transformers' `hidden_states[-1]` and
  `hidden_states[-2]`, the latter being the embeddings for a one-layer stack).
  """
  config: EncoderBlockConfig
  num_layers: int
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  with_penultimate: bool = False

  @nn.compact
  def __call__(self, x, mask):
    if not self.with_penultimate:
      return encoder_layers(x, mask, self.config, self.num_layers, self.attention_impl,
                            self.dtype, self.param_dtype)
    penultimate = x
    for i in range(self.num_layers):
      penultimate = x
      x = EncoderBlock(self.config, self.attention_impl, name=f"layers_{i}", dtype=self.dtype,
                       param_dtype=self.param_dtype)(x, mask)
    return x, penultimate


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Per sequence, the token position whose state CLIP's text tower pools: int [B].

  transformers 5.x: a config with `eos_token_id == 2` (written before the id
  was fixed) takes the largest token id, which is the eos in OpenAI's
  vocabulary; any other config takes the first occurrence of `eos_token_id`
  (pad may equal eos, so the first one is the real end). A sequence without
  the eos gives position 0 under the second rule, as in transformers.
  """
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextModel(nn.Module):
  """`input_ids [B, T] -> last_hidden_state [B, T, D]` (after the final layer norm).

  Pass `inputs_embeds` ([B, T, D], token embeddings before positions) to
  replace the token lookup, which is how learned pseudo-word vectors enter;
  `input_ids` still decide which position is pooled. With `all_outputs=True`
  it returns a dict (see `__call__`), as SDXL's conditioning needs. A config
  with `projection_dim` is transformers' `CLIPTextModelWithProjection`.
  """
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  # Where the token table lives in this module's params.
  TOKEN_TABLE_PATH = ("embeddings", "token_embedding", "embedding")

  @nn.compact
  def __call__(self, input_ids: jax.Array, inputs_embeds: jax.Array | None = None,
               attention_mask: jax.Array | None = None, all_outputs: bool = False,
               eos_token_id: int | None = None) -> jax.Array | dict[str, jax.Array]:
    """The last hidden state, or with `all_outputs` a dict of:

      last_hidden_state [B, T, D]: after the final layer norm;
      penultimate_hidden_state [B, T, D]: the second-to-last block's output,
        before the final layer norm (transformers' `hidden_states[-2]`);
      pooler_output [B, D]: `last_hidden_state` at the eos position;
      text_embeds [B, P]: `pooler_output @ text_projection` (with projection only).

    The pooled position follows transformers (`eos_positions` with the
    config's `eos_token_id`). Under the legacy rule (eos_token_id 2, as in
    SD/SDXL checkpoints) that is the largest id, so an added pseudo-word
    (ids past the vocabulary) is pooled instead of the eos, as in diffusers'
    pipelines; pass the tokenizer's `eos_token_id` to pool its first eos instead.
    """
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _Embeddings(cfg, self.param_dtype, name="embeddings")(input_ids, inputs_embeds)
    x = x.astype(self.dtype)
    t = x.shape[1]
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]  # [1, 1, T, T] causal
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    x, penultimate = CLIPEncoder(cfg.block(), cfg.num_hidden_layers, self.attention_impl,
                                 name="encoder", with_penultimate=True, **kw)(x, mask)
    last = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)
    if not all_outputs and cfg.projection_dim is None:
      return last
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    pos = eos_positions(input_ids, eos)  # [B]
    pooled = jnp.take_along_axis(last, pos[:, None, None], axis=1)[:, 0]  # [B, D]
    out = {"last_hidden_state": last, "penultimate_hidden_state": penultimate,
           "pooler_output": pooled}
    if cfg.projection_dim is not None:
      # Always built (so `init` makes it); XLA drops it when only the hidden state is used.
      out["text_embeds"] = nn.Dense(cfg.projection_dim, use_bias=False, name="text_projection",
                                    **kw)(pooled)
    return out if all_outputs else last
