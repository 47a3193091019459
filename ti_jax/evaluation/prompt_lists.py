"""Evaluation prompts for the paper's CLIP text-similarity (editability) score.

Every prompt holds the literal placeholder "{}" exactly once, where the
pseudo-word goes: "a photo of {} on the moon" is generated as "a photo of
<my-toy> on the moon" (`with_token`) and compared in CLIP space with "a photo
of on the moon" (`without_token`), the same prompt with the pseudo-word simply
left out, as in Gal et al. (2022).

Because the pseudo-word is dropped without touching the words around it, the
shipped prompts put no article directly before "{}" ("a photo of {}", not "a
photo of a {}"), so the text without it stays a sensible phrase.

Each prompt carries a category so the report can say *what kind* of edit a
concept survives:

* "background": the concept placed in a new scene or setting.
* "style": the concept rendered in another medium or artistic style (for
  style concepts: the learned style combined with another medium).
* "composition": the concept together with other subjects or in an
  arrangement with them.
* "property": an attribute of the concept changed (material, colour, size).

Users can bring their own list with `load_prompt_file`.
"""

from __future__ import annotations

import dataclasses
import re

from ti_jax.runtime import fileio

__all__ = [
    "CATEGORIES",
    "DEFAULT_FILE_CATEGORY",
    "OBJECT_PROMPTS",
    "PLACEHOLDER",
    "RECONSTRUCTION_PROMPTS",
    "STYLE_PROMPTS",
    "EvalPrompt",
    "load_prompt_file",
    "prompts_for",
    "reconstruction_prompt",
    "with_token",
    "without_token",
]

PLACEHOLDER = "{}"

CATEGORIES: tuple[str, ...] = ("background", "style", "composition", "property")

# Category of a line in a user prompt file that names none.
DEFAULT_FILE_CATEGORY = "custom"


@dataclasses.dataclass(frozen=True)
class EvalPrompt:
  """One evaluation prompt.

  Attributes:
    text: the prompt with "{}" once, where the pseudo-word goes.
    category: what the prompt tests, e.g. "background".
  """

  text: str
  category: str


# Prompts for the image-similarity (reconstruction) score: the plainest
# description of the concept, as the paper's "A photo of S*".
RECONSTRUCTION_PROMPTS: dict[str, str] = {
    "object": "a photo of {}",
    "style": "a painting in the style of {}",
}


def prompts_from_pairs(*pairs: tuple[str, str]) -> tuple[EvalPrompt, ...]:
  """`EvalPrompt`s from (category, text) pairs."""
  return tuple(EvalPrompt(text=t, category=c) for c, t in pairs)


# Ordered roughly from easy (a plain change of scene) to hard (the concept has
# to keep its identity while its material, medium or company changes).
OBJECT_PROMPTS: tuple[EvalPrompt, ...] = prompts_from_pairs(
    ("background", "a photo of {} on the moon"),
    ("background", "a photo of {} on a wooden kitchen table"),
    ("background", "a photo of {} on a sandy beach at sunset"),
    ("background", "a photo of {} in a snowy pine forest"),
    ("background", "{} on a rainy city street at night, lit by neon signs"),
    ("background", "{} resting on the sea floor among coral and small fish"),
    ("style", "an oil painting of {}"),
    ("style", "a pencil sketch of {}"),
    ("style", "a watercolor illustration of {} for a children's book"),
    ("style", "a low-poly 3d render of {}"),
    ("style", "a stained glass window showing {}"),
    ("composition", "{} next to a sleeping cat"),
    ("composition", "a teddy bear holding {}"),
    ("composition", "{} and a cup of coffee on a desk"),
    ("composition", "a robot examining {} with a magnifying glass"),
    ("property", "a photo of {} made of solid gold"),
    ("property", "a photo of {} covered in green moss"),
    ("property", "{} knitted from red wool"),
)

# For a style concept the pseudo-word names the style, so the prompts change
# the *content* and keep "in the style of {}".
STYLE_PROMPTS: tuple[EvalPrompt, ...] = prompts_from_pairs(
    ("background", "a lighthouse on a rocky coast in the style of {}"),
    ("background", "a quiet village street in winter in the style of {}"),
    ("background", "a busy train station at rush hour in the style of {}"),
    ("background", "a desert landscape under a starry sky in the style of {}"),
    ("background", "the inside of a cluttered workshop in the style of {}"),
    ("style", "a pencil sketch in the style of {}"),
    ("style", "a mosaic of small tiles in the style of {}"),
    ("style", "a 3d render of a city in the style of {}"),
    ("style", "a woven tapestry in the style of {}"),
    ("composition", "a portrait of an old fisherman in the style of {}"),
    ("composition", "a cat and a dog playing chess in the style of {}"),
    ("composition", "an astronaut riding a horse in the style of {}"),
    ("composition", "a bowl of fruit beside a vase of tulips in the style of {}"),
    ("composition", "children flying kites in a park in the style of {}"),
    ("property", "a black and white painting in the style of {}"),
    ("property", "a tiny painting on a postage stamp in the style of {}"),
    ("property", "a bright neon-colored painting in the style of {}"),
)

_PROMPTS = {"object": OBJECT_PROMPTS, "style": STYLE_PROMPTS}


