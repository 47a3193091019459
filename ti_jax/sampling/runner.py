"""Sampling with learned pseudo-words: `run(prompts=..., workdir=...)` for `ti_jax.sample`.

Gathers the concepts (run directories and embedding files), checks they fit the
base model, adds their tokens, and writes each image as a PNG with its prompt,
seed, steps and scheduler in the text chunk, plus a grid per prompt.
"""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ti_jax import cli, errors
from ti_jax.embeddings import embedding_io, pseudo_words
from ti_jax.models import layers
from ti_jax.runtime import fileio, parallel
from ti_jax.sampling import generation, schedulers
from ti_jax.training import checkpointing
from ti_jax.weights.loading import DEFAULT_CACHE_DIR, load_stable_diffusion


class SampleError(errors.UserError):
  """Bad sampling input; one-line message."""



_log = cli.log


# The per-prompt grid tiles the first GRID_MAX images (a 100000-image run's grid
# would not fit in memory, nor be viewable).
GRID_MAX = 64


# Largest image side: the VAE decoder holds 128 x H x W float32 activations per image
# in its last blocks (2 GiB at 2048 px), and Stable Diffusion models are trained at
# 512-1024 px (the same bound as training's resolution).
MAX_IMAGE_SIZE = 2048


def _same_model(a: str, b: str) -> bool:
  norm = lambda s: os.path.abspath(os.path.expanduser(s)) if os.path.exists(os.path.expanduser(s)) else s
  return norm(a) == norm(b)


def gather_concepts(workdir: str | None, step: int | None,
                    sources: Sequence[str]) -> tuple[list[embedding_io.Concept], dict]:
  """Concepts of the run in `workdir` (first) and of each `PATH[:TOKEN]` in `sources`.

  Also returns the run's checkpoint metadata ({} without a workdir), read
  with its vectors in one restore. Refuses NaN/inf vectors and two concepts
  with one token name (including the `tok_1`, ... names of extra vectors).
  """
  concepts, run_meta = [], {}
  if workdir:
    if not fileio.is_dir(workdir):
      raise SampleError(f"run directory {workdir} is a file, not a folder"
                        if fileio.exists(workdir) else f"run directory {workdir} does not exist")
    vectors, run_meta = checkpointing.learned_from_workdir(workdir, step)
    what = f"{workdir} checkpoint {run_meta.get('step', '?')}"
    try:
      vectors = embedding_io.check_vectors(vectors, what)
    except embedding_io.EmbeddingFileError as e:
      raise SampleError(f"{e}; pass --step of an earlier checkpoint") from None
    concepts.append(embedding_io.Concept(
        run_meta["placeholder_token"], vectors, workdir,
        base_model=run_meta.get("pretrained_model_name_or_path")))
  for spec in sources:
    concepts += embedding_io.load_concepts(spec)
  seen = {}
  for c in concepts:
    for i, name in enumerate(pseudo_words.placeholder_tokens(c.token, c.vectors.shape[0])):
      if name in seen:
        other, j = seen[name]
        if i == j == 0:
          raise SampleError(f"token {c.token!r} comes from both {other.source} and {c.source}; "
                            "rename one with PATH:NEW_TOKEN")
        what = lambda k, t: f"{t!r}" if k == 0 else f"{name!r} (vector {k} of {t!r})"
        raise SampleError(f"token {what(i, c.token)} from {c.source} clashes with "
                          f"{what(j, other.token)} from {other.source}; "
                          "rename one with PATH:NEW_TOKEN")
      seen[name] = (c, i)
  return concepts, run_meta


def describe_concepts(concepts: Sequence[embedding_io.Concept]) -> list[str]:
  """One line per concept loaded from a file or another run: the token it registered and why."""
  lines = []
  for c in concepts:
    if not c.token_from:
      continue
    n = c.vectors.shape[0]
    vectors = f"{n} vectors, expanded in prompts" if n > 1 else "1 vector"
    lines.append(f"{c.source}: registered {c.token} ({vectors}; the token is "
                 f"{c.token_from})")
  return lines


