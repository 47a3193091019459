"""Editing a region of an image with learned pseudo-words: `run(...)` for `ti_jax.edit`.

Reads the image and its mask, brings them to a working size the model takes
(near the model's resolution, sides multiples of `blended.size_multiple`),
runs Blended Latent Diffusion (`blended.py`), resizes each result back and
blends it into the original pixels outside the slightly dilated mask, so the
background is the input's own, pixel for pixel. Writes each edit as a PNG
(prompt, seed, steps in the text chunk) and a grid of input, mask and edits.
"""

from __future__ import annotations

import math
import os
import sys
import types
from typing import Iterator, Sequence

import jax
import numpy as np
from PIL import Image

from ti_jax import errors
from ti_jax.data import image_loader
from ti_jax.runtime import console, fileio, parallel
from ti_jax.sampling import blended, generation, noise_schedule, runner, schedulers
from ti_jax.sampling import concepts as concept_lib


class EditError(errors.UserError):
  """Bad editing input; one-line message."""


_log = console.log

# Grey level (of 255) from which a mask pixel marks the region to change.
MASK_THRESHOLD = 128
# The smallest image side accepted: the training loader's own minimum (its min_side).
MIN_IMAGE_SIDE = 32
# Progressive mask shrinking stages used for thin masks when none are requested:
# the first third of the steps blends with the mask dilated by 2 latent cells,
# the next third by 1, the rest with the mask itself (a chosen value).
THIN_MASK_STAGES = 2
# The grid shows the input, the mask and at most this many edits.
GRID_MAX = 64


def read_image(path: str, what: str) -> tuple[np.ndarray, str | None]:
  """uint8 `[H, W, 3]` pixels of an image file, read as the training loader reads images.

  Returns the pixels and, where the EXIF orientation could not be applied, why.
  """
  if not path:
    raise EditError(f"{what} is empty: give an image file")
  if not os.path.exists(path):
    raise EditError(f"{what} {path} does not exist")
  if os.path.isdir(path):
    raise EditError(f"{what} {path} is a folder, not an image file")
  try:
    img, note = image_loader._read_rgb(path)  # pylint: disable=protected-access
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types for bad files
    detail = " ".join(str(e).split()) or type(e).__name__
    raise EditError(f"cannot read {what} {path} as an image ({type(e).__name__}: {detail})") from None
  return np.asarray(img, np.uint8), note


def mask_from_pixels(pixels: np.ndarray, threshold: int = MASK_THRESHOLD) -> np.ndarray:
  """bool `[H, W]`: pixels whose grey level (ITU-R 601 luma, 0-255) is >= `threshold`."""
  grey = np.asarray(Image.fromarray(pixels).convert("L"))
  return grey >= threshold


