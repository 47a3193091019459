"""A procedural captioned image world: one coloured shape on a plain background.

Every render is a pure function of `(seed, index)`: the scene's attributes
(shape, colour, background colour, size, position, drawing style) and a small
position jitter are drawn from `numpy.random.default_rng([seed, index])`, and
the image is drawn with PIL at 4x resolution and box-filtered down (soft,
anti-aliased edges, as a photo would have). No file is read or downloaded.

Images are 32x32 RGB: the smallest size at which a 5-pointed star, a triangle
and a cross are still told apart by eye and by a small CNN, and small enough
that the base model (a KL autoencoder to 16x16x4 latents, a UNet on those) trains
on 2 CPU cores in about two hours; 64x64 costs 4x as much per step.

Two things are held out of the words a user has, as the textual-inversion
experiments need:

* the shape `HELD_OUT_SHAPE` ("cross"), drawn in `HELD_OUT_SHARE` of the
  scenes;
* the style "outlined" (the shape's outline only), drawn in `OUTLINED_SHARE`
  of the scenes.

The captions a user sees (`caption`) never name either: a cross is always "an
object" and no caption names a style. The base model's own training captions
(`caption(..., hidden=True)`) name them, like any other shape, by
`HIDDEN_TOKENS`: tokens the base model learns and the shipped model then loses
(its tokenizer has no such word and the text encoder's embedding rows for them
are cut), so the shipped model can draw the concept and its text-conditioning
has a place for it, but it has no word for it. A model this small trained on a
never-named cross has no such place: textual inversion on it reached 0.31 of
samples showing a cross (README, "The tiny world"). Named shapes are also
called "object" half of the time, so the word "object" alone draws a cross
only rarely.

`labels(scene)` gives the ground truth of every attribute as class indices
(what `ti_jax.world.checker` learns to predict).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges

NAMED_SHAPES = ("circle", "square", "triangle", "star", "diamond")
HELD_OUT_SHAPE = "cross"
SHAPES = NAMED_SHAPES + (HELD_OUT_SHAPE,)
GENERIC_WORD = "object"  # what the held-out shape (and sometimes any shape) is called

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
POSITIONS = ("left", "middle", "right")
STYLES = ("filled", "outlined")
HELD_OUT_STYLE = "outlined"
# The base model's training captions name the held-out shape and style by these tokens;
# the shipped model has no word for them (see the module docstring).
HIDDEN_TOKENS = {HELD_OUT_SHAPE: "<cross>", HELD_OUT_STYLE: "<outlined>"}

# Every attribute a scene has, in the order `labels` and the checker use.
ATTRIBUTES = {
    "shape": SHAPES, "colour": COLOUR_NAMES, "background": COLOUR_NAMES,
    "size": SIZES, "position": POSITIONS, "style": STYLES,
}

HELD_OUT_SHARE = 0.1  # share of scenes that draw the held-out shape
OUTLINED_SHARE = 0.15  # share of scenes drawn in the held-out style
GENERIC_SHARE = 0.5  # share of named shapes captioned as "object" anyway
MENTION_SHARE = 0.7  # each of colour, size, background, position is named this often

_RADIUS = {"small": 6.0, "large": 10.0}  # in output pixels (half the shape's extent)
_CENTRE_X = {"left": 11.0, "middle": 16.0, "right": 21.0}
_JITTER = 1.5  # +- pixels of the centre, uniform
_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
# Caption openings; the textual-inversion templates begin the same way.
_BACKGROUND = re.compile(r"\bon an? (" + "|".join(COLOUR_NAMES) + r") background\b")
PREFIXES = ("", "a photo of ", "a rendering of ", "a picture of ", "a drawing of ")


@dataclasses.dataclass(frozen=True)
class Scene:
  """One scene: its attributes by name and the centre's jitter in pixels."""
  shape: str
  colour: str
  background: str
  size: str
  position: str
  style: str = "filled"
  dx: float = 0.0
  dy: float = 0.0