def resolve_base_model(override: str, concepts: Sequence[embedding_io.Concept]) -> str:
  """The model to sample with: the override, else the first concept's (the run's) base model."""
  if override:
    return override
  for c in concepts:
    if c.base_model:
      return c.base_model
  raise SampleError("no base model: pass --workdir of a training run or "
                    "--pretrained_model_name_or_path")


def check_concepts_fit(concepts, model_id: str, hidden_size: int, allow_mismatch: bool) -> None:
  """Refuses embeddings of another width or, unless allowed, trained on another base model."""
  for c in concepts:
    if c.vectors.shape[1] != hidden_size:
      raise SampleError(f"embedding {c.token!r} from {c.source} has width {c.vectors.shape[1]} "
                        f"but the model's text encoder has width {hidden_size} (another base model?)")
    if c.base_model and not allow_mismatch and not _same_model(c.base_model, model_id):
      raise SampleError(f"{c.source} was trained on {c.base_model!r} but sampling uses "
                        f"{model_id!r}; pass --allow_base_model_mismatch to use it anyway")


def add_concepts(tokenizer, concepts) -> list[tuple[np.ndarray, list[int]]]:
  """Adds every concept's tokens to the tokenizer; returns (vectors, token ids) per concept.

  Refuses tokens the tokenizer cannot split apart (`pseudo_words.check_separable`).
  """
  out = []
  for c in concepts:
    try:
      ids = pseudo_words.add_placeholder_tokens(tokenizer, c.token, c.vectors.shape[0])
    except pseudo_words.EmbeddingError as e:
      raise SampleError(f"{c.source}: {e}") from None
    out.append((c.vectors, ids))
  try:
    pseudo_words.check_separable(tokenizer, {c.token: ids for c, (_, ids) in zip(concepts, out)})
  except pseudo_words.EmbeddingError as e:
    raise SampleError(str(e)) from None
  return out


def prepare_prompt(prompt: str, concepts, tokenizer) -> tuple[str, list[str]]:
  """Expands multi-vector tokens; returns the prompt and warnings (no token, truncation).

  Tokens match whole, as the tokenizer splits them (`pseudo_words.expand_placeholders`).
  """
  warnings = []
  counts = {c.token: c.vectors.shape[0] for c in concepts}
  ignore_case = pseudo_words.lowercases(tokenizer)
  if concepts and not pseudo_words.used_tokens(prompt, counts, ignore_case):
    warnings.append(f"prompt {prompt!r} uses none of the learned tokens "
                    f"({', '.join(c.token for c in concepts)})")
  prompt = pseudo_words.expand_placeholders(prompt, counts, ignore_case)
  length = len(tokenizer(prompt).input_ids)
  if length > tokenizer.model_max_length:
    warnings.append(f"prompt {prompt[:40]!r}... is {length} tokens; truncated to "
                    f"{tokenizer.model_max_length} (the text encoder's limit)")
  return prompt, warnings


def load_base_model(concepts, run_config: dict, *, override: str = "", dtype: str = "auto",
                    platform: str = "cpu", allow_pickle: bool = False, cache_dir: str = "",
                    allow_base_model_mismatch: bool = False):
  """Loads the base model the concepts were trained on (or `override`); returns (sd, model id).

  The run's weight files (variant, revision) and settings apply when the base
  model is the run's own. `dtype` "auto" is float32 on CPU, else bfloat16; the
  VAE always decodes in float32.
  """
  model_id = resolve_base_model(override, concepts)
  same_files = not override or _same_model(
      override, run_config.get("pretrained_model_name_or_path", ""))
  if dtype == "auto":
    dtype = "float32" if platform == "cpu" else "bfloat16"
  jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  attention_impl = run_config.get("attention_impl") or None
  if attention_impl == layers.PALLAS_TPU and platform != "tpu":
    attention_impl = None  # a run trained with the TPU kernel still samples elsewhere
  sd = load_stable_diffusion(
      model_id, dtype=jdtype, param_dtype=jdtype, vae_dtype=jnp.float32,
      variant=(run_config.get("variant") or None) if same_files else None,
      revision=(run_config.get("revision") or None) if same_files else None,
      allow_pickle=allow_pickle or bool(run_config.get("allow_pickle")),
      attention_impl=attention_impl,
      cache_dir=cache_dir or run_config.get("cache_dir", DEFAULT_CACHE_DIR))
  check_concepts_fit(concepts, model_id, sd.text_encoder.config.hidden_size,
                     allow_base_model_mismatch)
  return sd, model_id


def slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "prompt"


def run(*, prompts: Sequence[str], workdir: str | None = None, step: int | None = None,
        embedding_sources: Sequence[str] = (), pretrained_model_name_or_path: str = "",
        negative_prompt: str = "", num_images: int = 4, num_inference_steps: int = 50,
        guidance_scale: float = 7.5, scheduler: str = "ddim", seed: int = 0,
        height: int = 0, width: int = 0, output_dir: str = "", dtype: str = "auto",
        batch_size: int = 0, allow_base_model_mismatch: bool = False,
        cache_dir: str = "", allow_pickle: bool = False,
        devices: Sequence | None = None) -> list[str]:
  """Generates `num_images` per prompt; returns the written PNG paths.

  `batch_size` images per device per compiled call (0: `generation.auto_batch_size`);
  PNGs are written as each call finishes.
  """
  if not prompts:
    raise SampleError("no prompt: pass --prompt (repeatable) or --prompts_file")
  if num_images < 1 or num_inference_steps < 1:
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
  if not math.isfinite(guidance_scale):
    raise SampleError(f"guidance_scale must be a finite number, got {guidance_scale}")
  try:
    schedulers.make_sampler(scheduler, {}, 2)  # checks the name before loading anything
  except ValueError as e:
    raise SampleError(str(e)) from None
  if cache_dir and os.path.exists(os.path.expanduser(cache_dir)) and not os.path.isdir(
      os.path.expanduser(cache_dir)):
    raise SampleError(f"--cache_dir {cache_dir} is a file, not a folder")
  concepts, run_meta = gather_concepts(workdir, step, embedding_sources)
  for line in describe_concepts(concepts):  # which token each --embeddings source registered
    _log(line)
  run_config, ckpt_step = run_meta.get("config", {}), run_meta.get("step")
  devices = list(devices) if devices is not None else parallel.all_devices()
  is_main = jax.process_index() == 0
  sd, model_id = load_base_model(
      concepts, run_config, override=pretrained_model_name_or_path, dtype=dtype,
      platform=devices[0].platform, allow_pickle=allow_pickle, cache_dir=cache_dir,
      allow_base_model_mismatch=allow_base_model_mismatch)
  learned = add_concepts(sd.tokenizer, concepts)
  factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
  native = run_config.get("resolution") or sd.unet.config.sample_size * factor
  height, width = height or native, width or native
  try:
    generator = generation.ImageGenerator(
        sd, scheduler=scheduler, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, height=height, width=width, devices=devices)
  except ValueError as e:
    raise SampleError(str(e)) from None
  out_dir = output_dir or (fileio.join(workdir, "samples") if workdir else "samples")
  out_error = None
  if is_main:
    try:
      fileio.makedirs(out_dir)
    except OSError as e:
      out_error = SampleError(f"cannot write to --output_dir {out_dir}: {e.strerror or e}")
  if parallel.any_process(out_error is not None):  # all processes stop, none waits forever
    raise out_error or SampleError("process 0 cannot write the output folder")
  written = []
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=len(prompts) * num_images, desc="sample", unit="img", file=sys.stderr,
             disable=not is_main)
  batch_size = batch_size or generation.auto_batch_size(generator, num_images)
  for p_index, raw_prompt in enumerate(prompts):
    prompt, warnings = prepare_prompt(raw_prompt, concepts, sd.tokenizer)
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
        negative_prompt=negative_prompt, learned=learned):
      bar.update(len(images))
      if not is_main:  # every process generates; process 0 writes
        continue
      for i, image in enumerate(images, start):
        path = fileio.join(out_dir, f"{stem}_seed{seed}_{i:03d}.png")
        generation.save_png(path, image, {
            "prompt": raw_prompt, "negative_prompt": negative_prompt, "seed": str(seed),
            "image_index": str(i), "steps": str(num_inference_steps), "scheduler": scheduler,
            "guidance_scale": str(guidance_scale), "model": model_id,
            "learned_tokens": ",".join(c.token for c in concepts),
            "checkpoint_step": str(ckpt_step)})
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
