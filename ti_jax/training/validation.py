"""Validation images during training: the validation prompts rendered with the vectors so far.

`trainer.run` calls `make` once and `write_images` at validation steps. A
prompt names only the vectors active at that step (`train_lib.active_vectors`),
as the training prompts, the checkpoints and the export do. Image i of every
prompt starts from the noise of (config.seed, i) at every validation step, so
the images of one prompt are comparable over training.

`make` builds the validation sampler from the base model's scheduler config, so
a config that `config.validation_scheduler` cannot sample from is refused at
start-up in one line (`ValidationSchedulerError`), not at the first validation
step. The images only show progress: any exception inside `write_images` is
logged as one warning line and training goes on.

`config.validation_prompt` alone writes `validation/step<step>_<i>.png`; with
`config.validation_prompts` (a tuple, or a file of one prompt per line) each
prompt k gets one grid per validation step, `validation/step<step>_p<k>.png`.
With `config.report_to="tensorboard"` each prompt's grid also goes to
TensorBoard as `validation/p<k>`.

Both take one entry per text encoder of the model (`sd.text_encoders`): `make`
the vectors' ids in each encoder's tokenizer, `write_images` each encoder's
vectors (SDXL: the run's "embeds" and "embeds_2"). SDXL images are sampled as
`ti_jax.sample` samples SDXL (pooled at the real end token, zeros for the empty
negative prompt of force_zeros_for_empty_prompt).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Sequence

import jax
import numpy as np

from ti_jax import errors
from ti_jax.embeddings import pseudo_words
from ti_jax.runtime import console, fileio
from ti_jax.sampling import generation, schedulers
from ti_jax.training import train_lib


class ValidationPromptError(errors.UserError):
  """config.validation_prompts cannot be used (a bad entry, a missing or empty file)."""


class ValidationSchedulerError(errors.UserError):
  """config.validation_scheduler cannot sample from the base model's scheduler config."""


def enabled(config) -> bool:
  """Whether the run renders validation images (any validation prompt is set)."""
  return bool(config.validation_prompt or config.validation_prompts)


def validation_prompts(config) -> list[str]:
  """The run's validation prompts, "{}" not yet filled: validation_prompt (if set) first,
  then config.validation_prompts (its file read now). Raises ValidationPromptError."""
  prompts = [config.validation_prompt] if config.validation_prompt else []
  extra = config.validation_prompts
  if isinstance(extra, str):
    return prompts + (_read_prompts_file(extra) if extra else [])
  if not isinstance(extra, (tuple, list)):
    raise ValidationPromptError(
        f"config.validation_prompts must be a tuple of prompts or a file name, got {extra!r}")
  for i, text in enumerate(extra):
    if not isinstance(text, str) or not text.strip():
      raise ValidationPromptError(
          f"config.validation_prompts[{i}] must be a non-empty prompt, got {text!r}")
  return prompts + list(extra)


def check_scheduler(config, sd) -> None:
  """Builds the validation sampler from `sd.scheduler_config` (host-side tables only, nothing
  compiles) and raises `ValidationSchedulerError`, one line, if it cannot be built."""
  try:
    schedulers.make_sampler(config.validation_scheduler, sd.scheduler_config,
                            config.validation_inference_steps)
  except ValueError as e:
    refusal = schedulers.sampler_refusal(e, sd.scheduler_config,
                                         config.validation_inference_steps,
                                         "config.validation_scheduler")
    raise ValidationSchedulerError(
        f"config.validation_scheduler={config.validation_scheduler!r} with "
        f"validation_inference_steps={config.validation_inference_steps} cannot sample "
        f"{sd.path}: {refusal}") from None


def _read_prompts_file(path: str) -> list[str]:
  """The non-blank lines of the UTF-8 file `path`, stripped (the reader of sample's
  --prompts_file, so both refuse the same files in the same words)."""
  try:
    prompts = fileio.read_text_lines(path, "config.validation_prompts")
  except ValueError as e:
    hint = ("" if fileio.exists(path) else
            " (a string names a file of prompts, one per line; several prompts: ('a {}', 'b {}'))")
    raise ValidationPromptError(f"{e}{hint}") from None
  if not prompts:
    raise ValidationPromptError(f"config.validation_prompts {path} holds no prompt")
  return prompts


@dataclasses.dataclass
class Validation:
  """What the validation images need besides the step and its vectors.

  `generator` is built on the first call of `write_images` (not at start-up:
  a run that never reaches a validation step compiles no sampler).
  """
  config: Any
  sd: Any  # the loaded Stable Diffusion (weights.pipeline.StableDiffusion)
  # Per text encoder (sd.text_encoders' order): the num_vectors learned vectors' token ids.
  token_ids: tuple[list[int], ...]
  devices: Sequence
  out_dir: str
  # The train step's replicated UNet and text-encoder params, reused so that
  # validation adds only the VAE to device memory.
  shared: dict
  prompts: list[str] = dataclasses.field(default_factory=list)  # "{}" not yet filled
  grids: bool = False  # validation_prompts set: a grid per prompt, else one PNG per image
  # Before each TensorBoard tag ("validation/p<k>"): a run of many concepts gives each its
  # own, "<concept>/".
  tag_prefix: str = ""
  generator: Any = None


