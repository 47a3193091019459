"""The world's stand-in for CLIP: a small CNN that names a render's attributes.

Trained on ground-truth renders of `ti_jax.world.scenes` (fresh renders every
step, some blurred, all with light noise, so the soft-edged, grainy images a
small latent diffusion model decodes still read right), it predicts every attribute of `scenes.ATTRIBUTES` (shape, colour,
background, size, position, style). The paper's two measurements become
exact shares:

* `reconstruction(checker, images, concept)`: the share of images that show
  the concept (e.g. {"shape": "cross"});
* `editability(checker, images, concept, attribute)`: the share that show the
  concept and the edit (e.g. {"background": "green"}).

Saved as `checker.safetensors` (the params, keys joined with "/") and
`checker.json` (the architecture, the attribute classes and how it was trained).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ti_jax import errors
from ti_jax.weights import safetensors_io
from ti_jax.world import scenes

WEIGHTS_FILE = "checker.safetensors"
CONFIG_FILE = "checker.json"
# The shipped checker: `train_checker()` with its defaults (2500 steps, 522 s on a loaded 2-core
# CPU). Accuracy 1.0 on every attribute of 2000 fresh renders; on tiny-world VAE reconstructions
# of 300 renders: shape 0.96 (star 0.85, cross 0.94), the others >= 0.99.
# It ships inside the tiny-world model folder it scores (ti_jax/world/assets/tiny-world),
# and every model folder `ti_jax.train_world` writes carries a copy.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-world")
_NOISE_STD = 0.06  # training augmentation, in [-1, 1] pixel units
# Training blurs two thirds of the renders (Gaussian, one of these sigmas in pixels): decoded
# samples of a small latent space are soft-edged, and a checker that only saw sharp renders
# misreads a soft cross or star.
_BLUR_SIGMAS = (0.8, 1.3)


def _blur(images: jax.Array, sigma: float) -> jax.Array:
  """Gaussian blur of [B, H, W, C] images (separable 5-tap kernel, edge padding)."""
  taps = jnp.exp(-0.5 * (jnp.arange(-2, 3) / sigma) ** 2)
  taps = taps / taps.sum()  # [5]
  x = jnp.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
  x = sum(taps[i] * x[:, i:i + images.shape[1]] for i in range(5))  # along H
  return sum(taps[i] * x[:, :, i:i + images.shape[2]] for i in range(5))  # along W


def augment(images: jax.Array, key: jax.Array) -> jax.Array:
  """Each image kept sharp or blurred (equal odds per choice), plus pixel noise."""
  k_choice, k_noise = jax.random.split(key)
  versions = jnp.stack([images] + [_blur(images, s) for s in _BLUR_SIGMAS])  # [3, B, H, W, C]
  choice = jax.random.randint(k_choice, (images.shape[0],), 0, len(versions))  # [B]
  picked = versions[choice, jnp.arange(images.shape[0])]
  return picked + _NOISE_STD * jax.random.normal(k_noise, images.shape)


class CheckerError(errors.UserError):
  """A checker folder is missing or unreadable, or a concept names no attribute value."""


class AttributeNet(nn.Module):
  """`images [B, 32, 32, 3] in [-1, 1] -> {attribute: logits [B, classes]}`."""
  attributes: tuple[tuple[str, int], ...]  # (name, number of classes), in order
  width: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    for i, mult in enumerate((1, 2, 2)):
      x = nn.Conv(self.width * mult, (3, 3), name=f"conv_{i}")(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), (2, 2))  # 32 -> 16 -> 8 -> 4
    # Flattened, not pooled: position is an attribute, so where matters.
    x = x.reshape(x.shape[0], -1)  # [B, 4 * 4 * 2 * width]
    x = nn.relu(nn.Dense(128, name="hidden")(x))
    return {name: nn.Dense(n, name=f"head_{name}")(x) for name, n in self.attributes}


@dataclasses.dataclass
class Checker:
  """A trained attribute classifier: its module, params and metadata (`checker.json`)."""
  module: AttributeNet
  params: Any
  info: dict

  def predict(self, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Images (uint8 [N, 32, 32, 3], or float in [-1, 1]) -> attribute name -> int [N] classes."""
    out: dict[str, list[np.ndarray]] = {name: [] for name, _ in self.module.attributes}
    for i in range(0, len(images), batch_size):
      logits = _apply(self.module, self.params, to_model_range(images[i:i + batch_size]))
      for name, parts in out.items():
        parts.append(np.asarray(jnp.argmax(logits[name], -1)))
    return {name: np.concatenate(v) for name, v in out.items()}

  def names(self, images: np.ndarray) -> list[dict[str, str]]:
    """Per image, every attribute's predicted value by name."""
    pred = self.predict(images)
    return [{k: scenes.ATTRIBUTES[k][v[i]] for k, v in pred.items()} for i in range(len(images))]


def _apply(module: AttributeNet, params: Any, images: jax.Array) -> dict[str, jax.Array]:
  return _jitted_apply(module)(params, images)


_APPLY_CACHE: dict[AttributeNet, Any] = {}


def _jitted_apply(module: AttributeNet):
  """One compiled forward per architecture (modules are hashable dataclasses)."""
  if module not in _APPLY_CACHE:
    _APPLY_CACHE[module] = jax.jit(module.apply)
  return _APPLY_CACHE[module]


