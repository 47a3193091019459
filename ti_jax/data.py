"""Training data for textual inversion: concept images, views, prompts and tokens.

Textual inversion learns one pseudo-word from a handful (3-5) of images of a
concept.  The only augmentation is an optional horizontal flip (the crop is
deterministic), so an image can only ever be seen as one of ``V`` distinct
*views*: the ``N`` images themselves and, when flipping is on, their ``N``
mirrors.  The trainer therefore VAE-encodes every view once (`view_pixels`)
and caches the latent posteriors; each step it only has to pick, per example,
a view index and a prompt template (`example_choices`), fill the template with
the placeholder token (`build_prompts`) and tokenize it (`tokenize`).

All randomness is a pure function of ``(seed, step, global example index)``,
so a run gives the same examples however many hosts or devices share the
global batch.  Everything here is pure: nothing is printed or logged; problems
with individual files come back as one-line warnings for the entry point to
log, and fatal problems raise `DataError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "OBJECT_TEMPLATES",
    "STYLE_TEMPLATES",
    "DataError",
    "TrainingImages",
    "build_prompts",
    "example_choices",
    "load_training_images",
    "templates_for",
    "tokenize",
    "view_pixels",
]

# File extensions (lower case, with the dot) that are read as images; the
# match is case-insensitive, so "IMG_0001.JPG" counts.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

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

# Modes whose pixels carry an alpha channel (premultiplied or not).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Single-channel modes deeper than 8 bit that PIL's convert("RGB") would clip.
_WIDE_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})

# Stream tags put right after the seed in the SeedSequence entropy, so the
# per-example draws and the per-epoch shuffles never share a generator state
# (SeedSequence pads short entropy with zeros, so lengths alone would not do).
_EXAMPLE_STREAM = 1
_EPOCH_STREAM = 2
_PER_IMAGE_STREAM = 3


def _one_line(text: str) -> str:
  """Collapses line breaks (e.g. from a path or a library error) into spaces."""
  return re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip()


class DataError(ValueError):
  """Training data cannot be used; the one-line message names the folder/file and the problem."""

  def __init__(self, message: str):
    super().__init__(_one_line(message))


@dataclasses.dataclass(frozen=True)
class TrainingImages:
  """The concept images, ready for the VAE.

  Attributes:
    pixels: uint8 ``[N, R, R, 3]`` RGB images, in the order of `paths`.
    paths: the files the images came from, sorted by file name.
    warnings: one line per skipped or questionable file, for the caller to log.
  """

  pixels: np.ndarray  # [N, R, R, 3] uint8
  paths: list[str]
  warnings: list[str]

  @property
  def num_images(self) -> int:
    return int(self.pixels.shape[0])


# ---------------------------------------------------------------------------
# Loading images.
# ---------------------------------------------------------------------------


def _list_image_files(folder: str) -> list[str]:
  """Returns the sorted image file paths directly inside `folder`."""
  if not os.path.exists(folder):
    raise DataError(f"training image folder {folder!r} does not exist")
  if not os.path.isdir(folder):
    raise DataError(f"training image folder {folder!r} is not a directory")
  try:
    names = os.listdir(folder)
  except OSError as e:
    raise DataError(f"cannot list training image folder {folder!r}: {e.strerror or e}") from e
  images, others = [], 0
  for name in sorted(names):
    path = os.path.join(folder, name)
    # Hidden files (".DS_Store", "._IMG.jpg" resource forks) are never images
    # the user meant to train on.
    if name.startswith(".") or not os.path.isfile(path):
      continue
    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
      images.append(path)
    else:
      others += 1
  if not images:
    found = f" (found {others} other file{'s' * (others != 1)})" if others else ""
    raise DataError(
        f"no image files in {folder!r}{found}; accepted extensions: "
        f"{', '.join(IMAGE_EXTENSIONS)} (any case)")
  return images


def _wide_gray_to_l(img: Image.Image) -> Image.Image:
  """Converts a >8-bit single-channel image to 8-bit "L" without clipping.

  16-bit modes are scaled by their full range (65535 -> 255), which keeps the
  picture's brightness as the file means it.  For 32-bit "I" and float "F",
  whose nominal range says nothing about the data, values that fit 8 or 16
  bit are read as such and anything else is stretched to its own min..max.
  """
  # NaNs (float TIFFs) would poison min/max; read them as black.
  a = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)  # [H, W]
  if img.mode.startswith("I;16"):
    scaled = a / 257.0
  else:
    lo, hi = float(a.min()), float(a.max())
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
      scaled = a * 255.0
    elif lo >= 0.0 and hi <= 255.0:
      scaled = a
    elif lo >= 0.0 and hi <= 65535.0:
      scaled = a / 257.0
    else:
      scaled = (a - lo) * (255.0 / max(hi - lo, 1e-12))
  return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
  """Converts an image of any PIL mode to "RGB", with transparency on white."""
  if img.mode in _WIDE_GRAY_MODES:
    img = _wide_gray_to_l(img)
  if img.mode in _ALPHA_MODES or "transparency" in img.info:
    # Transparent areas are usually "no background"; black would add a dark
    # halo the model would learn as part of the concept, white is neutral.
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img.convert("RGB")


def _describe(error: BaseException) -> str:
  text = _one_line(str(error))
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _read_rgb(path: str) -> tuple[Image.Image, str | None]:
  """Reads the first frame of an image file, upright (EXIF orientation), as RGB.

  Returns:
    The image and, if its EXIF orientation could not be applied, why.

  Raises:
    Exception: whatever PIL raises for an unreadable, corrupt or truncated file.
  """
  note = None
  with Image.open(path) as img:
    # Animated GIF/WebP/TIFF: train on the first frame only.
    img.seek(0)
    img.load()
    try:
      upright = ImageOps.exif_transpose(img)
    except Exception as e:  # A broken EXIF block should not cost the image.
      upright, note = img, f"ignored its unreadable EXIF orientation ({_describe(e)})"
    return _to_rgb(upright), note


def load_training_images(folder: str, resolution: int, center_crop: bool,
                         min_side: int = 32) -> TrainingImages:
  """Loads the concept images of `folder` as square RGB arrays.

  Files are taken from the folder itself (not subfolders, not hidden files) by
  extension (`IMAGE_EXTENSIONS`) and in sorted order, so runs are
  reproducible.  Each image is turned upright by its EXIF orientation,
  converted to RGB (alpha composited on white, 16-bit gray scaled rather than
  clipped, first frame of animations) and then either center-cropped to a
  square and resized (`center_crop=True`) or resized whole, squashing its
  aspect ratio (`center_crop=False`, as diffusers' textual-inversion script
  does).  Resizing is bicubic.

  Args:
    folder: directory with the images.
    resolution: side R of the output images, in pixels.
    center_crop: whether to crop the central square before resizing.
    min_side: images whose shorter side is below this are skipped.

  Returns:
    The images, their paths, and one-line warnings about skipped files and
    images that had to be upscaled.

  Raises:
    DataError: the folder is missing or holds no readable, large enough image.
  """
  if resolution < 1:
    raise DataError(f"resolution must be a positive number of pixels, got {resolution}")
  paths = _list_image_files(folder)
  pixels, kept, warnings = [], [], []
  unreadable = too_small = 0
  for path in paths:
    try:
      img, note = _read_rgb(path)
    except Exception as e:  # PIL plugins raise many types for bad files.
      unreadable += 1
      warnings.append(_one_line(f"skipped {path}: cannot read image ({_describe(e)})"))
      continue
    if note:
      warnings.append(_one_line(f"{path}: {note}"))
    w, h = img.size
    if min(w, h) < min_side:
      too_small += 1
      warnings.append(_one_line(f"skipped {path}: too small: {w}x{h}, need at least {min_side} px"))
      continue
    if center_crop:
      side = min(w, h)
      left, top = (w - side) // 2, (h - side) // 2
      box = (left, top, left + side, top + side)
      factor = resolution / side
    else:
      box = (0, 0, w, h)
      factor = max(resolution / w, resolution / h)
    if factor > 1.0:
      warnings.append(_one_line(
          f"{path}: upscaled {factor:.2f}x ({w}x{h} to {resolution}x{resolution}), it may look "
          "blurry; larger images are better"))
    # Crop first: resize(box=...) would let the filter reach pixels outside
    # the square and bleed the cropped-away borders into its edges.
    if box != (0, 0, w, h):
      img = img.crop(box)
    img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    pixels.append(np.asarray(img, dtype=np.uint8))  # [R, R, 3]
    kept.append(path)
  if not kept:
    reasons = []
    if unreadable:
      reasons.append(f"{unreadable} unreadable")
    if too_small:
      reasons.append(f"{too_small} smaller than {min_side} px")
    raise DataError(
        f"no readable images in {folder!r}: skipped {len(paths)} file"
        f"{'s' * (len(paths) != 1)} ({', '.join(reasons)}); first problem: {warnings[0]}")
  return TrainingImages(pixels=np.stack(pixels), paths=kept, warnings=warnings)  # [N, R, R, 3]


# ---------------------------------------------------------------------------
# Views, per-example choices, prompts and tokens.
# ---------------------------------------------------------------------------


def view_pixels(pixels: np.ndarray, flip: bool) -> np.ndarray:
  """Returns every distinct training view of the images, scaled for the VAE.

  Args:
    pixels: uint8 ``[N, R, R, 3]`` images.
    flip: whether horizontal flipping is used in training.

  Returns:
    float32 ``[V, R, R, 3]`` in ``[-1, 1]``: ``V = N`` without flipping;
    with flipping ``V = 2N`` and view ``i + N`` is the mirror of image ``i``
    (the indexing `example_choices` uses).
  """
  pixels = np.asarray(pixels)
  if pixels.ndim != 4 or pixels.shape[-1] != 3:
    raise DataError(f"expected images of shape [N, R, R, 3], got {list(pixels.shape)}")
  views = np.concatenate([pixels, pixels[:, :, ::-1]], axis=0) if flip else pixels  # [V, R, R, 3]
  return views.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _epoch_order(seed: int, epoch: int, num_images: int) -> np.ndarray:
  """The shuffled image order of one pass over the images."""
  return np.random.default_rng([seed, _EPOCH_STREAM, epoch]).permutation(num_images)  # [N]


def example_choices(seed: int, step: int, global_indices: np.ndarray, *,
                    global_batch_size: int, num_images: int, flip_p: float,
                    num_templates: int) -> tuple[np.ndarray, np.ndarray]:
  """Picks the view and prompt template of each example of a training step.

  Scheme: the run is a stream of examples, example ``g`` of step ``s`` being
  number ``k = s * global_batch_size + g``.  The stream is cut into epochs of
  `num_images` examples; epoch ``e = k // num_images`` shows every image
  exactly once, in an order shuffled by ``(seed, e)``, so all images are seen
  equally often (each ``global_batch_size / N`` times per step when the batch
  is a multiple of N).  Whether the example is flipped (probability `flip_p`)
  and its template (uniform) come from a generator seeded by ``(seed, step,
  g)`` alone.  So example ``g``'s choices do not depend on which host or
  device computes it, nor on how the batch is split.

  Args:
    seed: the run's seed (non-negative).
    step: the training step (non-negative).
    global_indices: int ``[B]`` positions of this caller's examples in the
      global batch, each in ``[0, global_batch_size)``.
    global_batch_size: examples per step over all hosts and devices.
    num_images: number of training images N.
    flip_p: probability of a horizontal flip, in ``[0, 1]``.
    num_templates: number of prompt templates to choose from.

  Returns:
    ``(view_index, template_index)``, both int32 ``[B]``.  A view index is
    ``image`` or, flipped, ``image + N`` (see `view_pixels`); with
    ``flip_p == 0`` it is always below N.
  """
  global_indices = np.asarray(global_indices)
  if global_indices.ndim != 1:
    raise DataError(f"global_indices must be 1-D, got shape {list(global_indices.shape)}")
  if seed < 0 or step < 0:
    raise DataError(f"seed and step must be non-negative, got seed={seed}, step={step}")
  if global_batch_size < 1 or num_images < 1 or num_templates < 1:
    raise DataError(
        f"global_batch_size, num_images and num_templates must be positive, got "
        f"{global_batch_size}, {num_images}, {num_templates}")
  if not 0.0 <= flip_p <= 1.0:
    raise DataError(f"flip_p must be in [0, 1], got {flip_p}")
  if global_indices.size and not (
      0 <= global_indices.min() and global_indices.max() < global_batch_size):
    raise DataError(f"global_indices must lie in [0, {global_batch_size}), got "
                    f"{global_indices.min()}..{global_indices.max()}")
  views = np.empty(global_indices.shape, np.int32)  # [B]
  templates = np.empty(global_indices.shape, np.int32)  # [B]
  orders: dict[int, np.ndarray] = {}
  for i, g in enumerate(global_indices.tolist()):
    epoch, position = divmod(step * global_batch_size + g, num_images)
    if epoch not in orders:
      orders[epoch] = _epoch_order(seed, epoch, num_images)
    image = int(orders[epoch][position])
    rng = np.random.default_rng([seed, _EXAMPLE_STREAM, step, g])
    # Both draws are always made, so the template does not depend on flip_p.
    flipped = rng.random() < flip_p
    templates[i] = rng.integers(num_templates)
    views[i] = image + num_images if flipped else image
  return views, templates


def per_image_choices(seed: int, step: int, global_indices: np.ndarray,
                      probability: float) -> np.ndarray:
  """Whether each example's prompt also names its image's own token (paper ablation).

  With per-image tokens the paper mixes, with some probability, prompts such
  as "a photo of a S* with S_i" in which S_i belongs to the example's image,
  so image-specific details can go into S_i instead of S*. Like
  `example_choices`, the draw is a pure function of ``(seed, step, global
  example index)``, from its own stream so the other choices do not change.

  Returns:
    bool ``[B]``.
  """
  if not 0.0 <= probability <= 1.0:
    raise DataError(f"per-image token probability must be in [0, 1], got {probability}")
  return np.array([np.random.default_rng([seed, _PER_IMAGE_STREAM, step, g]).random() < probability
                   for g in np.asarray(global_indices).reshape(-1).tolist()], dtype=bool)


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


def tokenize(tokenizer: Any, prompts: list[str]) -> np.ndarray:
  """Tokenizes prompts to a fixed-length id array for the text encoder.

  Args:
    tokenizer: a Hugging Face (CLIP) tokenizer.
    prompts: B prompts.

  Returns:
    int32 ``[B, tokenizer.model_max_length]`` ids, padded and truncated to
    that length (77 for Stable Diffusion).
  """
  ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                  truncation=True, return_tensors="np").input_ids
  return np.asarray(ids, dtype=np.int32)  # [B, max_len]
