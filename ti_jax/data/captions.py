"""Prompt templates, prompts with the placeholder filled in, and their token ids.

`tokenize` is the one place prompts become token ids (padded to the encoder's
length); training, sampling and the evaluation all call it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ti_jax.data.image_loader import DataError

# Prompt templates of the textual-inversion paper (Gal et al. 2022).  "{}" is
# replaced by the placeholder token.  The paper's style list repeats two
# entries; they are kept once here so templates are drawn uniformly.
OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)


_TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def with_image_token(concept_text: str, image_token: str) -> str:
  """The placeholder text of a per-image prompt: "S* with S_i"."""
  return f"{concept_text} with {image_token}"


def templates_for(learnable_property: str) -> tuple[str, ...]:
  """Returns the prompt templates for "object" or "style" concepts."""
  key = str(learnable_property).strip().lower()
  if key not in _TEMPLATES:
    raise DataError(
        f"learnable_property must be 'object' or 'style', got {learnable_property!r}")
  return _TEMPLATES[key]


def build_prompts(template_index: np.ndarray, templates: Sequence[str],
                  placeholder_text: str) -> list[str]:
  """Fills the chosen templates with the placeholder token.

  Args:
    template_index: int ``[B]`` indices into `templates`.
    templates: templates with one "{}" each, e.g. `templates_for("object")`.
    placeholder_text: the pseudo-word, e.g. "<cat-toy>".

  Returns:
    B prompts, e.g. "a photo of a <cat-toy>".
  """
  out = []
  for i in np.asarray(template_index).reshape(-1).tolist():
    if not 0 <= i < len(templates):
      raise DataError(f"template index {i} out of range for {len(templates)} templates")
    # Positional format keeps any braces inside the placeholder literal.
    out.append(templates[i].format(placeholder_text))
  return out


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int | None = None) -> np.ndarray:
  """Tokenizes prompts to a fixed-length id array for a text encoder.

  The one place prompts become token ids: training, sampling and the CLIP
  evaluation all come here.

  Args:
    tokenizer: a Hugging Face tokenizer (CLIP or BERT).
    prompts: B prompts.
    max_length: the encoder's context length; default `tokenizer.model_max_length`
      (77 for Stable Diffusion).

  Returns:
    int32 ``[B, max_length]`` ids, padded and truncated to that length (the
    tokenizer keeps the end token when it truncates).
  """
  if isinstance(prompts, str):
    raise TypeError("tokenize takes a list of prompts, not a single string")
  ids = tokenizer(list(prompts), padding="max_length",
                  max_length=max_length or tokenizer.model_max_length,
                  truncation=True, return_tensors="np").input_ids
  return np.asarray(ids, dtype=np.int32)  # [B, max_len]


def prompt_tables(tokenizer: Any, templates: Sequence[str], tokens: list[str],
                  image_tokens: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
  """Token ids of every training prompt, so a step only indexes (no tokenizing in the loop).

  Returns:
    `[n, num_templates, T]`: the templates filled with the first k of the n
    vectors' tokens, for every k (progressive_words grows k during training;
    otherwise only k = n is used); and, with per-image tokens,
    `[n, N, num_templates, T]` with "S* with S_i" for each image i (else None).
  """
  n = len(tokens)
  every_template = np.arange(len(templates))

  def fill(text):
    return tokenize(tokenizer, build_prompts(every_template, templates, text))  # [templates, T]
  template_ids = np.stack([fill(" ".join(tokens[:k])) for k in range(1, n + 1)])
  if not image_tokens:
    return template_ids, None
  image_template_ids = np.stack([
      np.stack([fill(with_image_token(" ".join(tokens[:k]), t)) for t in image_tokens])
      for k in range(1, n + 1)])
  return template_ids, image_template_ids


def batch_input_ids(template_ids: np.ndarray, image_template_ids: np.ndarray | None, active: int,
                    template_index: np.ndarray, view_index: np.ndarray,
                    mixed: np.ndarray | None) -> np.ndarray:
  """`[b, T]` prompt ids of a batch: `active` vectors; per-image prompts where `mixed`.

  A per-image prompt names the token of the example's own image: view v shows
  image v mod N (views N..2N-1 are the mirrors, see `image_loader.view_pixels`).
  """
  ids = template_ids[active - 1][template_index]  # [b, T]
  if image_template_ids is None:
    return ids
  num_images = image_template_ids.shape[1]
  image = np.asarray(view_index) % num_images
  return np.where(np.asarray(mixed)[:, None],
                  image_template_ids[active - 1][image, template_index], ids)
