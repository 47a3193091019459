"""The reconstruction-vs-editability scatter plot of the evaluation, drawn with matplotlib.

Like the quantitative figure of Gal et al. (2022): each point is one method or
run, with its text similarity (editability) on the x axis and its image
similarity (reconstruction) on the y axis, labelled with its name. Up and to
the right is better.

With the world's checker as the scorer the axes are shares of samples
instead: editability (concept and edit shown) and reconstruction (concept
shown); callers pass those axis titles (`CHECKER_X_TITLE`, `CHECKER_Y_TITLE`).

`figure` builds the plot as a matplotlib `Figure` (its own Agg canvas: no
pyplot, no display, no global figure state); `scatter_png` writes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ti_jax.runtime import fileio

__all__ = ["CHECKER_TITLE", "CHECKER_X_TITLE", "CHECKER_Y_TITLE", "DEFAULT_TITLE", "X_TITLE",
           "Y_TITLE", "figure", "scatter_png"]

# (label, editability score (x), reconstruction score (y)): CLIP's text and image similarity
Point = tuple[str, float, float]

DEFAULT_TITLE = "Reconstruction vs. editability (CLIP)"
X_TITLE = "text similarity (editability)"
Y_TITLE = "image similarity (reconstruction)"
CHECKER_TITLE = "Reconstruction vs. editability (world checker)"
CHECKER_X_TITLE = "editability (checker: concept and edit shown)"
CHECKER_Y_TITLE = "reconstruction (checker: concept shown)"

# Pixels per inch of the figure: `size` in pixels is figsize * DPI, exactly.
DPI = 100
# Labels longer than this are cut (with an ellipsis) so they stay near their point.
MAX_LABEL_CHARS = 40
# Vertical offsets (points) tried in turn for a label, right of its marker: the first
# whose text overlaps no label placed before it wins (runs often score alike).
_LABEL_DY = (5, -14, 17, -26, 29, -38, 41)


def _check_points(points: Sequence[Point]) -> list[Point]:
  """The points as (str, float, float); a one-line ValueError names the first bad one."""
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


def _short(label: str) -> str:
  return label if len(label) <= MAX_LABEL_CHARS else label[:MAX_LABEL_CHARS - 1] + "\u2026"


def figure(points: Sequence[Point], title: str = DEFAULT_TITLE,
           size: tuple[int, int] = (960, 600), x_title: str = X_TITLE,
           y_title: str = Y_TITLE) -> Figure:
  """The scatter plot of `points` as a matplotlib Figure of `size` (width, height) pixels.

  `x_title` and `y_title` name the axes (default: CLIP's text and image similarity).

  One marker per point in matplotlib's colour cycle (tab10: colours repeat
  after ten points), labelled with its (shortened) label beside it.

  Raises:
    ValueError: no points, a malformed point or a non-finite score.
  """
  points = _check_points(points)
  width, height = size
  if width < 100 or height < 100:
    raise ValueError(f"size must be at least 100x100 pixels, got {width}x{height}")
  fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)  # attaches the Agg canvas that renders it
  ax = fig.add_subplot()
  texts = []
  for i, (label, x, y) in enumerate(points):
    ax.scatter([x], [y], s=60, color=f"C{i % 10}", edgecolors="white", linewidths=0.8,
               zorder=3, label=label)
    texts.append(ax.annotate(_short(label), (x, y), xytext=(6, _LABEL_DY[0]),
                             textcoords="offset points", fontsize=9))
  ax.set_title(title)
  ax.set_xlabel(x_title)
  ax.set_ylabel(y_title)
  ax.grid(True, color="0.9", zorder=0)
  ax.margins(0.15)  # room for the labels beside the outermost points
  _separate_labels(fig, texts, [y for _, _, y in points])
  return fig


def _separate_labels(fig: Figure, texts: list, ys: list[float]) -> None:
  """Moves labels up or down (`_LABEL_DY`) so that no two overlap, highest point first."""
  fig.draw_without_rendering()  # runs the constrained layout (axes fixed) without rasterising
  renderer = fig.canvas.get_renderer()
  placed = []
  for i in sorted(range(len(texts)), key=lambda i: -ys[i]):
    text = texts[i]
    for dy in _LABEL_DY:
      text.xyann = (6, dy)
      box = text.get_window_extent(renderer)
      if not any(box.overlaps(other) for other in placed):
        break
    else:  # crowded everywhere: keep the first place
      text.xyann = (6, _LABEL_DY[0])
      box = text.get_window_extent(renderer)
    placed.append(box)


def scatter_png(points: Sequence[Point], path: str, title: str = DEFAULT_TITLE,
                size: tuple[int, int] = (960, 600), x_title: str = X_TITLE,
                y_title: str = Y_TITLE) -> None:
  """Writes the scatter plot of `points` (see `figure`) as a PNG of `size` pixels.

  Args:
    points: (label, text_similarity, image_similarity) per point, e.g. one per
      run or per checkpoint.
    path: where to write the PNG. A local file is replaced atomically (written
      beside it, then renamed), so readers never see half a file; a gs:// URL
      is written in one object upload.
    title: the headline above the plot.
    size: (width, height) in pixels.
    x_title, y_title: the axis titles (default: CLIP's).

  Raises:
    ValueError: for bad points or size, before anything is written.
  """
  fig = figure(points, title=title, size=size, x_title=x_title, y_title=y_title)
  fileio.write_via_local_file(path, lambda local: fig.savefig(local, format="png", dpi=DPI))
