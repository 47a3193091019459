"""Aspect-ratio buckets (kohya's `enable_bucket`): the shapes, and which one each image gets.

A bucket is a training shape (width, height), both multiples of `steps`, within
[min_reso, max_reso], of at most resolution^2 pixels (as large as that allows).
Each image goes to the bucket whose aspect ratio is nearest its own, is scaled
to cover it and center-cropped to it, so it keeps its aspect ratio. Every
image of a bucket has the same shape, so a step's batch comes from one bucket
and the compiled step runs one program per bucket shape.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["Placement", "bucket_shapes", "describe", "nearest_bucket", "place"]


def bucket_shapes(resolution: int, min_reso: int, max_reso: int,
                  steps: int) -> list[tuple[int, int]]:
  """Every bucket (width, height) of about `resolution`^2 pixels, widest last.

  For each width w (a multiple of `steps` in [min_reso, max_reso]) the height
  is the largest multiple of `steps` with w * h <= resolution^2, capped at
  max_reso; widths whose height falls below min_reso have no bucket. Each
  bucket's mirror (h, w) is one too, so portrait and landscape images are
  treated alike. The square (resolution, resolution) is one of them when
  `steps` divides it.
  """
  area = resolution * resolution
  shapes = set()
  for w in range(_round_up(min_reso, steps), max_reso + 1, steps):
    h = min(max_reso, (area // w) // steps * steps)
    if h >= min_reso:
      shapes.update({(w, h), (h, w)})
  return sorted(shapes, key=lambda s: s[0] / s[1])


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def nearest_bucket(size: tuple[int, int], shapes: list[tuple[int, int]]) -> int:
  """Index of the bucket whose aspect ratio is nearest the image's `size` (w, h).

  Nearest in log aspect ratio, so 2:1 and 1:2 are as far from 1:1; a tie goes
  to the larger bucket (more pixels), then to the first.
  """
  w, h = size
  target = math.log(w / h)
  return min(range(len(shapes)),
             key=lambda i: (round(abs(math.log(shapes[i][0] / shapes[i][1]) - target), 12),
                            -shapes[i][0] * shapes[i][1], i))


@dataclasses.dataclass(frozen=True)
class Placement:
  """How an image of `original_size` (w, h) becomes its bucket's `bucket` (w, h) pixels.

  It is scaled to `scaled` (w, h), the smallest size covering the bucket at
  its own aspect ratio, then cropped at `crop_top_left` (top, left) (SDXL's
  micro-conditioning names) to the bucket, centered.
  """
  original_size: tuple[int, int]
  bucket: tuple[int, int]
  scaled: tuple[int, int]
  crop_top_left: tuple[int, int]


def place(size: tuple[int, int], bucket: tuple[int, int]) -> Placement:
  """The cover-and-center-crop placement of an image of `size` (w, h) in `bucket` (w, h)."""
  w, h = size
  bw, bh = bucket
  factor = max(bw / w, bh / h)
  # Rounded, but never below the bucket (a float product can fall a pixel short).
  sw, sh = max(bw, round(w * factor)), max(bh, round(h * factor))
  return Placement(original_size=(w, h), bucket=(bw, bh), scaled=(sw, sh),
                   crop_top_left=((sh - bh) // 2, (sw - bw) // 2))


def describe(shapes: list[tuple[int, int]], counts: list[int]) -> str:
  """`2 buckets in use: 96x64 (3 images), 64x96 (2 images)`."""
  parts = [f"{w}x{h} ({n} image{'s' * (n != 1)})" for (w, h), n in zip(shapes, counts)]
  return f"{len(shapes)} bucket{'s' * (len(shapes) != 1)} in use: {', '.join(parts)}"
