"""Procedurally drawn example concepts for the offline textual-inversion demo.

The repository ships two tiny, license-clean training sets drawn by this
module (no photos or third-party art are involved):

* ``examples/toy/``: four "photos" of one made-up object, a small orange toy
  robot, on different backgrounds and at different positions, sizes and
  tilts; an *object* concept.
* ``examples/style/``: four pictures of different subjects (a cat, a house, a
  sailboat, a potted plant) sharing one made-up look: thick black outlines,
  flat pastel fills, a polka-dot backdrop and a black frame; a *style*
  concept.

Drawing is deterministic (fixed layouts, seeded noise), so
``python -m ti_jax.testing.example_images`` regenerates the same pictures into
``examples/``.  Shapes are drawn at 4x the output size and downsampled, which
gives smooth, anti-aliased edges from PIL's aliased primitives.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ti_jax import cli
from ti_jax.world import scenes

__all__ = ["draw_example_concept", "draw_example_style", "draw_examples", "main"]

# Supersampling factor: shapes are drawn this many times larger than the output.
_SS = 4

Color = tuple[int, int, int]

# ---------------------------------------------------------------------------
# Shared helpers.
# ---------------------------------------------------------------------------


def _vertical_gradient(width: int, height: int, top: Color, bottom: Color) -> np.ndarray:
  """float32 ``[H, W, 3]`` colours blending linearly from `top` to `bottom`."""
  t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]  # [H, 1, 1]
  a, b = np.array(top, np.float32), np.array(bottom, np.float32)
  return np.broadcast_to(a + (b - a) * t, (height, width, 3)).copy()


def _to_image(rgb: np.ndarray) -> Image.Image:
  """float ``[H, W, 3]`` in 0..255 to an RGBA image."""
  return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8)).convert("RGBA")


def _finish(canvas: Image.Image, size: int) -> Image.Image:
  """Downsamples a supersampled canvas to the output size, as RGB."""
  return canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def _save(images: Sequence[Image.Image], names: Sequence[str], out_dir: str) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for img, name in zip(images, names):
    path = os.path.join(out_dir, name)
    img.save(path, format="PNG", optimize=True)
    paths.append(path)
  return paths


# ---------------------------------------------------------------------------
# The toy robot (object concept).
# ---------------------------------------------------------------------------

# The robot is drawn once on a fixed 400 x 400 sprite; its figure spans rows
# ~30..385 (feet at the bottom), which `_place` uses to size it.
_SPRITE = 400
_ROBOT_TOP, _ROBOT_FEET = 30, 385

_ORANGE: Color = (242, 128, 36)
_ORANGE_DARK: Color = (168, 74, 18)
_STEEL: Color = (128, 132, 142)
_STEEL_DARK: Color = (70, 72, 80)


def _robot_sprite() -> Image.Image:
  """The toy robot, facing the viewer, on a transparent 400 x 400 sprite."""
  img = Image.new("RGBA", (_SPRITE, _SPRITE), (0, 0, 0, 0))
  d = ImageDraw.Draw(img)
  # Antenna with a red bulb.
  d.line([(200, 92), (200, 52)], fill=_STEEL_DARK, width=8)
  d.ellipse([186, 31, 214, 59], fill=(222, 40, 40), outline=(120, 20, 20), width=3)
  # Arms behind the body, with round grippers.
  for x0 in (72, 293):
    d.rounded_rectangle([x0, 206, x0 + 35, 296], radius=14, fill=_STEEL, outline=_STEEL_DARK,
                        width=4)
    d.ellipse([x0 - 4, 286, x0 + 39, 326], fill=_STEEL_DARK)
  # Legs and big orange feet.
  for x0 in (142, 220):
    d.rectangle([x0, 312, x0 + 38, 368], fill=_STEEL, outline=_STEEL_DARK, width=4)
    d.rounded_rectangle([x0 - 16, 358, x0 + 54, 385], radius=10, fill=_ORANGE_DARK)
  # Body with a cream chest panel: a yellow dial and three buttons.
  d.rounded_rectangle([108, 194, 292, 322], radius=30, fill=_ORANGE, outline=_ORANGE_DARK, width=6)
  d.rounded_rectangle([148, 216, 252, 296], radius=12, fill=(252, 234, 190),
                      outline=_ORANGE_DARK, width=3)
  d.ellipse([160, 228, 206, 274], fill=(250, 206, 40), outline=_ORANGE_DARK, width=3)
  d.line([(183, 251), (198, 238)], fill=_STEEL_DARK, width=5)
  for i, c in enumerate([(220, 50, 50), (60, 170, 80), (50, 110, 220)]):
    y = 228 + 20 * i
    d.ellipse([218, y, 236, y + 18], fill=c)
  # Neck and head, with big cyan eyes and a grille mouth.
  d.rectangle([184, 178, 216, 198], fill=_STEEL_DARK)
  d.rounded_rectangle([128, 88, 272, 184], radius=26, fill=_ORANGE, outline=_ORANGE_DARK, width=6)
  for cx in (170, 230):
    d.ellipse([cx - 19, 116, cx + 19, 154], fill=(255, 255, 255), outline=_STEEL_DARK, width=4)
    d.ellipse([cx - 11, 124, cx + 11, 146], fill=(50, 196, 230))
    d.ellipse([cx - 4, 131, cx + 4, 139], fill=(10, 10, 10))
  d.rounded_rectangle([172, 160, 228, 174], radius=5, fill=_STEEL_DARK)
  for x in range(182, 224, 10):
    d.line([(x, 162), (x, 172)], fill=_STEEL, width=3)
  return img


def _place(canvas: Image.Image, sprite: Image.Image, cx: float, feet_y: float, height: float,
           angle: float) -> None:
  """Composites the robot onto `canvas`, with a soft contact shadow.

  Args:
    canvas: RGBA canvas, modified in place.
    sprite: the robot sprite.
    cx: horizontal centre, as a fraction of the canvas width.
    feet_y: height of the feet, as a fraction of the canvas height.
    height: robot height as a fraction of the canvas height.
    angle: tilt in degrees, counter-clockwise.
  """
  side = canvas.size[0]
  scale = height * side / (_ROBOT_FEET - _ROBOT_TOP)
  w = h = max(1, round(_SPRITE * scale))
  # Shadow first, so the robot covers its upper half.
  shadow = Image.new("L", canvas.size, 0)
  sw, sh = 0.62 * w, 0.07 * h
  fx, fy = cx * side, feet_y * side
  ImageDraw.Draw(shadow).ellipse([fx - sw / 2, fy - sh / 2, fx + sw / 2, fy + sh / 2], fill=120)
  shadow = shadow.filter(ImageFilter.GaussianBlur(radius=0.02 * side))
  canvas.alpha_composite(Image.merge("RGBA", [Image.new("L", canvas.size, 0)] * 3 + [shadow]))
  robot = sprite.resize((w, h), Image.Resampling.LANCZOS)
  # Rotate about the feet, so a tilted robot still stands on the ground.
  pivot = (w / 2, (_ROBOT_FEET / _SPRITE) * h)
  robot = robot.rotate(angle, resample=Image.Resampling.BICUBIC, center=pivot)
  canvas.alpha_composite(robot, (round(fx - pivot[0]), round(fy - pivot[1])))


def _wall_and_table(side: int) -> Image.Image:
  """Pale blue wall over a wooden table top with grain lines."""
  horizon = int(0.6 * side)
  rgb = _vertical_gradient(side, side, (196, 218, 236), (160, 186, 210))  # [S, S, 3]
  wood = _vertical_gradient(side, side - horizon, (176, 120, 72), (132, 84, 46))
  y = np.arange(side - horizon, dtype=np.float32)[:, None]  # [h, 1]
  x = np.arange(side, dtype=np.float32)[None, :]  # [1, S]
  grain = np.sin(y * 0.09 + 2.5 * np.sin(x * 0.004 + y * 0.01))  # [h, S]
  rgb[horizon:] = wood - 14.0 * (grain[..., None] > 0.85)
  rgb[horizon:horizon + side // 60] *= 0.75  # The table's back edge.
  return _to_image(rgb)


def _lawn_and_sky(side: int) -> Image.Image:
  """Blue sky over a green lawn with darker grass strokes."""
  horizon = int(0.55 * side)
  canvas = _to_image(_vertical_gradient(side, side, (110, 170, 235), (205, 228, 248)))
  d = ImageDraw.Draw(canvas)
  d.rectangle([0, horizon, side, side], fill=(96, 168, 74))
  d.ellipse([0.68 * side, 0.08 * side, 0.86 * side, 0.2 * side], fill=(255, 255, 255))
  d.ellipse([0.6 * side, 0.12 * side, 0.8 * side, 0.22 * side], fill=(255, 255, 255))
  rng = np.random.default_rng(7)
  for _ in range(90):
    x = rng.uniform(0, side)
    y = rng.uniform(horizon + 0.02 * side, side)
    length = 0.02 * side + 0.03 * side * (y - horizon) / (side - horizon)
    d.line([(x, y), (x + rng.uniform(-0.3, 0.3) * length, y - length)], fill=(66, 132, 52),
           width=max(1, side // 110))
  return canvas


def _checked_cloth(side: int) -> Image.Image:
  """Cream wall over a red-and-white checked tablecloth seen in perspective."""
  horizon = int(0.5 * side)
  canvas = _to_image(_vertical_gradient(side, side, (244, 234, 214), (226, 212, 186)))
  rows = side - horizon
  y = np.arange(rows, dtype=np.float32)[:, None] + 1.0  # [h, 1]
  x = np.arange(side, dtype=np.float32)[None, :] - side / 2  # [1, S]
  # Ground-plane coordinates of each pixel: depth ~ 1/y, so checks shrink
  # towards the horizon like on a real table.
  depth = side * 0.6 / (y + 0.15 * side)
  u = x * depth / side * 8.0
  v = depth * 6.0
  checks = (np.floor(u).astype(int) + np.floor(v).astype(int)) % 2  # [h, S]
  cloth = np.where(checks[..., None] == 1, np.array([206, 44, 52], np.float32),
                   np.array([250, 246, 240], np.float32))
  rgb = np.asarray(canvas.convert("RGB"), np.float32).copy()
  rgb[horizon:] = cloth
  return _to_image(rgb)


def _studio(side: int) -> Image.Image:
  """Dark purple studio backdrop with a spotlight and a grey floor."""
  yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side  # [S, S] each
  light = np.exp(-((xx - 0.55) ** 2 + (yy - 0.45) ** 2) / 0.12)[..., None]  # [S, S, 1]
  backdrop = np.array([46, 36, 78], np.float32) + light * np.array([110, 96, 140], np.float32)
  floor = yy[..., None] > 0.72
  rgb = np.where(floor, backdrop * 0.55 + np.array([60, 60, 64], np.float32), backdrop)
  return _to_image(rgb)


def draw_example_concept(out_dir: str, size: int = 128) -> list[str]:
  """Draws four photos of the made-up orange toy robot as PNG files.

  The same robot appears in every picture; background, position, size and
  tilt change, as in a casual photo set of one object.

  Args:
    out_dir: folder to write ``toy_robot_1.png`` .. ``toy_robot_4.png`` into
      (created if needed).
    size: side of the square images in pixels.

  Returns:
    The written paths.
  """
  side = size * _SS
  sprite = _robot_sprite()
  scenes = [
      # (background, centre x, feet y, height, tilt in degrees)
      (_wall_and_table, 0.5, 0.86, 0.7, 0.0),
      (_lawn_and_sky, 0.36, 0.9, 0.56, -12.0),
      (_checked_cloth, 0.6, 0.93, 0.85, 7.0),
      (_studio, 0.45, 0.8, 0.48, 18.0),
  ]
  images = []
  for background, cx, feet_y, height, angle in scenes:
    canvas = background(side)
    _place(canvas, sprite, cx, feet_y, height, angle)
    images.append(_finish(canvas, size))
  return _save(images, [f"toy_robot_{i + 1}.png" for i in range(len(images))], out_dir)


# ---------------------------------------------------------------------------
# The "pastel outline" style.
# ---------------------------------------------------------------------------

_INK: Color = (20, 20, 24)
_PINK: Color = (248, 188, 210)
_MINT: Color = (182, 234, 204)
_LAVENDER: Color = (206, 192, 242)
_BUTTER: Color = (253, 234, 158)
_SKY: Color = (178, 214, 246)
_PEACH: Color = (255, 204, 168)


def _styled_backdrop(side: int, color: Color, dot_color: Color) -> Image.Image:
  """Flat pastel backdrop covered with a staggered polka-dot grid."""
  canvas = Image.new("RGBA", (side, side), color + (255,))
  d = ImageDraw.Draw(canvas)
  step = side / 9
  r = step * 0.16
  for row in range(10):
    offset = step / 2 if row % 2 else 0.0
    for col in range(-1, 10):
      x, y = col * step + offset + step / 4, row * step + step / 4
      d.ellipse([x - r, y - r, x + r, y + r], fill=dot_color)
  return canvas


def _frame(canvas: Image.Image, width: float) -> None:
  """A thick black border, part of the style."""
  side = canvas.size[0]
  ImageDraw.Draw(canvas).rectangle([0, 0, side - 1, side - 1], outline=_INK, width=round(width))


def _ellipse_points(cx: float, cy: float, rx: float, ry: float, angle: float,
                    n: int = 48) -> list[tuple[float, float]]:
  """Polygon points of an ellipse rotated by `angle` degrees."""
  a = math.radians(angle)
  pts = []
  for k in range(n):
    t = 2 * math.pi * k / n
    x, y = rx * math.cos(t), ry * math.sin(t)
    pts.append((cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)))
  return pts


def _style_cat(side: int) -> Image.Image:
  canvas = _styled_backdrop(side, _MINT, (160, 214, 184))
  d = ImageDraw.Draw(canvas)
  s, w = side / 100, round(side * 0.03)
  # Tail curling up beside the body: an outlined stroke along a smooth curve.
  tail = [(s * (66 + 24 * math.sin(t)), s * (84 - 38 * t / math.pi)) for t in
          np.linspace(0.0, 0.8 * math.pi, 24)]
  d.line(tail, fill=_INK, width=round(w * 3.2), joint="curve")
  d.line(tail, fill=_PEACH, width=round(w * 1.4), joint="curve")
  for end, r in ((tail[-1], w * 1.6), (tail[-1], w * 0.7)):
    d.ellipse([end[0] - r, end[1] - r, end[0] + r, end[1] + r],
              fill=_INK if r > w else _PEACH)
  d.ellipse([28 * s, 48 * s, 74 * s, 90 * s], fill=_PEACH, outline=_INK, width=w)
  # Ears, then the head over their bases.
  d.polygon([(31 * s, 34 * s), (34 * s, 12 * s), (46 * s, 24 * s)], fill=_PEACH, outline=_INK,
            width=w)
  d.polygon([(69 * s, 34 * s), (66 * s, 12 * s), (54 * s, 24 * s)], fill=_PEACH, outline=_INK,
            width=w)
  d.ellipse([28 * s, 18 * s, 72 * s, 56 * s], fill=_PEACH, outline=_INK, width=w)
  for cx in (41, 59):
    d.ellipse([(cx - 3) * s, 32 * s, (cx + 3) * s, 39 * s], fill=_INK)
  d.polygon([(47 * s, 42 * s), (53 * s, 42 * s), (50 * s, 46 * s)], fill=_PINK, outline=_INK,
            width=max(1, w // 2))
  for dy in (-2, 2):
    d.line([(24 * s, (45 + dy) * s), (40 * s, 45 * s)], fill=_INK, width=max(1, w // 2))
    d.line([(60 * s, 45 * s), (76 * s, (45 + dy) * s)], fill=_INK, width=max(1, w // 2))
  # Paws.
  for cx in (42, 58):
    d.ellipse([(cx - 6) * s, 82 * s, (cx + 6) * s, 92 * s], fill=_PEACH, outline=_INK, width=w)
  _frame(canvas, side * 0.04)
  return canvas


def _style_house(side: int) -> Image.Image:
  canvas = _styled_backdrop(side, _SKY, (150, 190, 232))
  d = ImageDraw.Draw(canvas)
  s, w = side / 100, round(side * 0.03)
  d.ellipse([70 * s, 8 * s, 90 * s, 28 * s], fill=_BUTTER, outline=_INK, width=w)
  d.rectangle([0, 84 * s, side, side], fill=_MINT, outline=_INK, width=w)
  d.rectangle([58 * s, 22 * s, 66 * s, 40 * s], fill=_PINK, outline=_INK, width=w)
  d.rectangle([24 * s, 46 * s, 76 * s, 86 * s], fill=_BUTTER, outline=_INK, width=w)
  d.polygon([(16 * s, 48 * s), (50 * s, 18 * s), (84 * s, 48 * s)], fill=_PINK, outline=_INK,
            width=w)
  d.rectangle([44 * s, 62 * s, 56 * s, 86 * s], fill=_LAVENDER, outline=_INK, width=w)
  d.rectangle([29 * s, 54 * s, 40 * s, 65 * s], fill=(255, 255, 255), outline=_INK, width=w)
  d.line([(34.5 * s, 54 * s), (34.5 * s, 65 * s)], fill=_INK, width=max(1, w // 2))
  d.line([(29 * s, 59.5 * s), (40 * s, 59.5 * s)], fill=_INK, width=max(1, w // 2))
  d.rectangle([61 * s, 54 * s, 71 * s, 64 * s], fill=(255, 255, 255), outline=_INK, width=w)
  _frame(canvas, side * 0.04)
  return canvas


def _style_boat(side: int) -> Image.Image:
  canvas = _styled_backdrop(side, _BUTTER, (240, 214, 120))
  d = ImageDraw.Draw(canvas)
  s, w = side / 100, round(side * 0.03)
  d.rectangle([0, 72 * s, side, side], fill=_SKY, outline=_INK, width=w)
  d.line([(50 * s, 14 * s), (50 * s, 66 * s)], fill=_INK, width=w)
  d.polygon([(53 * s, 16 * s), (53 * s, 60 * s), (80 * s, 60 * s)], fill=(255, 255, 255),
            outline=_INK, width=w)
  d.polygon([(47 * s, 22 * s), (47 * s, 60 * s), (26 * s, 60 * s)], fill=_PINK, outline=_INK,
            width=w)
  d.polygon([(18 * s, 64 * s), (84 * s, 64 * s), (74 * s, 78 * s), (28 * s, 78 * s)],
            fill=_LAVENDER, outline=_INK, width=w)
  for x in range(6, 100, 22):
    d.arc([x * s, 82 * s, (x + 14) * s, 92 * s], start=200, end=340, fill=_INK, width=w)
  _frame(canvas, side * 0.04)
  return canvas


def _style_plant(side: int) -> Image.Image:
  canvas = _styled_backdrop(side, _LAVENDER, (184, 166, 228))
  d = ImageDraw.Draw(canvas)
  s, w = side / 100, round(side * 0.03)
  d.line([(50 * s, 62 * s), (50 * s, 30 * s)], fill=_INK, width=w)
  for cx, cy, rx, ry, angle in [(34, 40, 16, 7, -35), (66, 36, 16, 7, 35), (50, 20, 7, 13, 0),
                                (38, 56, 12, 5, -10), (62, 54, 12, 5, 10)]:
    d.polygon(_ellipse_points(cx * s, cy * s, rx * s, ry * s, angle), fill=_MINT, outline=_INK,
              width=w)
  d.polygon([(30 * s, 64 * s), (70 * s, 64 * s), (64 * s, 90 * s), (36 * s, 90 * s)],
            fill=_PEACH, outline=_INK, width=w)
  d.rectangle([27 * s, 60 * s, 73 * s, 68 * s], fill=_PEACH, outline=_INK, width=w)
  for cx in (42, 50, 58):
    d.ellipse([(cx - 2) * s, 76 * s, (cx + 2) * s, 80 * s], fill=_PINK, outline=_INK,
              width=max(1, w // 2))
  _frame(canvas, side * 0.04)
  return canvas


def draw_example_style(out_dir: str, size: int = 128) -> list[str]:
  """Draws four pictures of different subjects in one made-up style as PNGs.

  The shared style: thick black outlines, flat pastel fills, a polka-dot
  backdrop and a black frame.

  Args:
    out_dir: folder to write ``pastel_<subject>.png`` into (created if needed).
    size: side of the square images in pixels.

  Returns:
    The written paths.
  """
  side = size * _SS
  subjects = [("cat", _style_cat), ("house", _style_house), ("boat", _style_boat),
              ("plant", _style_plant)]
  images = [_finish(draw(side), size) for _, draw in subjects]
  return _save(images, [f"pastel_{name}.png" for name, _ in subjects], out_dir)


# The tiny-world example: renders of the world's held-out shape on random colours,
# sizes and positions (`ti_jax.world.scenes.write_concept_folder`, world seed 0), 32x32.
WORLD_EXAMPLES = {"world-cross": {"shape": "cross"}}
WORLD_EXAMPLE_COUNT = 5


def draw_world_examples(out_dir: str = "examples") -> list[str]:
  """Writes ``<out_dir>/world-cross`` (5 renders and concept.json); returns the image paths."""
  paths = []
  for name, concept in WORLD_EXAMPLES.items():
    paths += scenes.write_concept_folder(os.path.join(out_dir, name), 0, WORLD_EXAMPLE_COUNT,
                                         **concept)
  return paths


def draw_examples(out_dir: str = "examples", size: int = 128) -> list[str]:
  """Draws the example concepts into ``<out_dir>/toy``, ``style`` (`size` px) and the 32 px
  ``world-cross``; returns the image paths."""
  return (draw_example_concept(os.path.join(out_dir, "toy"), size)
          + draw_example_style(os.path.join(out_dir, "style"), size)
          + draw_world_examples(out_dir))


def main(argv: Sequence[str]) -> None:
  """`python -m ti_jax.testing.example_images`: regenerates the examples into --out_dir."""
  f = cli.start(argv)
  try:
    draw_examples(f.out_dir, f.size)
  except OSError as e:  # e.g. a read-only folder, or a file where a folder goes
    raise SystemExit(f"error: cannot write the examples to {f.out_dir}: "
                     f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}") from None


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("out_dir", "examples",
                      "Folder receiving toy/, style/ and world-cross/.")
  flags.DEFINE_integer("size", 128, "Image side in pixels.", lower_bound=1)
  app.run(main, flags_parser=cli.flags_parser)