def _property_key(learnable_property: str) -> str:
  key = str(learnable_property).strip().lower()
  if key not in _PROMPTS:
    raise ValueError(
        f"learnable_property must be 'object' or 'style', got {learnable_property!r}")
  return key


def prompts_for(learnable_property: str) -> list[EvalPrompt]:
  """The shipped evaluation prompts for "object" or "style" concepts."""
  return list(_PROMPTS[_property_key(learnable_property)])


def reconstruction_prompt(learnable_property: str) -> str:
  """The image-similarity prompt for "object" or "style" concepts, with "{}"."""
  return RECONSTRUCTION_PROMPTS[_property_key(learnable_property)]


def _placeholder_problem(template: str) -> str | None:
  """Why `template` is not a valid prompt template, or None if it is."""
  count = template.count(PLACEHOLDER)
  if count != 1:
    return f"must contain '{{}}' exactly once, found it {count} times"
  # A stray brace ("{S}", "{0}") is almost surely a typo for "{}".
  if template.count("{") != 1 or template.count("}") != 1:
    return "has a '{' or '}' besides its one '{}'"
  return None


def with_token(template: str, token: str) -> str:
  """The prompt with the pseudo-word: ("a photo of {}", "<cat>") -> "a photo of <cat>".

  Raises:
    ValueError: `template` does not hold "{}" exactly once.
  """
  problem = _placeholder_problem(template)
  if problem:
    raise ValueError(f"prompt {template!r} {problem}")
  # Plain replacement keeps braces or format codes inside `token` literal.
  return template.replace(PLACEHOLDER, token)


def without_token(template: str) -> str:
  """The prompt with the pseudo-word left out, as the paper's text-similarity target.

  The paper drops ``S*`` and keeps every other word: "A photo of {} on the
  moon" -> "A photo of on the moon". Only whitespace is tidied: runs of spaces
  collapse to one, the ends are stripped, and the space the removal leaves
  before punctuation goes ("a photo of {}, at night" -> "a photo of, at
  night").

  Raises:
    ValueError: `template` does not hold "{}" exactly once.
  """
  problem = _placeholder_problem(template)
  if problem:
    raise ValueError(f"prompt {template!r} {problem}")
  before, after = template.split(PLACEHOLDER)
  text = re.sub(r"\s+", " ", before + " " + after).strip()
  return re.sub(r" (?=[,.;:!?])", "", text)


_CATEGORY_RE = re.compile(r"[A-Za-z0-9_-]+")


def load_prompt_file(path: str) -> list[EvalPrompt]:
  """Reads a user's evaluation prompts.

  Format (UTF-8): one prompt per line, holding "{}" exactly once where the
  pseudo-word goes. A line may start with a category and a TAB
  ("background<TAB>a photo of {} in a cave"); without one the category is
  "custom". Blank lines and lines starting with "#" are skipped.

  Args:
    path: a local path or gs:// URL.

  Returns:
    The prompts, in file order.

  Raises:
    ValueError: one line naming the file and, for a bad prompt, its line
      number: a missing or unreadable file, no prompts, a prompt without "{}"
      or with it twice, an empty prompt or category, a category with spaces or
      punctuation, a duplicate prompt.
  """
  try:
    raw = fileio.read_small_file(path)  # a device or pipe would be read forever
  except FileNotFoundError:
    raise ValueError(f"prompt file {path!r} does not exist") from None
  except OSError as e:
    raise ValueError(f"prompt file {path!r} cannot be read: "
                     f"{e.strerror or type(e).__name__}") from None
  try:
    text = raw.decode("utf-8-sig")  # Tolerates the BOM some editors write.
  except UnicodeDecodeError:
    raise ValueError(f"prompt file {path!r} is not UTF-8 text") from None

  prompts: list[EvalPrompt] = []
  first_seen: dict[str, int] = {}
  for number, line in enumerate(text.splitlines(), start=1):
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
      continue
    where = f"prompt file {path!r} line {number}"
    body = line.rstrip("\r\n")
    # The TAB test looks at the unstripped line: "style<TAB>" and
    # "<TAB>prompt" are mistakes to report, not prompts to guess at.
    if "\t" in body:
      category, prompt = (part.strip() for part in body.split("\t", 1))
      if not category:
        raise ValueError(f"{where}: empty category before the TAB")
      if not _CATEGORY_RE.fullmatch(category):
        raise ValueError(
            f"{where}: category {category!r} may only hold letters, digits, '_' and '-'")
    else:
      category, prompt = DEFAULT_FILE_CATEGORY, stripped
    if not prompt:
      raise ValueError(f"{where}: empty prompt after the category")
    problem = _placeholder_problem(prompt)
    if problem:
      raise ValueError(f"{where}: prompt {prompt!r} {problem}")
    prompt = re.sub(r"\s+", " ", prompt)
    if prompt in first_seen:
      raise ValueError(f"{where}: prompt {prompt!r} repeats line {first_seen[prompt]}")
    first_seen[prompt] = number
    prompts.append(EvalPrompt(text=prompt, category=category))
  if not prompts:
    raise ValueError(f"prompt file {path!r} has no prompts (only blank or '#' lines)")
  return prompts
