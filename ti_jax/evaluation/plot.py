"""A reconstruction-vs-editability scatter plot, drawn with PIL alone.

Like the quantitative figure of Gal et al. (2022): each point is one method or
run, with its text similarity (editability) on the x axis and its image
similarity (reconstruction) on the y axis. Up and to the right is better.

`layout_for` decides where everything goes and `data_to_pixel` maps scores
to pixels, so callers and tests can find a point on the written image.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
import os
import tempfile
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from ti_jax.runtime import fileio

__all__ = [
    "PlotLayout",
    "color_for",
    "data_to_pixel",
    "layout_for",
    "nice_range",
    "render",
    "scatter_png",
]

# (label, text similarity, image similarity)
Point = tuple[str, float, float]

DEFAULT_TITLE = "Reconstruction vs. editability (CLIP)"
X_TITLE = "text similarity (editability)"
Y_TITLE = "image similarity (reconstruction)"

_BACKGROUND = (255, 255, 255)
_PLOT_BACKGROUND = (250, 250, 252)
_GRID = (226, 228, 234)
_AXIS = (70, 70, 80)
_TEXT = (30, 30, 36)
_MUTED = (95, 95, 105)
_LEGEND_BORDER = (200, 202, 210)

# Well-separated hues for the first points (none close to the greys above);
# further points get evenly spread generated hues.
_PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
    (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207),
    (188, 189, 34), (0, 0, 128), (128, 0, 0), (0, 128, 128),
)

_MARKER_RADIUS = 7
_SUPERSAMPLE = 4  # markers are drawn this much larger, then shrunk, for smooth edges
_LEGEND_ROW = 22
_PAD = 16


@dataclasses.dataclass(frozen=True)
class PlotLayout:
  """Where a scatter plot's parts go on the image.

  Attributes:
    size: (width, height) of the image in pixels.
    plot_box: (left, top, right, bottom) pixel edges of the data area.
    x_range: (low, high) text similarity at the left and right edges.
    y_range: (low, high) image similarity at the bottom and top edges.
    x_step: spacing of the x ticks.
    y_step: spacing of the y ticks.
    legend_box: (left, top, right, bottom) of the legend.
    legend_rows: how many points the legend lists by name; if fewer than
      there are points, one more row says how many were left out.
  """

  size: tuple[int, int]
  plot_box: tuple[int, int, int, int]
  x_range: tuple[float, float]
  y_range: tuple[float, float]
  x_step: float
  y_step: float
  legend_box: tuple[int, int, int, int]
  legend_rows: int


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  # Pillow >= 10.1 with FreeType scales its built-in font; older or
  # FreeType-less builds only have the fixed bitmap font.
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError, OSError):
    return ImageFont.load_default()


def _text_width(font, text: str) -> float:
  return font.getlength(text)


def _truncate(font, text: str, max_width: float) -> str:
  """`text`, cut and ended with an ellipsis if it is wider than `max_width`."""
  text = " ".join(str(text).split())  # a label with line breaks would spill out of its row
  if _text_width(font, text) <= max_width:
    return text
  lo, hi = 0, len(text)
  # Binary search for the longest prefix that fits with the ellipsis.
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if _text_width(font, text[:mid].rstrip() + "\u2026") <= max_width:
      lo = mid
    else:
      hi = mid - 1
  return text[:lo].rstrip() + "\u2026"


def color_for(index: int) -> tuple[int, int, int]:
  """The RGB colour of the `index`-th point (distinct for every index)."""
  if index < len(_PALETTE):
    return _PALETTE[index]
  # Golden-ratio hue steps never repeat; alternating value levels keep
  # neighbouring hues apart.
  k = index - len(_PALETTE)
  hue = (0.13 + k * 0.618033988749895) % 1.0
  value = (0.85, 0.6)[k % 2]
  r, g, b = colorsys.hsv_to_rgb(hue, 0.8, value)
  return (round(r * 255), round(g * 255), round(b * 255))


def _nice_step(span: float, max_ticks: int) -> float:
  """The smallest 1, 2, 2.5 or 5 x 10^k step giving at most `max_ticks` intervals."""
  raw = span / max_ticks
  exponent = math.floor(math.log10(raw))
  for mantissa in (1.0, 2.0, 2.5, 5.0, 10.0):
    step = mantissa * 10.0 ** exponent
    if step >= raw * (1 - 1e-9):
      return step
  return 10.0 ** (exponent + 1)


def nice_range(values: Sequence[float], max_ticks: int = 6, pad: float = 0.08,
               min_span: float = 0.02) -> tuple[float, float, float]:
  """An axis range covering `values` with margins, on round tick values.

  Args:
    values: the data along this axis (at least one, all finite).
    max_ticks: at most this many tick intervals.
    pad: margin on each side, as a fraction of the data's span.
    min_span: the smallest span shown, so one value (or equal values) still
      gets a readable axis centred on it.

  Returns:
    (low, high, step): low and high are multiples of step, low < min(values),
    high > max(values).
  """
  lo, hi = float(min(values)), float(max(values))
  span = max(hi - lo, min_span)
  centre = (lo + hi) / 2
  lo = min(lo, centre - span / 2) - pad * span
  hi = max(hi, centre + span / 2) + pad * span
  step = _nice_step(hi - lo, max_ticks)
  while True:
    # Snap outward; the small tolerance keeps a bound already on a tick there.
    low = math.floor(lo / step + 1e-9) * step
    high = math.ceil(hi / step - 1e-9) * step
    # Snapping can add an interval at each end; then take the next step up.
    if round((high - low) / step) <= max_ticks:
      break
    step = _nice_step(step * 1.01 * max_ticks, max_ticks)
  # Rounding to the step's decimals removes float noise like 0.30000000000000004.
  digits = _decimals(step) + 2
  return round(low, digits), round(high, digits), step


def _decimals(step: float) -> int:
  """Decimal places needed to print multiples of `step` exactly."""
  for digits in range(12):
    if abs(round(step, digits) - step) < step * 1e-6:
      return digits
  return 12


def _tick_values(low: float, high: float, step: float) -> list[float]:
  count = round((high - low) / step)
  digits = _decimals(step)
  return [round(low + i * step, digits + 2) for i in range(count + 1)]


def _check_points(points: Sequence[Point]) -> list[Point]:
  if not points:
    raise ValueError("no points to plot")
  out = []
  for i, point in enumerate(points):
    try:
      label, x, y = point
      x, y = float(x), float(y)
    except (TypeError, ValueError):
      raise ValueError(
          f"point {i} must be (label, text_similarity, image_similarity), got {point!r}"
      ) from None
    if not (math.isfinite(x) and math.isfinite(y)):
      raise ValueError(f"point {i} ({label!r}) has a non-finite score: ({x}, {y})")
    out.append((str(label), x, y))
  return out


def layout_for(points: Sequence[Point], size: tuple[int, int] = (960, 600)) -> PlotLayout:
  """Decides the axis ranges and the positions of the plot and its legend.

  Args:
    points: (label, text_similarity, image_similarity) per point.
    size: (width, height) of the image; at least 480 x 320.

  Returns:
    The `PlotLayout` that `render` draws with.
  """
  points = _check_points(points)
  width, height = int(size[0]), int(size[1])
  if width < 480 or height < 320:
    raise ValueError(f"plot size must be at least 480 x 320 pixels, got {width} x {height}")
  x_lo, x_hi, x_step = nice_range([p[1] for p in points])
  y_lo, y_hi, y_step = nice_range([p[2] for p in points])
  # Legend in its own column at the right, so it never hides a point.
  legend_width = min(260, width // 3)
  plot_box = (78, 54, width - legend_width - 2 * _PAD, height - 66)
  legend_left = plot_box[2] + _PAD
  room = (plot_box[3] - plot_box[1] - 2 * 8) // _LEGEND_ROW
  rows = len(points) if len(points) <= room else room - 1
  shown = rows + (1 if rows < len(points) else 0)
  legend_box = (legend_left, plot_box[1], width - _PAD, plot_box[1] + 16 + shown * _LEGEND_ROW)
  return PlotLayout(size=(width, height), plot_box=plot_box, x_range=(x_lo, x_hi),
                    y_range=(y_lo, y_hi), x_step=x_step, y_step=y_step,
                    legend_box=legend_box, legend_rows=rows)


def data_to_pixel(layout: PlotLayout, x: float, y: float) -> tuple[int, int]:
  """Pixel (column, row) of the scores (text similarity `x`, image similarity `y`)."""
  left, top, right, bottom = layout.plot_box
  (x_lo, x_hi), (y_lo, y_hi) = layout.x_range, layout.y_range
  px = left + (x - x_lo) / (x_hi - x_lo) * (right - left)
  py = bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)
  return round(px), round(py)


def _marker(color: tuple[int, int, int]) -> Image.Image:
  """An anti-aliased RGBA disc with a white rim (separating overlapping markers)."""
  r = _MARKER_RADIUS
  s = _SUPERSAMPLE
  big = Image.new("RGBA", ((2 * r + 1) * s, (2 * r + 1) * s), (0, 0, 0, 0))
  draw = ImageDraw.Draw(big)
  draw.ellipse((0, 0, big.width - 1, big.height - 1), fill=(255, 255, 255, 255))
  rim = int(1.5 * s)
  draw.ellipse((rim, rim, big.width - 1 - rim, big.height - 1 - rim), fill=(*color, 255))
  return big.resize((2 * r + 1, 2 * r + 1), Image.Resampling.LANCZOS)


def _vertical_text(text: str, font, fill) -> Image.Image:
  """`text` rotated to read bottom-to-top, as an RGBA image."""
  box = font.getbbox(text)
  img = Image.new("RGBA", (box[2] + 2, box[3] + 4), (0, 0, 0, 0))
  ImageDraw.Draw(img).text((1, 1), text, font=font, fill=fill)
  return img.rotate(90, expand=True)


def render(points: Sequence[Point], title: str = DEFAULT_TITLE,
           size: tuple[int, int] = (960, 600)) -> tuple[Image.Image, PlotLayout]:
  """Draws the scatter plot in memory.

  Args:
    points: (label, text_similarity, image_similarity) per point; point i is
      drawn in `color_for(i)`, later points over earlier ones.
    title: the headline above the plot.
    size: (width, height) in pixels.

  Returns:
    The RGB image and its `PlotLayout`.
  """
  points = _check_points(points)
  layout = layout_for(points, size)
  img = Image.new("RGB", layout.size, _BACKGROUND)
  draw = ImageDraw.Draw(img)
  font = _font(13)
  title_font = _font(17)
  axis_font = _font(14)
  left, top, right, bottom = layout.plot_box

  draw.rectangle(layout.plot_box, fill=_PLOT_BACKGROUND)
  for value in _tick_values(*layout.x_range, layout.x_step):
    px, _ = data_to_pixel(layout, value, layout.y_range[0])
    draw.line((px, top, px, bottom), fill=_GRID)
    draw.line((px, bottom, px, bottom + 5), fill=_AXIS)
    label = f"{value:.{_decimals(layout.x_step)}f}"
    draw.text((px, bottom + 8), label, font=font, fill=_MUTED, anchor="mt")
  for value in _tick_values(*layout.y_range, layout.y_step):
    _, py = data_to_pixel(layout, layout.x_range[0], value)
    draw.line((left, py, right, py), fill=_GRID)
    draw.line((left - 5, py, left, py), fill=_AXIS)
    label = f"{value:.{_decimals(layout.y_step)}f}"
    draw.text((left - 8, py), label, font=font, fill=_MUTED, anchor="rm")
  # Axis lines on the left and bottom only, as in most papers' scatter plots.
  draw.line((left, top, left, bottom), fill=_AXIS, width=1)
  draw.line((left, bottom, right, bottom), fill=_AXIS, width=1)

  title_text = _truncate(title_font, title, layout.size[0] - 2 * _PAD)
  draw.text((layout.size[0] // 2, 18), title_text, font=title_font, fill=_TEXT, anchor="mt")
  draw.text(((left + right) // 2, layout.size[1] - 14), X_TITLE, font=axis_font,
            fill=_TEXT, anchor="mb")
  y_title = _vertical_text(Y_TITLE, axis_font, _TEXT)
  img.paste(y_title, (14, (top + bottom) // 2 - y_title.height // 2), y_title)

  for i, (_, x, y) in enumerate(points):
    marker = _marker(color_for(i))
    px, py = data_to_pixel(layout, x, y)
    img.paste(marker, (px - _MARKER_RADIUS, py - _MARKER_RADIUS), marker)

  lx0, ly0, lx1, _ = layout.legend_box
  draw.rounded_rectangle(layout.legend_box, radius=4, fill=_BACKGROUND, outline=_LEGEND_BORDER)
  text_left = lx0 + 12 + 2 * _MARKER_RADIUS + 8
  for i in range(layout.legend_rows):
    label = points[i][0]
    cy = ly0 + 8 + i * _LEGEND_ROW + _LEGEND_ROW // 2
    marker = _marker(color_for(i))
    img.paste(marker, (lx0 + 12, cy - _MARKER_RADIUS), marker)
    draw.text((text_left, cy), _truncate(font, label, lx1 - 10 - text_left), font=font,
              fill=_TEXT, anchor="lm")
  if layout.legend_rows < len(points):
    cy = ly0 + 8 + layout.legend_rows * _LEGEND_ROW + _LEGEND_ROW // 2
    draw.text((text_left, cy), f"+ {len(points) - layout.legend_rows} more (not listed)",
              font=font, fill=_MUTED, anchor="lm")
  return img, layout


def scatter_png(points: Sequence[Point], path: str, title: str = DEFAULT_TITLE,
                size: tuple[int, int] = (960, 600)) -> PlotLayout:
  """Writes the reconstruction-vs-editability scatter plot as a PNG.

  Args:
    points: (label, text_similarity, image_similarity) per point, e.g. one per
      run or per checkpoint.
    path: where to write the PNG. A local file is replaced atomically (written
      beside it, then renamed), so readers never see half a file; a gs:// URL
      is written in one object upload.
    title: the headline above the plot.
    size: (width, height) in pixels.

  Returns:
    The `PlotLayout` used, for `data_to_pixel`.
  """
  img, layout = render(points, title=title, size=size)
  if fileio.is_remote(path):
    def write(local):
      img.save(local, format="PNG")
    fileio.write_via_local_file(path, write)
    return layout
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
  try:
    with os.fdopen(fd, "wb") as f:
      img.save(f, format="PNG")
    os.chmod(tmp, 0o644)  # mkstemp's private 0600 would stick to the final file
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return layout