def to_model_range(images: np.ndarray) -> jax.Array:
  """uint8 [0, 255] images to float32 [-1, 1]; float images are taken as already in [-1, 1]."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  return jnp.asarray(images, jnp.float32)


def _attributes() -> tuple[tuple[str, int], ...]:
  return tuple((name, len(values)) for name, values in scenes.ATTRIBUTES.items())


def train_checker(seed: int = 0, steps: int = 600, batch_size: int = 64,
                  learning_rate: float = 2e-3, width: int = 32,
                  world_seed: int = 1_000_003) -> Checker:
  """Trains the classifier on fresh renders of world `world_seed` (deterministic).

  Step i sees scenes `i * batch_size ..` of that world, so no render repeats;
  the world seed differs from the base model's and from the evaluation's.
  """
  module = AttributeNet(_attributes(), width)
  params = module.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))["params"]
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels, key):
    images = augment(images, key)

    def loss_fn(p):
      logits = module.apply({"params": p}, images)
      return sum(optax.softmax_cross_entropy_with_integer_labels(logits[k], labels[k]).mean()
                 for k in logits)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.key(seed + 1)
  loss = float("nan")
  for i in range(steps):
    images, _, labels = scenes.batch(world_seed, i * batch_size, batch_size)
    params, opt_state, loss = step(params, opt_state, to_model_range(images),
                                   {k: jnp.asarray(v) for k, v in labels.items()},
                                   jax.random.fold_in(key, i))
  info = {"attributes": {k: list(v) for k, v in scenes.ATTRIBUTES.items()}, "width": width,
          "train": {"seed": seed, "world_seed": world_seed, "steps": steps,
                    "batch_size": batch_size, "learning_rate": learning_rate,
                    "final_loss": float(loss)}}
  return Checker(module, {"params": params}, info)


def accuracy(checker: Checker, seed: int, count: int = 1000) -> dict[str, float]:
  """Per attribute, the share of fresh renders of world `seed` the checker names right."""
  images, _, labels = scenes.batch(seed, 0, count)
  pred = checker.predict(images)
  return {k: float((pred[k] == labels[k]).mean()) for k in pred}


def save(checker: Checker, folder: str) -> None:
  """Writes `checker.safetensors` and `checker.json` into `folder` (created)."""
  os.makedirs(folder, exist_ok=True)
  flat = {"/".join(k.key for k in path): np.asarray(v, np.float32)
          for path, v in jax.tree_util.tree_flatten_with_path(checker.params["params"])[0]}
  safetensors_io.save(os.path.join(folder, WEIGHTS_FILE), flat)
  with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(checker.info, f, indent=2, sort_keys=True)
    f.write("\n")


def load(folder: str) -> Checker:
  """Reads a checker written by `save` (one-line `CheckerError` if missing or unreadable)."""
  weights, config = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, CONFIG_FILE)
  if not (os.path.isfile(weights) and os.path.isfile(config)):
    raise CheckerError(f"no world checker in {folder} (expected {WEIGHTS_FILE} and {CONFIG_FILE})")
  with open(config, encoding="utf-8") as f:
    info = json.load(f)
  if info.get("attributes") != {k: list(v) for k, v in scenes.ATTRIBUTES.items()}:
    raise CheckerError(f"{config} was trained on other attributes than this world's")
  tree: dict = {}
  for key, value in safetensors_io.load(weights).items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(value)
  return Checker(AttributeNet(_attributes(), info["width"]), {"params": tree}, info)


def load_shipped() -> Checker:
  """The checker shipped with ti_jax (`SHIPPED_DIR`)."""
  return load(SHIPPED_DIR)


def parse_attributes(spec: Mapping[str, str] | str) -> dict[str, str]:
  """{"shape": "cross"} as is; a string is "name=value,..." or a value unique to one attribute.

  E.g. "cross" -> {"shape": "cross"}, "outlined" -> {"style": "outlined"},
  "background=green" -> {"background": "green"}.
  """
  if isinstance(spec, Mapping):
    out = dict(spec)
  else:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
      if "=" in part:
        name, value = (s.strip() for s in part.split("=", 1))
      else:
        owners = [k for k, v in scenes.ATTRIBUTES.items() if part in v]
        if len(owners) != 1:
          what = "the value of several attributes" if owners else "no attribute value"
          raise CheckerError(f"{part!r} is {what}; write name=value "
                             f"(attributes: {', '.join(scenes.ATTRIBUTES)})")
        name, value = owners[0], part
      out[name] = value
  for name, value in out.items():
    if name not in scenes.ATTRIBUTES or value not in scenes.ATTRIBUTES[name]:
      known = "; ".join(f"{k}: {'/'.join(v)}" for k, v in scenes.ATTRIBUTES.items())
      raise CheckerError(f"unknown attribute {name}={value} ({known})")
  return out


def shows(checker: Checker, images: np.ndarray, attributes: Mapping[str, str] | str) -> np.ndarray:
  """bool [N]: whether each image shows every one of `attributes` (per the checker)."""
  return matches(checker.predict(images), attributes)


def matches(predicted: Mapping[str, np.ndarray], attributes: Mapping[str, str] | str) -> np.ndarray:
  """bool [N]: whether each image's predicted classes (`Checker.predict`) are all of `attributes`.

  No attribute at all holds for every image.
  """
  want = parse_attributes(attributes)
  ok = np.ones(len(next(iter(predicted.values()))), bool)
  for name, value in want.items():
    ok &= predicted[name] == scenes.ATTRIBUTES[name].index(value)
  return ok


def reconstruction(checker: Checker, images: np.ndarray, concept: Mapping[str, str] | str) -> float:
  """Share of `images` (e.g. samples of "a photo of S*") recognised as the concept."""
  return float(shows(checker, images, concept).mean())


def editability(checker: Checker, images: np.ndarray, concept: Mapping[str, str] | str,
                attribute: Mapping[str, str] | str) -> float:
  """Share of `images` (samples of "S* with attribute A") that show both the concept and A."""
  both = {**parse_attributes(concept), **parse_attributes(attribute)}
  return float(shows(checker, images, both).mean())
