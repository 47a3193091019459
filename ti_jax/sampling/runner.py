"""Sampling with learned pseudo-words: `run(prompts=..., workdir=...)` for `ti_jax.sample`.

Gathers the concepts (run directories and embedding files, `concepts`), checks
they fit the base model, tokenizes them into a tokenizer of their own, and
writes each image as a PNG with its prompt, seed, steps and scheduler in the
text chunk, plus a grid per prompt.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Sequence

import jax
import numpy as np

from ti_jax.runtime import console, fileio, parallel
from ti_jax.sampling import flow_match, flux_generation, generation, noise_schedule, schedulers

from ti_jax.sampling.concepts import (
  SampleError,
  concepts_folder,
  describe_concepts,
  gather_concepts,
  load_base_model,
  prepare_prompt,
  tokenizers_with_concepts,
)
from ti_jax.sampling.generation import slug

_log = console.log


# The per-prompt grid tiles the first GRID_MAX images (a 100000-image run's grid
# would not fit in memory, nor be viewable).
GRID_MAX = 64


# Largest image side: the VAE decoder holds 128 x H x W float32 activations per image
# in its last blocks (2 GiB at 2048 px), and Stable Diffusion models are trained at
# 512-1024 px (the same bound as training's resolution).
MAX_IMAGE_SIZE = 2048
# The sampler `run` uses unless told (FLUX.1 has its own: `flux_generation`).
_DEFAULT_SCHEDULER = "ddim"


def _check_request(*, prompts, num_images: int, num_inference_steps: int, batch_size: int,
                   seed: int, height: int, width: int, guidance_scale: float, scheduler: str,
                   cache_dir: str, guidance_rescale: float = 0.0) -> None:
  """Refuses bad sampling arguments with a one-line `SampleError`, before anything loads."""
  if not prompts:
    raise SampleError("no prompt: pass --prompt (repeatable) or --prompts_file")
  if num_images < 1 or (num_inference_steps is not None and num_inference_steps < 1):
    raise SampleError("num_images and num_inference_steps must be >= 1")
  if batch_size < 0:
    raise SampleError("batch_size must be >= 1 (or 0: chosen to fit device memory)")
  if not 0 <= seed < 2**32:
    raise SampleError(f"seed must be in [0, 2**32), got {seed}")
  for name, value in (("height", height), ("width", width)):
    if value < 0:
      raise SampleError(f"{name} must be > 0 (or 0 for the run's resolution), got {value}")
    if value > MAX_IMAGE_SIZE:
      raise SampleError(f"{name} {value} is above the limit of {MAX_IMAGE_SIZE} px: the VAE "
                        "decoder's activations alone would need 2 GiB or more per image, and "
                        "Stable Diffusion models are trained at 512-1024 px")
  if guidance_scale is not None and not math.isfinite(guidance_scale):
    raise SampleError(f"guidance_scale must be a finite number, got {guidance_scale}")
  if not 0.0 <= guidance_rescale <= 1.0:  # also refuses NaN
    raise SampleError(f"guidance_rescale must be in [0, 1] (0: off), got {guidance_rescale}")
  try:
    schedulers.check_sampler_name(scheduler)  # the name, before loading anything
  except ValueError as e:
    raise SampleError(str(e)) from None
  if cache_dir and os.path.exists(os.path.expanduser(cache_dir)) and not os.path.isdir(
      os.path.expanduser(cache_dir)):
    raise SampleError(f"--cache_dir {cache_dir} is a file, not a folder")


def model_defaults(sd, num_inference_steps: int | None,
                   guidance_scale: float | None) -> tuple[int, float]:
  """(steps, guidance) with None replaced by the model's defaults, as diffusers' pipelines have
  them: 50 steps and classifier-free guidance 7.5; FLUX.1-dev 28 steps and guidance embedding
  3.5, FLUX.1-schnell (no guidance embedding) 4 steps."""
  if sd.is_flux:
    dev = sd.transformer.config.guidance_embeds
    steps, guidance = (28 if dev else 4), flow_match.DEFAULT_GUIDANCE_SCALE
  else:
    steps, guidance = 50, 7.5
  return (steps if num_inference_steps is None else num_inference_steps,
          guidance if guidance_scale is None else guidance_scale)


def _flux_generator(sd, *, negative_prompt: str, guidance_rescale: float, scheduler: str,
                    **kw) -> flux_generation.FluxImageGenerator:
  """The FLUX.1 generator of a sampling request (`kw`: steps, guidance, size, devices);
  a ValueError for what FLUX.1 sampling has not: classifier-free guidance's negative prompt
  and rescale. `guidance_scale` is the guidance embedding's value (dev)."""
  if negative_prompt or guidance_rescale:
    raise ValueError("FLUX.1 samples without classifier-free guidance: pass no "
                     "negative_prompt or guidance_rescale")
  if scheduler != _DEFAULT_SCHEDULER:
    _log(f"FLUX.1 samples with its flow-matching Euler sampler; scheduler {scheduler} is not used")
  return flux_generation.FluxImageGenerator(sd, **kw)