def working_size(height: int, width: int, resolution: int, multiple: int,
                 max_size: int = runner.MAX_IMAGE_SIZE) -> tuple[int, int]:
  """The size an image is edited at: its aspect, the shorter side near `resolution`.

  Both sides are multiples of `multiple` (at least one), the longer one at
  most `max_size`.
  """
  scale = resolution / min(height, width)
  scale = min(scale, max_size / max(height, width))
  def side(v):
    return int(min(max(round(v * scale / multiple), 1) * multiple, max_size // multiple * multiple))
  return side(height), side(width)


def _resize(pixels: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
  h, w = size
  if pixels.shape[:2] == (h, w):
    return pixels
  return np.asarray(Image.fromarray(pixels).resize((w, h), resample))


def _auto_batch(editor: blended.BlendedEditor, num_images: int) -> int:
  # generation.auto_batch_size reads only .devices, .sd and .image_size of its generator.
  view = types.SimpleNamespace(devices=editor.devices, sd=editor.sd, image_size=editor.image_size)
  return generation.auto_batch_size(view, num_images)


def edit_batches(sd, image: np.ndarray, mask: np.ndarray, prompt: str, num_images: int, *,
                 scheduler: str = "ddim", num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, seed: int = 0, negative_prompt: str = "",
                 learned=(), resolution: int = 0, mask_shrink_stages: int = -1,
                 batch_size: int = 0, devices: Sequence | None = None, tokenizers=None,
                 log=None, guidance_rescale: float = 0.0) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (index of the first edit, uint8 `[n, H, W, 3]`) per compiled call.

  Args:
    sd: the loaded base model (`load_stable_diffusion`).
    image: uint8 `[H, W, 3]`, any size the model's working size can be reached from.
    mask: bool `[H, W]`, True where the image may change.
    prompt: the prompt, learned tokens already expanded (`concepts.prepare_prompt`).
    num_images: edits to make; edit i draws its noise from (seed, i).
    resolution: the shorter side to edit at (0: the model's resolution).
    mask_shrink_stages: progressive mask shrinking stages (-1: `THIN_MASK_STAGES`
      for a thin mask, else 0).
    batch_size: edits per device per call (0: as `generation.auto_batch_size`).
    log: called with one line per decision (working size, thin mask).
    learned, tokenizers: the concepts' vectors and tokenizers, one entry per text
      encoder (`concepts.tokenizers_with_concepts`).
    guidance_rescale: 0 (off) or as `generation.ImageGenerator`'s.

  Every edit equals `image` outside `mask` dilated by half a latent cell.

  Raises:
    EditError: a mask of another size, or a step count or scheduler setting
      the model's scheduler config cannot take.
  """
  log = log or (lambda _: None)
  if image.shape[:2] != mask.shape:
    raise EditError(f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                    f"{image.shape[1]}x{image.shape[0]}; the mask must have the image's size")
  factor, multiple = blended.latent_factor(sd), blended.size_multiple(sd)
  h, w = image.shape[:2]
  resolution = resolution or sd.unet.config.sample_size * factor
  size = working_size(h, w, resolution, multiple)
  if size != (h, w):
    log(f"image {w}x{h} is edited at {size[1]}x{size[0]} (sides multiples of {multiple}, the "
        f"shorter near the model's {resolution} px) and resized back to {w}x{h}")
  work_image = _resize(image, size, Image.LANCZOS)
  # Area-averaged, any coverage counts: a stroke thinner than the downscaling keeps its
  # pixels (the latent grid's half-cover rule and `is_thin` then decide, as at full size).
  work_mask = _resize(mask.astype(np.uint8) * 255, size, Image.BOX) > 0  # [H', W']
  thin = blended.is_thin(work_mask, factor)
  if mask_shrink_stages < 0:
    mask_shrink_stages = THIN_MASK_STAGES if thin else 0
  if thin:
    log(f"the mask is thin at the latent grid ({factor} px cells): every cell it touches is "
        f"edited, with {mask_shrink_stages} progressive mask shrinking stage(s)")
  masks = blended.latent_masks(work_mask, factor, mask_shrink_stages)  # [S, h, w, 1]
  try:
    editor = blended.BlendedEditor(sd, scheduler=scheduler, num_inference_steps=num_inference_steps,
                                   guidance_scale=guidance_scale, height=size[0], width=size[1],
                                   devices=devices, guidance_rescale=guidance_rescale)
  except ValueError as e:  # a step count or scheduler setting the model's config cannot take
    raise EditError(str(e)) from None
  latents = editor.encode(work_image)  # [h, w, C], the image encoded once
  # Half a latent cell at the working size, in the image's own pixels (at least 1).
  radius = max(1, round(factor / 2 * max(h / size[0], w / size[1])))
  region = blended.dilate(mask, radius)  # [H, W]
  batch_size = batch_size or _auto_batch(editor, num_images)
  chunk = batch_size * len(editor.devices)
  for start in range(0, num_images, chunk):
    count = min(chunk, num_images - start)
    # Always `chunk` prompts: one compiled program for every call, the last one included.
    edits = editor.edit([prompt] * chunk, latents, masks, seed=seed,
                        negative_prompt=negative_prompt, learned=learned, first_index=start,
                        tokenizers=tokenizers)[:count]
    edits = np.stack([_resize(e, (h, w), Image.LANCZOS) for e in edits])  # [n, H, W, 3]
    yield start, blended.blend_pixels(image, edits, region)


def _check_request(*, prompt: str, num_images: int, num_inference_steps: int, batch_size: int,
                   seed: int, guidance_scale: float, mask_threshold: int,
                   mask_shrink_stages: int, scheduler: str,
                   guidance_rescale: float = 0.0) -> None:
  """Refuses bad arguments before anything is read or loaded."""
  if not prompt:
    raise EditError("no prompt: pass --prompt")
  if num_images < 1 or num_inference_steps < 1:
    raise EditError("num_images and num_inference_steps must be >= 1")
  if batch_size < 0:
    raise EditError("batch_size must be >= 1 (or 0: chosen to fit device memory)")
  if not 0 <= seed < 2**32:
    raise EditError(f"seed must be in [0, 2**32), got {seed}")
  if not math.isfinite(guidance_scale):
    raise EditError(f"guidance_scale must be a finite number, got {guidance_scale}")
  if not 0.0 <= guidance_rescale <= 1.0:  # also refuses NaN
    raise EditError(f"guidance_rescale must be in [0, 1] (0: off), got {guidance_rescale}")
  if not 1 <= mask_threshold <= 255:
    raise EditError(f"mask_threshold must be a grey level in [1, 255], got {mask_threshold}")
  if mask_shrink_stages < -1:
    raise EditError("mask_shrink_stages must be >= 0 (or -1: automatic)")
  try:
    schedulers.check_sampler_name(scheduler)  # the name, before loading anything
  except ValueError as e:
    raise EditError(str(e)) from None


def load_image_and_mask(image: str, mask: str, mask_threshold: int) -> tuple[np.ndarray, np.ndarray]:
  """The image (uint8 `[H, W, 3]`) and its mask (bool `[H, W]`), checked against each other."""
  pixels, note = read_image(image, "--image")
  if note:
    _log(f"warning: --image {image}: {note}")
  h, w = pixels.shape[:2]
  if min(h, w) < MIN_IMAGE_SIDE:
    raise EditError(f"--image {image} is {w}x{h}: too small, need at least {MIN_IMAGE_SIDE} px "
                    "on each side")
  mask_pixels, _ = read_image(mask, "--mask")
  if mask_pixels.shape[:2] != (h, w):
    raise EditError(f"--mask {mask} is {mask_pixels.shape[1]}x{mask_pixels.shape[0]} but --image "
                    f"is {w}x{h}; the mask must have the image's size")
  region = mask_from_pixels(mask_pixels, mask_threshold)
  if not region.any():
    raise EditError(f"--mask {mask} marks no pixel to change: none has a grey level >= "
                    f"{mask_threshold} (white marks the region to edit)")
  _log(f"mask: pixels with a grey level >= {mask_threshold} of 255 are changed "
       f"({100.0 * region.mean():.1f}% of the image)")
  return pixels, region


def run(*, image: str, mask: str, prompt: str, workdir: str | None = None,
        step: int | None = None, embedding_sources: Sequence[str] = (),
        pretrained_model_name_or_path: str = "", negative_prompt: str = "",
        num_images: int = 4, num_inference_steps: int | None = None,
        guidance_scale: float | None = None, scheduler: str = "ddim", seed: int = 0,
        output_dir: str = "", mask_threshold: int = MASK_THRESHOLD, mask_shrink_stages: int = -1,
        dtype: str = "auto", batch_size: int = 0, allow_base_model_mismatch: bool = False,
        cache_dir: str = "", allow_pickle: bool = False,
        devices: Sequence | None = None, guidance_rescale: float = 0.0,
        concept: Sequence[str] = ()) -> list[str]:
  """Edits the white region of `mask` in `image` with `prompt`; returns the written PNG paths.

  Every model family, SDXL included (its concepts go into copies of both tokenizers).
  `concept`: for a many-concept `workdir`, the `--concept` values naming the concepts
  to edit with (`concepts.gather_concepts`); one concept's edits go to WORKDIR/<name>/edits.
  `num_inference_steps`, `guidance_scale` None: 50 and 7.5.
  """
  num_inference_steps = 50 if num_inference_steps is None else num_inference_steps
  guidance_scale = 7.5 if guidance_scale is None else guidance_scale
  _check_request(prompt=prompt, num_images=num_images, num_inference_steps=num_inference_steps,
                 batch_size=batch_size, seed=seed, guidance_scale=guidance_scale,
                 mask_threshold=mask_threshold, mask_shrink_stages=mask_shrink_stages,
                 scheduler=scheduler, guidance_rescale=guidance_rescale)
  pixels, region = load_image_and_mask(image, mask, mask_threshold)  # [H, W, 3], [H, W]
  concepts, run_meta = concept_lib.gather_concepts(workdir, step, embedding_sources, concept)
  for line in concept_lib.describe_concepts(concepts):
    _log(line)
  run_config, ckpt_step = run_meta.get("config", {}), run_meta.get("step")
  devices = list(devices) if devices is not None else parallel.all_devices()
  is_main = jax.process_index() == 0
  sd, model_id = concept_lib.load_base_model(
      concepts, run_config, override=pretrained_model_name_or_path, dtype=dtype,
      platform=devices[0].platform, allow_pickle=allow_pickle, cache_dir=cache_dir,
      allow_base_model_mismatch=allow_base_model_mismatch)
  try:  # the model's scheduler config fixes which step counts work: checked before any output
    schedulers.make_sampler(scheduler, sd.scheduler_config, num_inference_steps)
  except noise_schedule.SchedulerConfigError as e:
    raise EditError(schedulers.sampler_refusal(e, sd.scheduler_config, num_inference_steps,
                                               "--scheduler")) from None
  except ValueError as e:
    raise EditError(str(e)) from None
  vocab = concept_lib.tokenizers_with_concepts(sd, concepts)  # tokenizer(s), learned vectors
  expanded, warnings = concept_lib.prepare_prompt(prompt, concepts, vocab["tokenizers"][0])
  for line in warnings:
    _log(f"warning: {line}")
  out_dir = output_dir or (fileio.join(concept_lib.concepts_folder(workdir, run_meta), "edits")
                           if workdir else "edits")
  generation.make_output_dir(out_dir, EditError)
  step_part = f"_step{ckpt_step}" if ckpt_step is not None else ""
  stem = f"{generation.slug(prompt)}{step_part}_seed{seed}"
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=num_images, desc="edit", unit="img", file=sys.stderr, disable=not is_main)
  written, grid = [], []
  batches = edit_batches(
      sd, pixels, region, expanded, num_images, scheduler=scheduler,
      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
      negative_prompt=negative_prompt, resolution=run_config.get("resolution") or 0,
      mask_shrink_stages=mask_shrink_stages, batch_size=batch_size, devices=devices, log=_log,
      guidance_rescale=guidance_rescale, **vocab)
  for start, edits in batches:
    bar.update(len(edits))
    if not is_main:  # every process edits; process 0 writes
      continue
    for i, edit in enumerate(edits, start):
      path = fileio.join(out_dir, f"{stem}_{i:03d}.png")
      text = generation.image_text(
          prompt=prompt, negative_prompt=negative_prompt, seed=seed, index=i,
          steps=num_inference_steps, scheduler=scheduler, guidance_scale=guidance_scale,
          model=model_id, concepts=concepts, checkpoint_step=ckpt_step,
          guidance_rescale=guidance_rescale)
      generation.save_png(path, edit, dict(text, image=image, mask=mask,
                                           mask_threshold=str(mask_threshold),
                                           method="blended latent diffusion"))
      written.append(path)
    grid.extend(edits[:max(GRID_MAX - len(grid), 0)])
  bar.close()
  if is_main:
    tiles = np.stack([pixels, np.repeat(region[..., None] * np.uint8(255), 3, axis=-1)] + grid)
    generation.save_png(fileio.join(out_dir, f"{stem}_grid.png"),
                        generation.image_grid(tiles, cols=min(len(tiles), 6)),
                        {"prompt": prompt, "seed": str(seed),
                         "tiles": f"input, mask, edits 0-{len(grid) - 1} of {num_images}"})
  _log(f"wrote {len(written)} edited image(s) and a grid to {out_dir}")
  return written
