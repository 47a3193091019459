"""The world's evaluation: the checker stands in for CLIP (`ti_jax.world.checker`).

For a base model of the procedural world (`ti_jax.world`), whose folder
carries a trained attribute classifier beside its weights, both of the paper's
measurements become exact shares instead of CLIP cosines:

* reconstruction: the share of "a photo of S*" samples that the checker
  recognises as the concept (e.g. {"shape": "cross"});
* editability: per edit prompt ("a photo of S* on a green background"), the
  share of its samples that show the concept *and* every attribute the prompt
  names (`scenes.named_attributes` of the prompt without S*); the overall
  score is the mean over the prompts;
* edit fidelity: the same shares without the concept (the share of samples
  that show what the prompt names, whatever they draw for S*), the mean over
  the prompts. It is the counterpart of the paper's text similarity, which
  scores each image against its prompt with S* left out: a word that ignores the concept
  scores high on it, a word that overrides the prompt scores low.

The prompts here use only words the world's tokenizer has as one token: the
caption vocabulary (`scenes.vocabulary()`) and the textual-inversion template
words ("style", "drawing", ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from ti_jax.evaluation import prompt_lists
from ti_jax.evaluation.prompt_lists import EvalPrompt
from ti_jax.runtime import fileio
from ti_jax.world import checker as checker_lib
from ti_jax.world import scenes

__all__ = [
    "CATEGORIES", "OBJECT_PROMPTS", "STYLE_PROMPTS", "has_checker", "is_style",
    "prompt_share", "prompts_for", "read_concept_file", "reconstruction_prompt", "report",
]

# What an edit prompt changes: the scene behind the concept, the concept's own
# colour/size/place, or several of them at once.
CATEGORIES: tuple[str, ...] = ("background", "colour", "size", "position", "combination")


# "{}" is the object (the pseudo-word, or the initializer word for a baseline).
OBJECT_PROMPTS: tuple[EvalPrompt, ...] = prompt_lists.prompts_from_pairs(
    ("background", "a photo of {} on a green background"),
    ("background", "a photo of {} on a white background"),
    ("colour", "a photo of a red {}"),
    ("colour", "a photo of a blue {}"),
    ("size", "a photo of a small {}"),
    ("size", "a photo of a large {}"),
    ("position", "a photo of {} on the left"),
    ("position", "a photo of {} on the right"),
    ("combination", "a photo of a small {} on the right"),
    ("combination", "a photo of a yellow {} on a purple background"),
)

# "{}" is a drawing style: the prompts pick the content and keep the style.
STYLE_PROMPTS: tuple[EvalPrompt, ...] = prompt_lists.prompts_from_pairs(
    ("colour", "a red star in the style of {}"),
    ("colour", "a blue circle in the style of {}"),
    ("background", "a square on a green background in the style of {}"),
    ("background", "a triangle on a black background in the style of {}"),
    ("size", "a large diamond in the style of {}"),
    ("position", "a circle on the left in the style of {}"),
    ("combination", "a small square on a blue background in the style of {}"),
    ("combination", "a large yellow star on the right in the style of {}"),
)

_RECONSTRUCTION = {"object": "a photo of {}", "style": "a drawing of an object in the style of {}"}


def is_style(concept: Mapping[str, str]) -> bool:
  """Whether the concept is a drawing style ({"style": "outlined"}) rather than an object."""
  return "style" in concept


def prompts_for(concept: Mapping[str, str]) -> list[EvalPrompt]:
  """The world's edit prompts for an object or a style concept."""
  return list(STYLE_PROMPTS if is_style(concept) else OBJECT_PROMPTS)


def reconstruction_prompt(concept: Mapping[str, str]) -> str:
  """The reconstruction prompt, with "{}": the plainest picture of the concept."""
  return _RECONSTRUCTION["style" if is_style(concept) else "object"]


def has_checker(model_dir: str) -> bool:
  """Whether a local model folder carries a world checker (checker.json and its weights)."""
  return all(os.path.isfile(os.path.join(model_dir, name))
             for name in (checker_lib.CONFIG_FILE, checker_lib.WEIGHTS_FILE))


def read_concept_file(folder: str) -> dict[str, str] | None:
  """The "concept" entry of `folder`'s concept.json (`scenes.write_concept_folder`), or None.

  Raises:
    checker.CheckerError: the file is there but unreadable, or names no valid attribute.
  """
  path = os.path.join(folder, scenes.CONCEPT_FILE)
  if not os.path.isfile(path):
    return None
  try:
    concept = json.loads(fileio.read_small_file(path).decode("utf-8"))["concept"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise checker_lib.CheckerError(f"{path}: no readable \"concept\" entry "
                                   f"({type(e).__name__})") from None
  if not isinstance(concept, Mapping) or not concept:
    raise checker_lib.CheckerError(f"{path}: \"concept\" must be an attribute mapping, "
                                   f"e.g. {{\"shape\": \"cross\"}}")
  return checker_lib.parse_attributes(concept)


def edit_attributes(template: str) -> dict[str, str]:
  """The attributes an edit prompt asks for, read from its text without the pseudo-word."""
  return scenes.named_attributes(prompt_lists.without_token(template))


def prompt_share(checker, images: np.ndarray, concept: Mapping[str, str],
                 template: str) -> dict:
  """One edit prompt's score: the share of `images` showing the concept and every named edit.

  The concept and the edit are checked separately and both must hold, so a
  prompt that asks for another value of the concept's own attribute ("a
  photo of a star" for a cross) scores 0 rather than replacing the concept.

  Returns:
    {"template", "edit" (the named attributes), "share", "concept_share",
    "edit_share", "num_images"}.
  """
  edit = edit_attributes(template)
  predicted = checker.predict(images)  # one pass of the checker for both questions
  concept_ok = checker_lib.matches(predicted, concept)  # [N] bool
  edit_ok = checker_lib.matches(predicted, edit)
  return {"template": template, "edit": edit, "share": float((concept_ok & edit_ok).mean()),
          "concept_share": float(concept_ok.mean()), "edit_share": float(edit_ok.mean()),
          "num_images": int(len(images))}


def report(checker, concept: Mapping[str, str], recon_images: np.ndarray,
           generated: Sequence[tuple[EvalPrompt, np.ndarray]], extra: dict | None = None) -> dict:
  """A run's checker scores: reconstruction, editability and edit fidelity (means over prompts).

  Args:
    checker: the model folder's `checker.Checker`.
    concept: the ground truth, e.g. {"shape": "cross"}.
    recon_images: uint8 [N, 32, 32, 3] samples of the reconstruction prompt.
    generated: (prompt, uint8 [N, 32, 32, 3] samples) per edit prompt.
    extra: more fields for the report (label, workdir, ...).
  """
  prompts = []
  for p, images in generated:
    prompts.append({**prompt_share(checker, images, concept, p.text), "category": p.category})
  by_category: dict[str, list[float]] = {}
  for p in prompts:
    by_category.setdefault(p["category"], []).append(p["share"])
  return {
      **(extra or {}),
      "scorer": "checker",
      "concept": dict(concept),
      "reconstruction": checker_lib.reconstruction(checker, recon_images, concept),
      "editability": float(np.mean([p["share"] for p in prompts])) if prompts else float("nan"),
      "editability_by_category": {k: float(np.mean(v)) for k, v in by_category.items()},
      "edit_fidelity": (float(np.mean([p["edit_share"] for p in prompts])) if prompts
                        else float("nan")),
      "num_prompts": len(prompts),
      "prompts": prompts,
  }
