"""Validation images during training: the validation prompt rendered with the vectors so far.

`trainer.run` calls `make` once and `write_images` at validation steps. The
prompt names only the vectors active at that step (`train_lib.active_vectors`),
as the training prompts, the checkpoints and the export do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from ti_jax.embeddings import pseudo_words
from ti_jax.runtime import fileio
from ti_jax.training import train_lib


@dataclasses.dataclass
class Validation:
  """What the validation images need besides the step and its vectors.

  `generator` is built on the first call of `write_images` (not at start-up:
  a run that never reaches a validation step compiles no sampler).
  """
  config: Any
  sd: Any  # the loaded Stable Diffusion (weights.loading.StableDiffusion)
  token_ids: list[int]  # token id of each of the num_vectors learned vectors
  devices: Sequence
  out_dir: str
  # The train step's replicated UNet and text-encoder params, reused so that
  # validation adds only the VAE to device memory.
  shared: dict
  generator: Any = None


def make(config, sd, token_ids: list[int], devices: Sequence, workdir: str,
         shared: dict) -> Validation | None:
  """The run's `Validation`, or None when `config.validation_prompt` is empty."""
  if not config.validation_prompt:
    return None
  return Validation(config=config, sd=sd, token_ids=list(token_ids), devices=devices,
                    out_dir=fileio.join(workdir, "validation"), shared=shared)


def is_due(config, step: int) -> bool:
  """Whether `step` gets validation images: every validation_steps and at the last step."""
  return step % config.validation_steps == 0 or step == config.max_train_steps


def prompt(config, step: int) -> str:
  """The validation prompt at `step`: "{}" filled with the tokens of the active vectors."""
  active = train_lib.active_vectors(step, config.num_vectors, config.progressive_words)
  text = config.validation_prompt.replace("{}", config.placeholder_token)
  return pseudo_words.expand_placeholder(text, config.placeholder_token, active)


def write_images(validation: Validation, step: int, learned: np.ndarray) -> None:
  """Writes `validation/step<step>_<i>.png` from the vectors `learned` `[num_vectors, D]`.

  Every process takes part in generating; process 0 writes each batch as it is done.
  """
  from ti_jax.sampling import generation  # pylint: disable=import-outside-toplevel
  c = validation.config
  if validation.generator is None:
    validation.generator = generation.ImageGenerator(
        validation.sd, scheduler=c.validation_scheduler,
        num_inference_steps=c.validation_inference_steps,
        guidance_scale=c.validation_guidance_scale, height=c.resolution, width=c.resolution,
        devices=validation.devices, replicated_params=validation.shared)
  text = prompt(c, step)
  # Every vector is handed over (the prompt names only the active ones), so the
  # sampler's arrays keep one shape and it compiles once for the whole run.
  for start, images in generation.image_batches(
      validation.generator, text, c.num_validation_images, batch_size=c.validation_batch_size,
      seed=c.seed, learned=[(np.asarray(learned), validation.token_ids)]):
    if jax.process_index() != 0:
      continue
    fileio.makedirs(validation.out_dir)
    for i, image in enumerate(images, start):
      generation.save_png(fileio.join(validation.out_dir, f"step{step:06d}_{i}.png"), image,
                          {"prompt": text, "step": str(step), "seed": str(c.seed)})
