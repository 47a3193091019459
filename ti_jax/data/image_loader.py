"""The concept's image files: read, checked, cropped, resized; their (flipped) views.

Problems with individual files come back as one-line warnings for the entry
point to log; fatal problems raise `DataError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image, ImageOps

from ti_jax import errors
from ti_jax.data import buckets as buckets_lib
from ti_jax.runtime import console, fileio

__all__ = ["IMAGE_EXTENSIONS", "Caption", "DataError", "TrainingImages", "load_images",
           "load_training_images", "read_caption", "view_pixels"]


# File extensions (lower case, with the dot) that are read as images; the
# match is case-insensitive, so "IMG_0001.JPG" counts.
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# Modes whose pixels carry an alpha channel (premultiplied or not).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


# Single-channel modes deeper than 8 bit that PIL's convert("RGB") would clip.
_WIDE_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


class DataError(errors.UserError):
  """Training data cannot be used; the one-line message names the folder/file and the problem."""

  def __init__(self, message: str):
    super().__init__(console.flatten(message))


@dataclasses.dataclass(frozen=True)
class Caption:
  """An image's caption file: its path, the caption and the line it came from (1-based)."""
  path: str
  text: str
  line: int


@dataclasses.dataclass(frozen=True)
class TrainingImages:
  """The concept images, ready for the VAE.

  Attributes:
    pixels: uint8 ``[N, R, R, 3]`` RGB images, in the order of `paths`; with
      buckets a list of N arrays ``[h_i, w_i, 3]``, each at its image's bucket.
    paths: the files the images came from, sorted by file name.
    warnings: one line per skipped or questionable file, for the caller to log.
    sizes: (width, height) of each file as read (upright), before crop and resize
      (SDXL's `original_size`, as (w, h)).
    captions: with a caption extension, each image's `Caption` or None (no file);
      else empty.
    crop_top_left: (top, left) of each image's crop in its scaled image (SDXL's
      `crop_top_left`); (0, 0) where the whole image was resized.
    buckets: with buckets, the (width, height) of each bucket in use, in the
      order of `bucket_shapes`; else empty.
    bucket_index: with buckets, int ``[N]``: each image's position in `buckets`.
  """

  pixels: np.ndarray | list[np.ndarray]  # [N, R, R, 3] uint8, or N x [h_i, w_i, 3]
  paths: list[str]
  warnings: list[str]
  sizes: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  captions: list[Caption | None] = dataclasses.field(default_factory=list)
  crop_top_left: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  buckets: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  bucket_index: np.ndarray | None = None  # [N] int32

  @property
  def num_images(self) -> int:
    return len(self.paths)

  def bucket_members(self, bucket: int) -> np.ndarray:
    """int ``[N_b]``: the images of bucket `bucket`, in file order."""
    return np.flatnonzero(self.bucket_index == bucket)

  def bucket_pixels(self, bucket: int) -> np.ndarray:
    """uint8 ``[N_b, h_b, w_b, 3]``: the images of bucket `bucket`, in file order."""
    return np.stack([self.pixels[i] for i in self.bucket_members(bucket)])


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
  text = console.flatten(str(error))
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