def run(*, prompts: Sequence[str], workdir: str | None = None, step: int | None = None,
        embedding_sources: Sequence[str] = (), pretrained_model_name_or_path: str = "",
        negative_prompt: str = "", num_images: int = 4, num_inference_steps: int | None = None,
        guidance_scale: float | None = None, scheduler: str = _DEFAULT_SCHEDULER, seed: int = 0,
        height: int = 0, width: int = 0, output_dir: str = "", dtype: str = "auto",
        batch_size: int = 0, allow_base_model_mismatch: bool = False,
        cache_dir: str = "", allow_pickle: bool = False,
        devices: Sequence | None = None, guidance_rescale: float = 0.0,
        concept: Sequence[str] = ()) -> list[str]:
  """Generates `num_images` per prompt; returns the written PNG paths.

  `batch_size` images per device per compiled call (0: `generation.auto_batch_size`);
  PNGs are written as each call finishes. `height`/`width` 0: the run's resolution,
  else the model's native size (the UNet's sample_size times the VAE's factor:
  512 for SD 1.x, 1024 for SDXL base). SDXL concepts go into copies of both
  tokenizers; `guidance_rescale` (0: off) applies to every model family.
  `concept`: for a many-concept `workdir`, the `--concept` values naming the
  concepts to use (names, comma lists or `all`); the PNGs then go by default to
  WORKDIR/<name>/samples for one concept, WORKDIR/samples for several.
  `num_inference_steps`, `guidance_scale` None: the model's defaults (`model_defaults`).
  """
  _check_request(prompts=prompts, num_images=num_images,
                 num_inference_steps=num_inference_steps, batch_size=batch_size, seed=seed,
                 height=height, width=width, guidance_scale=guidance_scale, scheduler=scheduler,
                 cache_dir=cache_dir, guidance_rescale=guidance_rescale)
  concepts, run_meta = gather_concepts(workdir, step, embedding_sources, concept)
  for line in describe_concepts(concepts):  # which token each --embeddings source registered
    _log(line)
  run_config, ckpt_step = run_meta.get("config", {}), run_meta.get("step")
  devices = list(devices) if devices is not None else parallel.all_devices()
  is_main = jax.process_index() == 0
  sd, model_id = load_base_model(
      concepts, run_config, override=pretrained_model_name_or_path, dtype=dtype,
      platform=devices[0].platform, allow_pickle=allow_pickle, cache_dir=cache_dir,
      allow_base_model_mismatch=allow_base_model_mismatch, allow_flux=True)
  vocab = tokenizers_with_concepts(sd, concepts)  # tokenizer(s) and learned vectors
  tokenizer = vocab["tokenizers"][0]  # the truncation warning counts the first's ids
  num_inference_steps, guidance_scale = model_defaults(sd, num_inference_steps, guidance_scale)
  factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
  native = run_config.get("resolution") or (
      flux_generation.native_size(sd) if sd.is_flux else sd.unet.config.sample_size * factor)
  height, width = height or native, width or native
  try:
    if sd.is_flux:  # FLUX.1: its own flow-matching program (flux_generation)
      generator = _flux_generator(sd, num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, height=height, width=width,
                                  devices=devices, negative_prompt=negative_prompt,
                                  guidance_rescale=guidance_rescale, scheduler=scheduler)
      scheduler = flux_generation.SAMPLER_NAME  # what the PNGs record
    else:
      generator = generation.ImageGenerator(
          sd, scheduler=scheduler, num_inference_steps=num_inference_steps,
          guidance_scale=guidance_scale, height=height, width=width, devices=devices,
          guidance_rescale=guidance_rescale)
  except noise_schedule.SchedulerConfigError as e:
    raise SampleError(schedulers.sampler_refusal(e, sd.scheduler_config, num_inference_steps,
                                                 "--scheduler")) from None
  except ValueError as e:
    raise SampleError(str(e)) from None
  out_dir = output_dir or (fileio.join(concepts_folder(workdir, run_meta), "samples")
                           if workdir else "samples")
  generation.make_output_dir(out_dir, SampleError)
  written = []
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=len(prompts) * num_images, desc="sample", unit="img", file=sys.stderr,
             disable=not is_main)
  batch_size = batch_size or generation.auto_batch_size(generator, num_images)
  for p_index, raw_prompt in enumerate(prompts):
    prompt, warnings = prepare_prompt(raw_prompt, concepts, tokenizer)
    for w in warnings:
      _log(f"warning: {w}")
    # The checkpoint step is in the name, so sampling another checkpoint adds files.
    step_part = f"_step{ckpt_step}" if ckpt_step is not None else ""
    stem = f"{p_index:03d}_{slug(raw_prompt)}{step_part}"
    # Each batch is written as soon as it is decoded, so a long run keeps what it
    # finished and holds one batch (plus the grid's first GRID_MAX images) in memory.
    grid = []
    for start, images in generation.image_batches(
        generator, prompt, num_images, batch_size=batch_size, seed=seed,
        negative_prompt=negative_prompt, **vocab):
      bar.update(len(images))
      if not is_main:  # every process generates; process 0 writes
        continue
      for i, image in enumerate(images, start):
        path = fileio.join(out_dir, f"{stem}_seed{seed}_{i:03d}.png")
        generation.save_png(path, image, generation.image_text(
            prompt=raw_prompt, negative_prompt=negative_prompt, seed=seed, index=i,
            steps=num_inference_steps, scheduler=scheduler, guidance_scale=guidance_scale,
            model=model_id, concepts=concepts, checkpoint_step=ckpt_step,
            guidance_rescale=guidance_rescale))
        written.append(path)
      grid.extend(images[:max(GRID_MAX - len(grid), 0)])
    if is_main:
      generation.save_png(fileio.join(out_dir, f"{stem}_seed{seed}_grid.png"),
                          generation.image_grid(np.stack(grid)),
                          {"prompt": raw_prompt, "seed": str(seed),
                           "images": f"0-{len(grid) - 1} of {num_images}"})
  bar.close()
  _log(f"wrote {len(written)} image(s) and {len(prompts)} grid(s) to {out_dir}")
  return written
