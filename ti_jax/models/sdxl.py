"""Stable Diffusion XL's conditioning, as pure functions of the two text encoders.

SDXL's UNet reads (as diffusers' `StableDiffusionXLPipeline.encode_prompt` and
`_get_add_time_ids` build them):

  context [B, 77, D1 + D2]: the penultimate hidden states (before the final
    layer norm) of CLIP ViT-L (`text_encoder`) and of OpenCLIP bigG
    (`text_encoder_2`), concatenated on the feature axis;
  text_embeds [B, P]: bigG's pooled eos state through its `text_projection`;
  time_ids [B, 6]: (original h, w, crop top, left, target h, w).

Pseudo-word vectors enter each encoder through `inputs_embeds` (token
embeddings before positions); the token ids still pick the pooled position.
Equality with diffusers' pipeline is asserted in `tests/models/test_sdxl.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

# SDXL's context length; both tokenizers pad or cut every prompt to it.
MAX_LENGTH = 77


def text_conditioning(encoder_1: Any, params_1: Any, encoder_2: Any, params_2: Any,
                      ids_1: jax.Array, ids_2: jax.Array, embeds_1: jax.Array | None = None,
                      embeds_2: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The UNet's context and pooled text embedding from both encoders.

  Args:
    encoder_1, params_1: `CLIPTextModel` (CLIP ViT-L) and its params (no `{"params": }` wrapper).
    encoder_2, params_2: `CLIPTextModel` with `projection_dim` (transformers'
      `CLIPTextModelWithProjection`, OpenCLIP bigG) and its params.
    ids_1, ids_2: int [B, T] token ids from `tokenizer` and `tokenizer_2`.
    embeds_1, embeds_2: optional [B, T, D1] / [B, T, D2] token embeddings that
      replace each encoder's lookup (how learned vectors enter).

  Returns:
    `(context [B, T, D1 + D2], pooled [B, P])`, in the encoders' compute dtype.
  """
  out_1 = encoder_1.apply({"params": params_1}, ids_1, inputs_embeds=embeds_1, all_outputs=True)
  out_2 = encoder_2.apply({"params": params_2}, ids_2, inputs_embeds=embeds_2, all_outputs=True)
  if "text_embeds" not in out_2:
    raise ValueError("SDXL's second text encoder must have a text_projection (projection_dim)")
  context = jnp.concatenate([out_1["penultimate_hidden_state"],
                             out_2["penultimate_hidden_state"].astype(
                                 out_1["penultimate_hidden_state"].dtype)], axis=-1)  # [B, T, D1+D2]
  return context, out_2["text_embeds"]


def time_ids(original_size: Sequence[int], crop_top_left: Sequence[int] = (0, 0),
             target_size: Sequence[int] | None = None) -> jax.Array:
  """SDXL's size and crop conditioning: float32 [6] in diffusers' order.

  `(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`; the target
  defaults to the original size, as diffusers' pipeline does when both are
  the generated image's (height, width).
  """
  target = original_size if target_size is None else target_size
  values = tuple(original_size) + tuple(crop_top_left) + tuple(target)
  if len(values) != 6:
    raise ValueError(f"time_ids takes (h, w), (top, left), (h, w); got {values}")
  return jnp.asarray(values, jnp.float32)


def unconditional(context: jax.Array, pooled: jax.Array) -> tuple[jax.Array, jax.Array]:
  """SDXL's negative conditioning for an empty negative prompt: zeros of the same shapes.

  diffusers does this when the model_index says `force_zeros_for_empty_prompt`
  (SDXL base does) and no negative prompt is given.
  """
  return jnp.zeros_like(context), jnp.zeros_like(pooled)


def added_cond(pooled: jax.Array, ids: jax.Array) -> dict[str, jax.Array]:
  """The UNet's `added_cond` dict: `text_embeds [B, P]` and `time_ids` broadcast to [B, 6]."""
  ids = jnp.broadcast_to(jnp.asarray(ids, jnp.float32), (pooled.shape[0], 6))
  return {"text_embeds": pooled, "time_ids": ids}