def read_caption(image_path: str, caption_extension: str) -> Caption | None:
  """The caption file beside an image ("a.png" -> "a.txt" for ".txt"), or None if there is none.

  As in kohya's scripts, the caption is the file's first line (here: its first
  non-blank line, so a leading empty line does not blank the caption).

  Raises:
    DataError: the file is unreadable, larger than `fileio.MAX_TEXT_BYTES`, not UTF-8 or
      holds only blank lines.
  """
  path = os.path.splitext(image_path)[0] + caption_extension
  if not os.path.isfile(path):
    return None
  try:
    # A BOM from Windows editors is not caption text. Read with a size limit: only the
    # first line is used, and a huge file would be read whole.
    text = fileio.read_small_file(path).decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(f"caption file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  except OSError as e:
    raise DataError(f"cannot read caption file {path}: {e.strerror or e}") from None
  for number, line in enumerate(text.splitlines(), start=1):
    if line.strip():
      return Caption(path=path, text=line.strip(), line=number)
  raise DataError(f"caption file {path} is empty; write the image's prompt in it or delete it "
                  "(images without a caption use the templates)")


def load_training_images(folder: str, resolution: int, center_crop: bool,
                         min_side: int = 32, caption_extension: str = "",
                         bucket_shapes: list[tuple[int, int]] | None = None) -> TrainingImages:
  """Loads the concept images of `folder` as square RGB arrays.

  Files are taken from the folder itself (not subfolders, not hidden files) by
  extension (`IMAGE_EXTENSIONS`) and in sorted order, so runs are
  reproducible.  Each image is turned upright by its EXIF orientation,
  converted to RGB (alpha composited on white, 16-bit gray scaled rather than
  clipped, first frame of animations) and then either center-cropped to a
  square and resized (`center_crop=True`) or resized whole, squashing its
  aspect ratio (`center_crop=False`, as diffusers' textual-inversion script
  does).  With `bucket_shapes` (aspect-ratio bucketing) each image instead
  keeps its aspect ratio: it goes to the bucket of nearest aspect ratio, is
  scaled to cover it and center-cropped to it (`buckets.place`).  Resizing
  is bicubic.

  Args:
    folder: directory with the images.
    resolution: side R of the output images, in pixels.
    center_crop: whether to crop the central square before resizing.
    min_side: images whose shorter side is below this are skipped.
    caption_extension: if set (e.g. ".txt"), each kept image's caption file is
      read (`read_caption`).
    bucket_shapes: candidate buckets (width, height) (`buckets.bucket_shapes`),
      or None for square images of side `resolution`.

  Returns:
    The images, their paths, and one-line warnings about skipped files and
    images that had to be upscaled.

  Raises:
    DataError: the folder is missing or holds no readable, large enough image.
  """
  if resolution < 1:
    raise DataError(f"resolution must be a positive number of pixels, got {resolution}")
  paths = _list_image_files(folder)
  pixels, kept, warnings, sizes, crops = [], [], [], [], []
  unreadable = too_small = 0
  for path in paths:
    try:
      img, note = _read_rgb(path)
    except Exception as e:  # PIL plugins raise many types for bad files.
      unreadable += 1
      warnings.append(console.flatten(f"skipped {path}: cannot read image ({_describe(e)})"))
      continue
    if note:
      warnings.append(console.flatten(f"{path}: {note}"))
    w, h = img.size
    if min(w, h) < min_side:
      too_small += 1
      warnings.append(console.flatten(
          f"skipped {path}: too small: {w}x{h}, need at least {min_side} px"))
      continue
    if bucket_shapes:
      placement = buckets_lib.place((w, h), bucket_shapes[buckets_lib.nearest_bucket(
          (w, h), bucket_shapes)])
      target, (top, left) = placement.bucket, placement.crop_top_left
      factor = placement.scaled[0] / w
    elif center_crop:
      side = min(w, h)
      left, top = (w - side) // 2, (h - side) // 2
      target, factor = (resolution, resolution), resolution / side
    else:
      left = top = 0
      target, factor = (resolution, resolution), max(resolution / w, resolution / h)
    if factor > 1.0:
      warnings.append(console.flatten(
          f"{path}: upscaled {factor:.2f}x ({w}x{h} to {target[0]}x{target[1]}), it may look "
          "blurry; larger images are better"))
    if bucket_shapes:
      # Scaled whole, then cropped: the crop's edges are real pixels of the scaled image.
      img = img.resize(placement.scaled, Image.Resampling.BICUBIC)
      img = img.crop((left, top, left + target[0], top + target[1]))
    else:
      if center_crop and (side, side) != (w, h):
        # Crop first: resize(box=...) would let the filter reach pixels outside
        # the square and bleed the cropped-away borders into its edges.
        img = img.crop((left, top, left + side, top + side))
      img = img.resize(target, Image.Resampling.BICUBIC)
      # SDXL's crop_top_left is in the scaled image's pixels.
      top, left = round(top * factor), round(left * factor)
    pixels.append(np.asarray(img, dtype=np.uint8))  # [h, w, 3]
    crops.append((top, left))
    kept.append(path)
    sizes.append((w, h))
  if not kept:
    reasons = []
    if unreadable:
      reasons.append(f"{unreadable} unreadable")
    if too_small:
      reasons.append(f"{too_small} smaller than {min_side} px")
    raise DataError(
        f"no readable images in {folder!r}: skipped {len(paths)} file"
        f"{'s' * (len(paths) != 1)} ({', '.join(reasons)}); first problem: {warnings[0]}")
  found = [read_caption(p, caption_extension) for p in kept] if caption_extension else []
  if not bucket_shapes:
    return TrainingImages(pixels=np.stack(pixels), paths=kept, warnings=warnings,  # [N, R, R, 3]
                          sizes=sizes, captions=found, crop_top_left=crops)
  # The buckets in use, in the order of bucket_shapes; each image's index among them.
  shapes = [(p.shape[1], p.shape[0]) for p in pixels]
  used = [b for b in bucket_shapes if b in set(shapes)]
  return TrainingImages(pixels=pixels, paths=kept, warnings=warnings, sizes=sizes,
                        captions=found, crop_top_left=crops, buckets=used,
                        bucket_index=np.array([used.index(s) for s in shapes], np.int32))


# ---------------------------------------------------------------------------
# Views, per-example choices, prompts and tokens.
# ---------------------------------------------------------------------------


def load_images(folder: str, resolution: int, center_crop: bool,
                caption_extension: str = "",
                bucket_shapes: list[tuple[int, int]] | None = None) -> TrainingImages:
  """`load_training_images` of a local or gs:// folder (a remote one is copied locally first,
  caption files with it)."""
  if not fileio.is_remote(folder):
    return load_training_images(folder, resolution, center_crop,
                                caption_extension=caption_extension, bucket_shapes=bucket_shapes)
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    try:
      fileio.copy_tree_to_local(folder, tmp)
    except OSError as e:
      raise DataError(f"cannot read training images from {folder}: {e}") from None
    return load_training_images(tmp, resolution, center_crop, caption_extension=caption_extension,
                                bucket_shapes=bucket_shapes)


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
    raise DataError(f"expected images of shape [N, h, w, 3], got {list(pixels.shape)}")
  views = np.concatenate([pixels, pixels[:, :, ::-1]], axis=0) if flip else pixels  # [V, R, R, 3]
  return views.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
