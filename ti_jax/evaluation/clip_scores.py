"""CLIP-space similarity scores of the textual-inversion paper's evaluation.

Gal et al. (2022), section 5, measure a learned pseudo-word ``S*`` on two axes:

* **Image similarity** (reconstruction): generate images with "a photo of S*"
  and average the CLIP cosine similarity over every pair of (generated image,
  training image).
* **Text similarity** (editability): for each evaluation prompt with ``S*``
  ("A photo of S* on the moon"), generate images and average the cosine
  between each image's CLIP embedding and the CLIP text embedding of the same
  prompt with ``S*`` left out ("A photo of on the moon").

Everything here is pure numpy on embeddings that the caller computed; the
CLIP model itself lives elsewhere. Inputs need not be normalised. Bad inputs
(wrong shapes, zero or non-finite vectors) raise `ValueError` with a one-line
message instead of producing NaN scores.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "PromptScore",
    "cosine_matrix",
    "image_similarity",
    "normalize",
    "prompt_score",
    "report",
    "text_cosines",
    "text_similarity",
]


def _as_matrix(features: Any, name: str) -> np.ndarray:
  """float64 `[N, D]` copy of `features`, with shape and finiteness checked."""
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a [N, D] array of embeddings, got shape {x.shape}")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} is empty (shape {x.shape}): need at least one embedding")
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    raise ValueError(
        f"{name} row {int(np.argmax(bad))} of {x.shape[0]} has non-finite values (NaN or inf)")
  return x


def normalize(features: Any, name: str = "features") -> np.ndarray:
  """Scales every row to unit L2 norm.

  Args:
    features: `[N, D]` embeddings (any float dtype, any scale).
    name: what the rows are, for error messages.

  Returns:
    float64 `[N, D]` array whose rows have norm 1.

  Raises:
    ValueError: `features` is not 2-D, is empty, or has a zero or non-finite
      row (whose direction, and so whose cosine, is undefined).
  """
  x = _as_matrix(features, name)  # [N, D]
  # A zero row has no direction; dividing would give NaN, so refuse rather
  # than report a bogus score.
  peak = np.abs(x).max(axis=1, keepdims=True)  # [N, 1]
  zero = peak[:, 0] == 0
  if zero.any():
    raise ValueError(
        f"{name} row {int(np.argmax(zero))} of {x.shape[0]} is a zero vector: "
        "its cosine similarity is undefined")
  # Dividing by the largest entry first keeps the squares in the norm from
  # underflowing or overflowing for very small or very large rows.
  x = x / peak
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosine_matrix(a: Any, b: Any, names: tuple[str, str] = ("a", "b")) -> np.ndarray:
  """Cosine similarity of every row of `a` with every row of `b`.

  Args:
    a: `[N, D]` embeddings.
    b: `[M, D]` embeddings in the same space.
    names: what `a` and `b` are, for error messages.

  Returns:
    float64 `[N, M]` array; entry `[i, j]` is cos(a_i, b_j), in [-1, 1].
  """
  a = normalize(a, names[0])  # [N, D]
  b = normalize(b, names[1])  # [M, D]
  if a.shape[1] != b.shape[1]:
    raise ValueError(
        f"{names[0]} and {names[1]} have different embedding sizes: "
        f"{a.shape[1]} vs {b.shape[1]}")
  # Rounding can push |cos| of (anti)parallel vectors a hair past 1.
  return np.clip(a @ b.T, -1.0, 1.0)  # [N, M]


def image_similarity(generated: Any, training: Any) -> float:
  """The paper's image similarity (reconstruction score).

  Args:
    generated: `[N, D]` CLIP image embeddings of images generated with the
      reconstruction prompt ("a photo of S*").
    training: `[M, D]` CLIP image embeddings of the concept's training images.

  Returns:
    The mean over all N x M (generated, training) pairs of their cosine
    similarity.
  """
  return float(cosine_matrix(generated, training, ("generated", "training")).mean())


def text_cosines(generated: Any, text: Any) -> np.ndarray:
  """Cosine of each generated image embedding with one text embedding.

  Args:
    generated: `[N, D]` CLIP image embeddings of images generated from one prompt.
    text: `[D]` (or `[1, D]`) CLIP text embedding of that prompt without the
      pseudo-word.

  Returns:
    float64 `[N]` cosines.
  """
  t = np.asarray(text, dtype=np.float64)
  if t.ndim == 2 and t.shape[0] == 1:
    t = t[0]
  if t.ndim != 1:
    raise ValueError(f"text must be one [D] embedding, got shape {t.shape}")
  return cosine_matrix(generated, t[None, :], ("generated", "text"))[:, 0]  # [N]


def text_similarity(generated: Any, text: Any) -> float:
  """The paper's text similarity (editability score) for one prompt.

  Args:
    generated: `[N, D]` CLIP image embeddings of images generated from a prompt
      with the pseudo-word ("A photo of S* on the moon").
    text: `[D]` CLIP text embedding of the prompt with the pseudo-word removed
      ("A photo of on the moon").

  Returns:
    The mean over the N images of cos(image, text): the score ti_jax reports
    as text similarity (with its spread over the images, `prompt_score`). The
    paper's text (section 5) instead takes the cosine of the *mean* image
    embedding with the text: see `text_similarity_of_mean`, reported beside it.
  """
  return float(text_cosines(generated, text).mean())


def text_similarity_of_mean(generated: Any, text: Any) -> float:
  """Text similarity as the paper words it: cos(mean of the N unit image embeddings, text).

  It equals `text_similarity` divided by the length of the mean unit
  embedding (at most 1), so it is never nearer zero; the gap grows with the
  spread of the images. Both are reported so numbers can be set against the paper's figure.
  """
  unit = normalize(generated, "generated")  # [N, D]
  return float(cosine_matrix(unit.mean(axis=0, keepdims=True), np.atleast_2d(text),
                             ("mean generated", "text"))[0, 0])


@dataclasses.dataclass(frozen=True)
class PromptScore:
  """Text similarity of the images generated from one evaluation prompt.

  Attributes:
    template: the prompt with "{}" where the pseudo-word goes.
    category: what the prompt tests ("background", "style", ...).
    text_similarity: mean cosine of the images with the pseudo-word-free text.
    text_similarity_std: population standard deviation of those cosines.
    num_images: how many generated images the mean is over.
    text_similarity_of_mean: the paper's wording of the score (cosine of the
      mean image embedding with the text), see `text_similarity_of_mean`.
  """

  template: str
  category: str
  text_similarity: float
  text_similarity_std: float
  num_images: int
  text_similarity_of_mean: float | None = None

  def as_dict(self) -> dict[str, Any]:
    """JSON-ready dict of the fields."""
    return dataclasses.asdict(self)


def prompt_score(template: str, category: str, generated: Any, text: Any) -> PromptScore:
  """Scores one evaluation prompt.

  Args:
    template: the prompt with "{}" for the pseudo-word.
    category: the prompt's category.
    generated: `[N, D]` CLIP image embeddings of the images generated from it.
    text: `[D]` CLIP text embedding of the prompt without the pseudo-word.

  Returns:
    The prompt's `PromptScore`.
  """
  cos = text_cosines(generated, text)  # [N]
  return PromptScore(template=str(template), category=str(category),
                     text_similarity=float(cos.mean()), text_similarity_std=float(cos.std()),
                     num_images=int(cos.shape[0]),
                     text_similarity_of_mean=text_similarity_of_mean(generated, text))


def _mean(values: Iterable[float]) -> float:
  values = list(values)
  return float(sum(values) / len(values))


def report(image_sim: float, prompt_scores: Sequence[PromptScore],
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Gathers one concept's scores into a JSON-ready dict.

  Overall and per-category text similarity are means over prompts (each
  prompt counts once, whatever its number of images), as the paper averages
  over its prompt list; with the same number of images per prompt this equals
  the mean over all images.

  Args:
    image_sim: the concept's `image_similarity`.
    prompt_scores: one `PromptScore` per evaluation prompt (at least one).
    extra: more JSON-ready fields to include (run, step, CLIP model, ...);
      they must not reuse the keys this function writes.

  Returns:
    ``{"image_similarity", "text_similarity", "text_similarity_by_category",
    "num_prompts", "prompts": [PromptScore.as_dict(), ...], **extra}``, with
    categories in order of first appearance.
  """
  if not prompt_scores:
    raise ValueError("no prompt scores to report: the evaluation needs at least one prompt")
  values = [float(image_sim)] + [s.text_similarity for s in prompt_scores]
  if not all(math.isfinite(v) for v in values):
    raise ValueError("scores must be finite numbers, got NaN or inf")
  by_category: dict[str, list[float]] = {}
  for s in prompt_scores:
    by_category.setdefault(s.category, []).append(s.text_similarity)
  out: dict[str, Any] = {
      "image_similarity": float(image_sim),
      "text_similarity": _mean(s.text_similarity for s in prompt_scores),
      "text_similarity_of_mean": (
          _mean(s.text_similarity_of_mean for s in prompt_scores)
          if all(s.text_similarity_of_mean is not None for s in prompt_scores) else None),
      "text_similarity_by_category": {c: _mean(v) for c, v in by_category.items()},
      "num_prompts": len(prompt_scores),
      "prompts": [s.as_dict() for s in prompt_scores],
  }
  for key, value in (extra or {}).items():
    if key in out:
      raise ValueError(f"extra report field {key!r} would overwrite a score")
    out[key] = value
  return out