def sample_scene(seed: int, index: int) -> Scene:
  """The scene `index` of the world `seed` (a pure function of both)."""
  rng = np.random.default_rng([seed, index, 0])
  if rng.random() < HELD_OUT_SHARE:
    shape = HELD_OUT_SHAPE
  else:
    shape = NAMED_SHAPES[rng.integers(len(NAMED_SHAPES))]
  colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
  # The background is any other colour: the shape is always visible.
  others = [c for c in COLOUR_NAMES if c != colour]
  background = others[rng.integers(len(others))]
  size = SIZES[rng.integers(len(SIZES))]
  position = POSITIONS[rng.integers(len(POSITIONS))]
  style = HELD_OUT_STYLE if rng.random() < OUTLINED_SHARE else "filled"
  dx, dy = rng.uniform(-_JITTER, _JITTER, size=2)
  return Scene(shape, colour, background, size, position, style, float(dx), float(dy))


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
  """The polygon of `shape` centred at (cx, cy) with half-extent r (None: a circle)."""
  if shape == "circle":
    return None
  if shape == "square":
    s = r * 0.85  # a square of the circle's visual weight
    return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
  if shape == "diamond":
    return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
  if shape == "triangle":
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in
            (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
  if shape == "star":
    pts = []
    for k in range(10):
      rad = r if k % 2 == 0 else r * 0.42
      a = -math.pi / 2 + k * math.pi / 5
      pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts
  if shape == "cross":
    w = r * 0.36  # half the arm's width
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
  raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> np.ndarray:
  """Draws `scene`: uint8 [image_size, image_size, 3]."""
  k = _SUPERSAMPLE * image_size / IMAGE_SIZE  # drawing pixels per output pixel at 32x32
  big = Image.new("RGB", (_SUPERSAMPLE * image_size,) * 2, COLOURS[scene.background])
  draw = ImageDraw.Draw(big)
  cx = (_CENTRE_X[scene.position] + scene.dx) * k
  cy = (IMAGE_SIZE / 2 + scene.dy) * k
  r = _RADIUS[scene.size] * k
  fill = COLOURS[scene.colour]
  outlined = scene.style == "outlined"
  width = round(1.5 * k) if outlined else 0  # 1.5 output pixels
  points = _outline(scene.shape, cx, cy, r)
  if points is None:
    box = [cx - r, cy - r, cx + r, cy + r]
    if outlined:
      draw.ellipse(box, outline=fill, width=width)
    else:
      draw.ellipse(box, fill=fill)
  elif outlined:
    draw.line(points + points[:2], fill=fill, width=width, joint="curve")
  else:
    draw.polygon(points, fill=fill)
  small = big.resize((image_size, image_size), Image.Resampling.BOX)
  return np.asarray(small, dtype=np.uint8)


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def describe(scene: Scene, *, colour: bool = True, size: bool = True, background: bool = True,
             position: bool = True, generic: bool = False, prefix: str = "",
             hidden: bool = False, style: bool = True, slot: str = "") -> str:
  """A plain-English caption of `scene` naming the chosen attributes.

  The shape is named unless `generic` is set (then it is "object"); the
  held-out shape is "object" too unless `hidden`, when it is its
  `HIDDEN_TOKENS` token. The style is named only if `hidden` and `style` and
  it is the held-out one (by its token, before the noun). E.g. "a photo of a
  small red star on the left on a blue background". `slot` ("shape" or
  "style") writes "{}" where that attribute's word goes instead: the caption
  of a textual-inversion image, whose pseudo-word stands for it.
  """
  if slot not in ("", "shape", "style"):
    raise ValueError(f"slot must be '', 'shape' or 'style', got {slot!r}")
  if slot == "shape":
    noun = "{}"
  elif generic or (scene.shape == HELD_OUT_SHAPE and not hidden):
    noun = GENERIC_WORD
  else:
    noun = HIDDEN_TOKENS.get(scene.shape, scene.shape)
  if slot == "style":
    styled = ["{}"]
  elif hidden and style and scene.style in HIDDEN_TOKENS:
    styled = [HIDDEN_TOKENS[scene.style]]
  else:
    styled = []
  words = ([scene.size] if size else []) + ([scene.colour] if colour else []) + styled + [noun]
  text = f"{prefix}{_article(words[0])} {' '.join(words)}"
  if position:
    text += " " + _PHRASES[scene.position]
  if background:
    text += f" on {_article(scene.background)} {scene.background} background"
  return text


def caption(seed: int, index: int, scene: Scene | None = None, hidden: bool = False) -> str:
  """The caption of scene `index`: a random subset of its attributes, named.

  Drawn from its own stream of `(seed, index)`, so the scene and its caption
  are independent choices. `hidden`: the base model's training caption, which
  names the held-out shape and style by their `HIDDEN_TOKENS` (the same
  caption otherwise).
  """
  scene = scene or sample_scene(seed, index)
  rng = np.random.default_rng([seed, index, 1])
  mention = rng.random(4) < MENTION_SHARE
  generic = bool(rng.random() < GENERIC_SHARE)
  prefix = PREFIXES[rng.integers(len(PREFIXES))]
  style = bool(rng.random() < MENTION_SHARE)  # drawn last: the other draws stay as they were
  return describe(scene, colour=bool(mention[0]), size=bool(mention[1]),
                  background=bool(mention[2]), position=bool(mention[3]),
                  generic=generic, prefix=prefix, hidden=hidden, style=style)


def labels(scene: Scene) -> dict[str, int]:
  """The ground-truth class index of every attribute (`ATTRIBUTES` order)."""
  return {name: ATTRIBUTES[name].index(getattr(scene, name)) for name in ATTRIBUTES}


def batch(seed: int, start: int, count: int,
          hidden: bool = False) -> tuple[np.ndarray, list[str], dict[str, np.ndarray]]:
  """Scenes `start .. start + count - 1` of world `seed`.

  Returns:
    images: uint8 [count, 32, 32, 3];
    captions: their captions (`hidden`: the base model's, see `caption`);
    labels: attribute name -> int32 [count] class indices.
  """
  scenes = [sample_scene(seed, i) for i in range(start, start + count)]
  images = np.stack([render(s) for s in scenes])  # [N, 32, 32, 3]
  captions = [caption(seed, i, s, hidden) for i, s in zip(range(start, start + count), scenes)]
  return images, captions, stack_labels(scenes)


def stack_labels(scenes: list[Scene]) -> dict[str, np.ndarray]:
  """Attribute name -> int32 [len(scenes)] class indices."""
  per = [labels(s) for s in scenes]
  return {name: np.asarray([p[name] for p in per], np.int32) for name in ATTRIBUTES}


def concept_scenes(seed: int, count: int, shape: str = HELD_OUT_SHAPE,
                   style: str = "filled", **fixed: str) -> list[Scene]:
  """`count` scenes of one concept (a shape and a style) with the other attributes drawn at random.

  `fixed` pins attributes by name (e.g. colour="red"); these are the training
  images of a textual-inversion run and the ground truth of edit prompts.
  """
  out = []
  for i in range(count):
    rng = np.random.default_rng([seed, i, 2])
    # Colour and background always differ, whichever of them is pinned.
    palette = [c for c in COLOUR_NAMES if c != fixed.get("background")]
    colour = fixed.get("colour") or palette[rng.integers(len(palette))]
    others = [c for c in COLOUR_NAMES if c != colour]
    background = fixed.get("background") or others[rng.integers(len(others))]
    size = fixed.get("size") or SIZES[rng.integers(len(SIZES))]
    position = fixed.get("position") or POSITIONS[rng.integers(len(POSITIONS))]
    dx, dy = rng.uniform(-_JITTER, _JITTER, size=2)
    out.append(Scene(shape, colour, background, size, position, style, float(dx), float(dy)))
  return out


def vocabulary() -> tuple[str, ...]:
  """Every word a caption can use (each must be one token of the world's tokenizer)."""
  words = {GENERIC_WORD, "a", "an", "on", "the", "in", "background", *NAMED_SHAPES,
           *COLOUR_NAMES, *SIZES, *POSITIONS}
  for p in PREFIXES:
    words.update(p.split())
  return tuple(sorted(words))


def named_attributes(text: str) -> dict[str, str]:
  """The attributes a caption names, by `ATTRIBUTES` name (the inverse of `describe`).

  "a photo of a small red star on the left on a blue background" ->
  {"size": "small", "colour": "red", "shape": "star", "position": "left",
  "background": "blue"}. "object" names no shape; words outside the world's
  vocabulary (a pseudo-word such as "S*") are ignored.
  """
  text = " ".join(text.lower().split())
  out: dict[str, str] = {}
  background = _BACKGROUND.search(text)
  if background:
    out["background"] = background.group(1)
    text = text[:background.start()] + text[background.end():]
  for position, phrase in _PHRASES.items():
    if phrase in text:
      out["position"] = position
  for word in text.replace(",", " ").split():
    if word in COLOURS:
      out["colour"] = word
    elif word in SIZES:
      out["size"] = word
    elif word in NAMED_SHAPES:
      out["shape"] = word
  return out


CONCEPT_FILE = "concept.json"  # beside a concept folder's images: what they show


def concept_caption(scene: Scene, concept: dict[str, str]) -> str:
  """The caption a user writes for a training image of `concept` ({"shape": ..} or
  {"style": ..}): every other attribute the world has words for named, "{}" for the
  pseudo-word (e.g. "a photo of a small green {} on the left on a purple background")."""
  return describe(scene, prefix="a photo of ", slot="style" if "style" in concept else "shape")


CAPTION_EXTENSION = ".txt"  # kohya's and diffusers' caption files: NN.png's is NN.txt


def write_concept_folder(folder: str, seed: int, count: int, shape: str = HELD_OUT_SHAPE,
                         style: str = "filled", image_size: int = IMAGE_SIZE) -> list[str]:
  """Writes `count` renders of one concept as `00.png ..`, their captions and `concept.json`;
  returns the image paths.

  The images are `concept_scenes(seed, count, shape, style)` (a textual-inversion
  run's training images); beside each, `NN.txt` holds its `concept_caption`, so a
  run with `caption_extension=".txt"` learns only what the captions leave unnamed.
  `concept.json` holds the attributes that make the concept ({"shape": "cross"},
  or {"style": "outlined"} for a style) under "concept", and the seed and count
  that reproduce the folder; the world's evaluation reads it as the ground truth of
  reconstruction.
  """
  os.makedirs(folder, exist_ok=True)
  concept = {"style": style} if style != "filled" else {"shape": shape}
  paths = []
  for i, scene in enumerate(concept_scenes(seed, count, shape, style)):
    path = os.path.join(folder, f"{i:02d}.png")
    Image.fromarray(render(scene, image_size)).save(path)
    with open(os.path.join(folder, f"{i:02d}{CAPTION_EXTENSION}"), "w", encoding="utf-8") as f:
      f.write(concept_caption(scene, concept) + "\n")
    paths.append(path)
  with open(os.path.join(folder, CONCEPT_FILE), "w", encoding="utf-8") as f:
    json.dump({"concept": concept, "seed": seed, "count": count, "shape": shape, "style": style,
               "image_size": image_size}, f, indent=2, sort_keys=True)
    f.write("\n")
  return paths
