"""Prompt templates, prompts with the placeholder filled in, and their token ids.

`tokenize` is the one place prompts become token ids (padded to the encoder's
length); training, sampling and the evaluation all call it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Sequence

import numpy as np

from ti_jax.data.image_loader import Caption, DataError
from ti_jax.runtime import fileio

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
    out.append(fill(templates[i], placeholder_text))
  return out


# Where a template or caption puts the placeholder.
SLOT = "{}"


def fill(template: str, placeholder_text: str) -> str:
  """`template` with every "{}" replaced by `placeholder_text` (other braces stay literal,
  so a caption may hold "{" or "}" and a placeholder such as "{odd}" is kept as it is)."""
  return template.replace(SLOT, placeholder_text)


def as_template(text: str, placeholder_token: str, where: str) -> str:
  """A caption or template line with its slot for S* written as "{}".

  The placeholder itself ("a photo of <cat-toy>") marks the slot as well as "{}".

  Raises:
    DataError: the text has no slot; the message names `where` (file and line).
  """
  template = text.replace(placeholder_token, SLOT) if placeholder_token else text
  if SLOT not in template:
    raise DataError(f"{where}: {text!r} has no slot for the placeholder: write {SLOT} "
                    f"(or {placeholder_token}) where it goes")
  return template


# The largest templates file: about 30,000 templates (the paper uses 27). Each is
# tokenized once per vector count at start-up and held as [num_vectors, templates, 77]
# token ids, so a mistaken huge file would take minutes and gigabytes.
MAX_TEMPLATES_BYTES = 2**20


def read_templates_file(path: str, placeholder_token: str) -> tuple[str, ...]:
  """The templates of a text file, one per non-blank line, each checked for a slot.

  A file over MAX_TEMPLATES_BYTES, a folder, a device or a pipe is refused (DataError).
  """
  try:
    text = fileio.read_small_file(path, MAX_TEMPLATES_BYTES).decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(f"templates_file {path}: not UTF-8 text ({e.reason} at byte {e.start})") \
        from None
  except OSError as e:
    raise DataError(f"cannot read templates_file {path}: {e.strerror or e}") from None
  templates = tuple(as_template(line.strip(), placeholder_token, f"{path}:{number}")
                    for number, line in enumerate(text.splitlines(), start=1) if line.strip())
  if not templates:
    raise DataError(f"templates_file {path} holds no template (one per line, with {SLOT} for "
                    "the placeholder)")
  return templates


@dataclasses.dataclass(frozen=True)
class PromptTexts:
  """The texts a run's prompts come from (templates with "{}" slots)."""
  templates: tuple[str, ...]  # drawn for images without a caption
  source: str  # where the templates come from: "object templates", or the templates file
  captions: list[str | None]  # per image: its caption as a template, or None (templates)
  caption_files: list[str | None]  # per image: the caption file, or None
  from_file: bool = False  # the templates come from a templates file

  def sha256(self) -> str:
    """A digest of the templates and captions ("" when both are the built-in defaults'),
    kept in each checkpoint so a resume with other prompt texts is refused."""
    if not self.from_file and not any(self.captions):
      return ""
    text = json.dumps({"templates": list(self.templates), "captions": self.captions})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def prompt_texts(learnable_property: str, templates_file: str, placeholder_token: str,
                 image_captions: Sequence[Caption | None], num_images: int) -> PromptTexts:
  """The run's templates (`templates_file`, else the paper's for `learnable_property`) and
  each image's caption (`image_loader.read_caption`), every one checked for a slot."""
  if templates_file:
    templates, source = read_templates_file(templates_file, placeholder_token), templates_file
  else:
    templates, source = templates_for(learnable_property), f"{learnable_property} templates"
  found = list(image_captions) or [None] * num_images
  texts = [as_template(c.text, placeholder_token, f"{c.path}:{c.line}") if c else None
           for c in found]
  return PromptTexts(templates=templates, source=source, captions=texts,
                     caption_files=[c.path if c else None for c in found],
                     from_file=bool(templates_file))


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

  def ids(text):
    return tokenize(tokenizer, build_prompts(every_template, templates, text))  # [templates, T]
  template_ids = np.stack([ids(" ".join(tokens[:k])) for k in range(1, n + 1)])
  if not image_tokens:
    return template_ids, None
  image_template_ids = np.stack([
      np.stack([ids(with_image_token(" ".join(tokens[:k]), t)) for t in image_tokens])
      for k in range(1, n + 1)])
  return template_ids, image_template_ids


def caption_tables(tokenizer: Any, image_captions: Sequence[str | None], tokens: list[str],
                   image_tokens: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
  """Token ids of every image's caption, for each count of active vectors (as `prompt_tables`).

  Args:
    image_captions: per image, its caption with "{}" slots, or None (the image
      uses the templates; its rows are padding that `batch_input_ids` never picks).

  Returns:
    `[n, N, T]` the captions filled with the first k vectors' tokens; with
    per-image tokens also `[n, N, T]` with "S* with S_i" of the caption's own
    image i (else None).
  """
  n = len(tokens)
  plain = [c or "" for c in image_captions]

  def ids(texts):
    return tokenize(tokenizer, texts)  # [N, T]
  caption_ids = np.stack([ids([fill(c, " ".join(tokens[:k])) for c in plain])
                          for k in range(1, n + 1)])
  if not image_tokens:
    return caption_ids, None
  image_caption_ids = np.stack([
      ids([fill(c, with_image_token(" ".join(tokens[:k]), t)) for c, t in zip(plain, image_tokens)])
      for k in range(1, n + 1)])
  return caption_ids, image_caption_ids


def batch_input_ids(template_ids: np.ndarray, image_template_ids: np.ndarray | None, active: int,
                    template_index: np.ndarray, view_index: np.ndarray,
                    mixed: np.ndarray | None, captioned: np.ndarray | None = None,
                    caption_ids: np.ndarray | None = None,
                    image_caption_ids: np.ndarray | None = None) -> np.ndarray:
  """`[b, T]` prompt ids of a batch: `active` vectors; per-image prompts where `mixed`.

  A per-image prompt names the token of the example's own image: view v shows
  image v mod N (views N..2N-1 are the mirrors, see `image_loader.view_pixels`).
  With captions (`captioned`: bool `[N]`, `caption_ids`/`image_caption_ids`
  from `caption_tables`), an example whose image has a caption gets the
  caption's row instead of its template's; the template draw is made all the
  same, so the other examples' prompts do not change.
  """
  ids = template_ids[active - 1][template_index]  # [b, T]
  if image_template_ids is None and captioned is None:
    return ids
  num_images = (image_template_ids.shape[1] if image_template_ids is not None
                else len(captioned))
  image = np.asarray(view_index) % num_images  # [b]
  if image_template_ids is not None:
    ids = np.where(np.asarray(mixed)[:, None],
                   image_template_ids[active - 1][image, template_index], ids)
  if captioned is None or not np.any(captioned):
    return ids
  own = caption_ids[active - 1][image]  # [b, T]
  if image_caption_ids is not None:
    own = np.where(np.asarray(mixed)[:, None], image_caption_ids[active - 1][image], own)
  return np.where(np.asarray(captioned)[image][:, None], own, ids)