def make(config, sd, token_ids: Sequence[Sequence[int]], devices: Sequence, workdir: str,
         shared: dict, tag_prefix: str = "") -> Validation | None:
  """The run's `Validation`, or None when no validation prompt is set.

  Every tokenizer of `sd.text_encoders` must hold the placeholder tokens; `token_ids`
  are their ids in each (one list per text encoder). `shared` may lack a text
  encoder's params; the generator replicates it.
  Raises `ValidationSchedulerError` when the validation sampler cannot use the
  model's scheduler config (`check_scheduler`).
  """
  if not enabled(config):
    return None
  if len(token_ids) != len(sd.text_encoders):
    raise ValueError(f"validation takes one list of token ids per text encoder; the model "
                     f"has {len(sd.text_encoders)}, got {len(token_ids)}")
  check_scheduler(config, sd)  # now, not at the first validation step, many steps in
  return Validation(config=config, sd=sd, token_ids=tuple(list(ids) for ids in token_ids),
                    devices=devices, out_dir=fileio.join(workdir, "validation"), shared=shared,
                    prompts=validation_prompts(config), grids=bool(config.validation_prompts),
                    tag_prefix=tag_prefix)


def is_due(config, step: int) -> bool:
  """Whether `step` gets validation images: every validation_steps and at the last step."""
  return step % config.validation_steps == 0 or step == config.max_train_steps


def prompt(config, step: int, text: str | None = None) -> str:
  """Validation prompt `text` (default: config.validation_prompt) at `step`: "{}" filled
  with the tokens of the active vectors."""
  active = train_lib.active_vectors(step, config.num_vectors, config.progressive_words)
  text = config.validation_prompt if text is None else text
  text = text.replace("{}", config.placeholder_token)
  return pseudo_words.expand_placeholder(text, config.placeholder_token, active)


def write_images(validation: Validation, step: int, learned: Sequence[np.ndarray],
                 tb=None) -> bool:
  """Renders every validation prompt with the vectors `learned`, one `[num_vectors, D]` per
  text encoder (SDXL: the first's, then the second's `[num_vectors, D2]`); True when done.

  Every process takes part in generating; process 0 writes the PNGs and, if `tb`
  (a `tensorboard.Writer`) is given, each prompt's grid as TensorBoard image `validation/p<k>`.
  Any exception (device out of memory, an unwritable PNG, ...) is logged as one warning
  line and False is returned: the images only show progress, so a failure must not
  end the run and lose the steps since the last checkpoint.
  """
  try:
    _write_all(validation, step, learned, tb)
  except Exception as e:  # pylint: disable=broad-except
    _warn(f"warning: no validation images at step {step}, training goes on: "
          f"{console.one_line(e, limit=300)}")
    return False
  return True


def _warn(message: str) -> None:
  """One line on stderr: process 0's through `console.log`; another process's prefixed with its
  index (`console.log` keeps only process 0's, and a failure may be another process's alone)."""
  if jax.process_index() == 0:
    console.log(message)
  else:
    print(f"process {jax.process_index()}: {message}", file=sys.stderr, flush=True)


def _write_all(validation: Validation, step: int, learned: Sequence[np.ndarray], tb) -> None:
  """`write_images` without its guard: every prompt's images, PNGs and TensorBoard grids."""
  c = validation.config
  if validation.generator is None:
    validation.generator = generation.ImageGenerator(
        validation.sd, scheduler=c.validation_scheduler,
        num_inference_steps=c.validation_inference_steps,
        guidance_scale=c.validation_guidance_scale, height=c.resolution, width=c.resolution,
        devices=validation.devices, replicated_params=validation.shared)
  for k, raw in enumerate(validation.prompts):
    text = prompt(c, step, raw)
    images = _prompt_images(validation, step, text, learned)  # [n, H, W, 3] on proc 0
    if jax.process_index() != 0:
      continue
    grid = generation.image_grid(images)
    info = {"prompt": text, "step": str(step), "seed": str(c.seed)}
    if validation.grids:
      fileio.makedirs(validation.out_dir)
      generation.save_png(fileio.join(validation.out_dir, f"step{step:06d}_p{k}.png"), grid, info)
    if tb is not None:
      tb.image(step, f"{validation.tag_prefix}validation/p{k}", grid)
      tb.text(step, f"{validation.tag_prefix}validation/p{k}_prompt", text)


def _prompt_images(validation: Validation, step: int, text: str, learned: Sequence[np.ndarray]):
  """The num_validation_images of `text` (uint8 `[n, H, W, 3]` on process 0, else None);
  without grids, process 0 also writes each as `validation/step<step>_<i>.png`."""
  c = validation.config
  batches = []
  if len(learned) != len(validation.token_ids):
    raise ValueError(f"validation needs the vectors of each of the {len(validation.token_ids)} "
                     f"text encoders, got {len(learned)}")
  # One (vectors [k, D_e], their ids in encoder e's tokenizer) per text encoder.
  per_encoder = tuple((np.asarray(vectors), ids)
                      for vectors, ids in zip(learned, validation.token_ids))
  # Every vector is handed over (the prompt names only the active ones), so the
  # sampler's arrays keep one shape and it compiles once for the whole run.
  for start, images in generation.image_batches(
      validation.generator, text, c.num_validation_images, batch_size=c.validation_batch_size,
      seed=c.seed, learned=per_encoder):
    if jax.process_index() != 0:
      continue
    batches.append(images)
    if validation.grids:
      continue
    fileio.makedirs(validation.out_dir)
    for i, image in enumerate(images, start):
      generation.save_png(fileio.join(validation.out_dir, f"step{step:06d}_{i}.png"), image,
                          {"prompt": text, "step": str(step), "seed": str(c.seed)})
  return np.concatenate(batches) if batches else None
