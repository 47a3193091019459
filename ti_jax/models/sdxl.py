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


def text_conditioning(encoders: Sequence[Any], params: Sequence[Any], ids: Sequence[jax.Array],
                      embeds: Sequence[jax.Array | None] | None = None, *,
                      pool_eos_token_id: int | None = None) -> tuple[jax.Array, jax.Array]:
  """The UNet's context and pooled text embedding from both encoders.

  Every argument but the last is a tuple with one entry per text encoder, in
  the pipeline's order (`StableDiffusion.text_encoders`).

  Args:
    encoders: `CLIPTextModel` (CLIP ViT-L), then `CLIPTextModel` with `projection_dim`
      (transformers' `CLIPTextModelWithProjection`, OpenCLIP bigG).
    params: their params (no `{"params": }` wrapper).
    ids: int [B, T] token ids from each encoder's tokenizer.
    embeds: optional [B, T, D_e] token embeddings that replace each encoder's lookup
      (how learned vectors enter); None: every encoder looks its ids up.
    pool_eos_token_id: None pools where transformers does (SDXL's config says eos 2,
      the legacy rule: the largest id, which is an added pseudo-word's when the
      prompt has one, as in diffusers' pipeline); the second tokenizer's
      `eos_token_id` pools the real eos whatever the prompt holds.

  Returns:
    `(context [B, T, D1 + D2], pooled [B, P])`, in the encoders' compute dtype.
  """
  embeds = tuple(embeds) if embeds is not None else (None,) * len(encoders)
  # Only the last encoder (bigG) is pooled; each gives its penultimate hidden states.
  outs = [e.apply({"params": p}, i, inputs_embeds=x, all_outputs=True,
                  **({"eos_token_id": pool_eos_token_id} if k == len(encoders) - 1 else {}))
          for k, (e, p, i, x) in enumerate(zip(encoders, params, ids, embeds))]
  if "text_embeds" not in outs[-1]:
    raise ValueError("SDXL's second text encoder must have a text_projection (projection_dim)")
  dtype = outs[0]["penultimate_hidden_state"].dtype
  context = jnp.concatenate([o["penultimate_hidden_state"].astype(dtype) for o in outs],
                            axis=-1)  # [B, T, D1 + D2]
  return context, outs[-1]["text_embeds"]


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
