"""The reconstruction-vs-editability scatter plot of the evaluation, drawn with matplotlib.

Like the quantitative figure of Gal et al. (2022): each point is one method or
run, with its text similarity (editability) on the x axis and its image
similarity (reconstruction) on the y axis, labelled with its name. Up and to
the right is better.

With the world's checker as the scorer the axes are shares of samples
instead: editability (concept and edit shown) and reconstruction (concept
shown); callers pass those axis titles (`CHECKER_X_TITLE`, `CHECKER_Y_TITLE`),
and a second panel (`more`) beside it with edit fidelity on x (the edit shown,
whatever the concept: the paper's text similarity, `CHECKER_FIDELITY_X_TITLE`).

`figure` builds the plot as a matplotlib `Figure` (its own Agg canvas: no
pyplot, no display, no global figure state); `scatter_png` writes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from ti_jax.runtime import fileio

__all__ = ["CHECKER_FIDELITY_X_TITLE", "CHECKER_TITLE", "CHECKER_X_TITLE", "CHECKER_Y_TITLE",
           "DEFAULT_TITLE", "X_TITLE", "Y_TITLE", "figure", "scatter_png"]

# (label, editability score (x), reconstruction score (y)): CLIP's text and image similarity
Point = tuple[str, float, float]

DEFAULT_TITLE = "Reconstruction vs. editability (CLIP)"
X_TITLE = "text similarity (editability)"
Y_TITLE = "image similarity (reconstruction)"
CHECKER_TITLE = "Reconstruction vs. editability (world checker)"
CHECKER_X_TITLE = "editability (checker: concept and edit shown)"
CHECKER_Y_TITLE = "reconstruction (checker: concept shown)"
CHECKER_FIDELITY_X_TITLE = "edit fidelity (checker: edit shown; the paper's text similarity)"

# Pixels per inch of the figure: `size` in pixels is figsize * DPI, exactly.
DPI = 100
# Labels longer than this are cut (with an ellipsis) so they stay near their point.
MAX_LABEL_CHARS = 40
# Vertical offsets (points) tried in turn for a label, right of its marker: the first
# whose text overlaps no label placed before it wins (runs often score alike).
_LABEL_DY = (5, -14, 17, -26, 29, -38, 41)
_MARKER_SIZE = 60  # scatter `s`: the marker's area in points^2
_MARKER_RADIUS_PT = 0.5 * _MARKER_SIZE ** 0.5


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
           y_title: str = Y_TITLE,
           more: Sequence[tuple[str, Sequence[Point]]] = (),
           min_span: float = 0.0,
           bounds: tuple[float, float] | None = None) -> Figure:
  """The scatter plot of `points` as a matplotlib Figure of `size` (width, height) pixels.

  `x_title` and `y_title` name the axes (default: CLIP's text and image similarity).
  `more`: further panels to the right, each (x_title, points), sharing the y axis
  (the same runs scored on another x measure). `min_span`: the least extent of
  every axis, in score units, centred on the points: the checker's shares move
  in steps of one sample (1/64), which autoscaling alone would blow up to fill
  the panel. `bounds`: the range scores can take ((0, 1) for shares), which a
  widened axis passes by at most a tenth of `min_span`.

  One marker per point in matplotlib's colour cycle (tab10: colours repeat
  after ten points), labelled with its (shortened) label beside it; a run has
  the same colour in every panel.

  Raises:
    ValueError: no points, a malformed point or a non-finite score, in any panel.
  """
  panels = [(x_title, _check_points(points))] + [(t, _check_points(p)) for t, p in more]
  width, height = size
  if width < 100 or height < 100:
    raise ValueError(f"size must be at least 100x100 pixels, got {width}x{height}")
  fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)  # attaches the Agg canvas that renders it
  axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
  labels = []  # per panel: (its label texts, their points' y)
  for ax, (panel_x_title, panel_points) in zip(axes, panels):
    texts = []
    for i, (label, x, y) in enumerate(panel_points):
      ax.scatter([x], [y], s=_MARKER_SIZE, color=f"C{i % 10}", edgecolors="white",
                 linewidths=0.8, zorder=3, label=label)
      texts.append(ax.annotate(_short(label), (x, y), xytext=(6, _LABEL_DY[0]),
                               textcoords="offset points", fontsize=9))
    ax.set_xlabel(panel_x_title)
    ax.grid(True, color="0.9", zorder=0)
    ax.margins(0.15)  # room for the labels beside the outermost points
    _widen(ax.get_xlim(), ax.set_xlim, min_span, bounds)
    labels.append((texts, [y for _, _, y in panel_points]))
  axes[0].set_ylabel(y_title)
  _widen(axes[0].get_ylim(), axes[0].set_ylim, min_span, bounds)  # shared by every panel
  if len(panels) == 1:
    axes[0].set_title(title)
  else:
    fig.suptitle(title)
  for texts, ys in labels:
    _separate_labels(fig, texts, ys)
  return fig


def _widen(limits: tuple[float, float], set_limits, min_span: float,
           bounds: tuple[float, float] | None) -> None:
  """Sets an axis to at least `min_span` wide, about the centre of its current `limits`.

  With `bounds` (the scores' range, e.g. (0, 1) for shares), the widened axis is
  moved to pass them by at most a tenth of `min_span` (room for a marker),
  never cutting off the current `limits`.
  """
  low, high = limits
  if high - low >= min_span:
    return
  centre = (low + high) / 2
  new_low, new_high = centre - min_span / 2, centre + min_span / 2
  if bounds is not None:
    pad = 0.1 * min_span
    over = new_high - max(high, bounds[1] + pad)
    under = min(low, bounds[0] - pad) - new_low
    if over > 0:
      new_low, new_high = new_low - over, new_high - over
    elif under > 0:
      new_low, new_high = new_low + under, new_high + under
  set_limits(new_low, new_high)


def _separate_labels(fig: Figure, texts: list, ys: list[float]) -> None:
  """Moves labels up or down (`_LABEL_DY`) so that none overlaps another label or a
  marker of another point, highest point first."""
  fig.draw_without_rendering()  # runs the constrained layout (axes fixed) without rasterising
  renderer = fig.canvas.get_renderer()
  markers = [_marker_box(text, renderer) for text in texts]
  placed = []
  for i in sorted(range(len(texts)), key=lambda i: -ys[i]):
    text = texts[i]
    others = placed + markers[:i] + markers[i + 1:]
    for dy in _LABEL_DY:
      text.xyann = (6, dy)
      box = text.get_window_extent(renderer)
      if not any(box.overlaps(other) for other in others):
        break
    else:  # crowded everywhere: keep the first place
      text.xyann = (6, _LABEL_DY[0])
      box = text.get_window_extent(renderer)
    placed.append(box)


def _marker_box(text, renderer) -> Bbox:
  """The display box of the marker a label annotates (its point, +- the marker's radius)."""
  x, y = text.axes.transData.transform(text.xy)
  radius = renderer.points_to_pixels(_MARKER_RADIUS_PT)
  return Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)


def scatter_png(points: Sequence[Point], path: str, title: str = DEFAULT_TITLE,
                size: tuple[int, int] = (960, 600), x_title: str = X_TITLE,
                y_title: str = Y_TITLE,
                more: Sequence[tuple[str, Sequence[Point]]] = (),
                min_span: float = 0.0,
                bounds: tuple[float, float] | None = None) -> None:
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
    more: further panels beside the first, each (x_title, points) (see `figure`).
    min_span, bounds: the least extent of every axis and the scores' range
      (see `figure`).

  Raises:
    ValueError: for bad points or size, before anything is written.
  """
  fig = figure(points, title=title, size=size, x_title=x_title, y_title=y_title, more=more,
               min_span=min_span, bounds=bounds)
  fileio.write_via_local_file(path, lambda local: fig.savefig(local, format="png", dpi=DPI))
