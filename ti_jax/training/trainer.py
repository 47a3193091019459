"""The training run: `run(config, workdir)` from start-up checks to the final export.

`python -m ti_jax.train` is its command line. `_run_locked` tells the run top to
bottom, each chapter one call into the room that owns it: the inputs (`inputs.build`:
images, base model, prompts, the placeholder in each text encoder (`concept`), the
latent cache; loaded and checked on every process), resume (`checkpointing`), the
compiled step (`step_inputs`, `compile_step`; `train_lib` holds the step itself),
the loop (`loop.train_loop`: logs, checks, checkpoints, validation, signals) and
the export of the final vectors. The workdir is locked around all of it
(`ti_jax.runtime.run_dir`). Re-running the same workdir resumes from the newest
checkpoint; Ctrl-C or SIGTERM saves a checkpoint before returning.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ti_jax import errors
from ti_jax.data import buckets
from ti_jax.embeddings import embedding_io
from ti_jax.models import layers
from ti_jax.runtime import console, fileio, parallel, run_dir
from ti_jax.sampling import schedulers
from ti_jax.training import checkpointing, loop, tensorboard, train_lib, validation
from ti_jax.training import config as room_config
from ti_jax.training import inputs as run_inputs
from ti_jax.training.inputs import RunInputs

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(errors.UserError):
  """A config value is out of range; one-line message."""


# Largest training resolution: Stable Diffusion models are trained at 512-1024 px,
# and the VAE encoder's first layers hold 128 x R x R float32 activations per
# image (2 GiB at 2048 px), beside R x R x 3 pixels per training view on the host.
MAX_RESOLUTION = 2048


# The step counter, and every step count the compiled step computes with (the learning-rate
# schedule's warmup and decay, progressive_words), are 32-bit integers on the device.
MAX_STEPS = 2**31 - 1

# JAX's random keys take 32-bit seeds: a larger seed would repeat a smaller one's draws.
MAX_SEED = 2**32 - 1

# Examples per optimizer step (per-device batch x devices x accumulation steps). The host
# draws every example's view and template each step (about a second for this many) and
# builds its token ids; nothing trains usefully at more.
MAX_EXAMPLES_PER_STEP = 2**16

# Validation images per prompt, and per device per sampling call. Each prompt's images and
# their grid are held on the host (64 images at 2048 px take 1.5 GB); for more images,
# sample the checkpoint with ti_jax.sample.
MAX_VALIDATION_IMAGES = 64


# A learned vector whose L2 norm exceeds this many times the largest norm of the
# model's token table (or of the initial vectors) has diverged: the text encoder
# has never seen inputs of that size. Normal runs stay within about 10x.
MAX_NORM_FACTOR = 1000.0


def validate_config(c) -> None:
  """Checks value ranges that config_flags' type checks cannot."""
  def need(ok, msg):
    if not ok:
      raise ConfigError(msg)
  need(c.train_data_dir, "config.train_data_dir is empty: point it at a folder of 3-5 images")
  need(c.learnable_property in ("object", "style"),
       f"config.learnable_property must be 'object' or 'style', got {c.learnable_property!r}")
  need(not c.caption_extension or (c.caption_extension.startswith(".") and
                                   len(c.caption_extension) > 1),
       f"config.caption_extension must be '' or start with a dot, e.g. '.txt', got "
       f"{c.caption_extension!r}")
  need(c.initializer_token.strip(), "config.initializer_token is empty: give a coarse word, e.g. 'toy'")
  need(c.num_vectors >= 1, f"config.num_vectors must be >= 1, got {c.num_vectors}")
  # Each vector takes one of the text encoder's 77 tokens, 2 of which are start
  # and end (the exact limit, which depends on the templates, is checked later).
  need(c.num_vectors <= 75, f"config.num_vectors {c.num_vectors} cannot fit the text "
       "encoder's 77-token prompts (each vector takes a token; at most 75 fit)")
  need(c.resolution >= 8 and c.resolution % 8 == 0,
       f"config.resolution must be a positive multiple of 8, got {c.resolution}")
  if c.enable_bucket:
    step = c.bucket_reso_steps
    need(step >= 8 and step % 8 == 0,
         f"config.bucket_reso_steps must be a positive multiple of 8, got {step}")
    for name in ("min_bucket_reso", "max_bucket_reso"):
      need(c[name] >= step and c[name] % step == 0,
           f"config.{name} must be a positive multiple of bucket_reso_steps {step}, got {c[name]}")
    need(c.min_bucket_reso <= c.resolution <= c.max_bucket_reso,
         f"config.resolution {c.resolution} must lie in [min_bucket_reso, max_bucket_reso] = "
         f"[{c.min_bucket_reso}, {c.max_bucket_reso}] with enable_bucket")
    need(c.max_bucket_reso <= MAX_RESOLUTION,
         f"config.max_bucket_reso {c.max_bucket_reso} is above the limit of {MAX_RESOLUTION} px")
  need(c.resolution <= MAX_RESOLUTION,
       f"config.resolution {c.resolution} is above the limit of {MAX_RESOLUTION} px: Stable "
       "Diffusion is trained at 512-1024 px, and encoding larger images needs tens of GB")
  # nan compares False with everything, so each range check below also refuses it.
  for name in ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay",
               "embedding_reg_weight", "flip_p", "per_image_token_p", "snr_gamma", "noise_offset",
               "validation_guidance_scale"):
    need(math.isfinite(float(c[name])), f"config.{name} must be a finite number, got {c[name]}")
  need(c.train_batch_size >= 1, f"config.train_batch_size must be >= 1, got {c.train_batch_size}")
  for name in ("train_batch_size", "global_batch_size", "gradient_accumulation_steps"):
    need(c[name] <= MAX_EXAMPLES_PER_STEP,
         f"config.{name} {c[name]} is above the limit of {MAX_EXAMPLES_PER_STEP} examples per "
         "step (the host draws and tokenizes every example of every step)")
  need(c.remat in (True, False, "auto"), f"config.remat must be True, False or auto, got {c.remat!r}")
  need(c.global_batch_size >= 0, f"config.global_batch_size must be >= 0, got {c.global_batch_size}")
  for name in ("snr_gamma", "noise_offset"):
    need(c[name] >= 0, f"config.{name} must be >= 0 (0 = off), got {c[name]}")
  need(c.gradient_accumulation_steps >= 1,
       f"config.gradient_accumulation_steps must be >= 1, got {c.gradient_accumulation_steps}")
  need(0.0 <= c.per_image_token_p <= 1.0,
       f"config.per_image_token_p must be in [0, 1], got {c.per_image_token_p}")
  need(c.max_train_steps >= 1, f"config.max_train_steps must be >= 1, got {c.max_train_steps}")
  for name in ("max_train_steps", "lr_warmup_steps", "progressive_words"):
    need(c[name] <= MAX_STEPS, f"config.{name} {c[name]} is above {MAX_STEPS}: the training "
         "step counts steps in 32-bit integers")
  need(c.learning_rate > 0, f"config.learning_rate must be > 0, got {c.learning_rate}")
  for name in ("adam_beta1", "adam_beta2"):
    need(0.0 <= c[name] < 1.0, f"config.{name} must be in [0, 1), got {c[name]}")
  need(c.adam_epsilon > 0, f"config.adam_epsilon must be > 0, got {c.adam_epsilon}")
  need(c.adam_weight_decay >= 0,
       f"config.adam_weight_decay must be >= 0, got {c.adam_weight_decay}")
  need(c.optimizer in train_lib.OPTIMIZERS,
       f"config.optimizer must be one of {', '.join(train_lib.OPTIMIZERS)}, got {c.optimizer!r}")
  need(c.lr_scheduler in train_lib.LR_SCHEDULES,
       f"config.lr_scheduler must be one of {', '.join(train_lib.LR_SCHEDULES)}, got {c.lr_scheduler!r}")
  need(0.0 <= c.flip_p <= 1.0, f"config.flip_p must be in [0, 1], got {c.flip_p}")
  for name in ("dtype", "vae_dtype"):
    need(c[name] in _DTYPES, f"config.{name} must be one of {', '.join(_DTYPES)}, got {c[name]!r}")
  need(c.checkpointing_steps >= 1, f"config.checkpointing_steps must be >= 1, got {c.checkpointing_steps}")
  need(c.log_every_steps >= 1, f"config.log_every_steps must be >= 1, got {c.log_every_steps}")
  need(c.validation_steps >= 1, f"config.validation_steps must be >= 1, got {c.validation_steps}")
  need(c.checkpoints_total_limit >= 1,
       f"config.checkpoints_total_limit must be >= 1 (the newest is always kept), "
       f"got {c.checkpoints_total_limit}")
  need(0 <= c.seed <= MAX_SEED, f"config.seed must be >= 0 and < 2**32 (JAX's random keys take "
       f"32-bit seeds), got {c.seed}")
  need(c.progressive_words >= 0,
       f"config.progressive_words must be >= 0, got {c.progressive_words}")
  need(c.embedding_reg_weight >= 0,
       f"config.embedding_reg_weight must be >= 0, got {c.embedding_reg_weight}")
  need(c.lr_warmup_steps >= 0, f"config.lr_warmup_steps must be >= 0, got {c.lr_warmup_steps}")
  need(c.attention_impl in layers.ATTENTION_IMPLS,
       f"config.attention_impl must be one of {layers.ATTENTION_IMPLS}, got {c.attention_impl!r}")
  need(c.report_to in tensorboard.REPORT_TO,
       f"config.report_to must be '' (off) or 'tensorboard', got {c.report_to!r}")
  if validation.enabled(c):
    validation.validation_prompts(c)  # a prompts file is read (and checked) at start-up
    need(c.num_validation_images >= 1,
         f"config.num_validation_images must be >= 1, got {c.num_validation_images}")
    for name in ("num_validation_images", "validation_batch_size"):
      need(c[name] <= MAX_VALIDATION_IMAGES,
           f"config.{name} {c[name]} is above the limit of {MAX_VALIDATION_IMAGES} validation "
           "images (for more, sample a checkpoint with python -m ti_jax.sample)")
    need(c.validation_inference_steps >= 1,
         f"config.validation_inference_steps must be >= 1, got {c.validation_inference_steps}")
    need(c.validation_batch_size >= 0,
         f"config.validation_batch_size must be >= 0, got {c.validation_batch_size}")
    # The name only: the sampler itself is built from the model's scheduler config once it
    # is loaded (validation.check_scheduler); an empty config here would take PNDM's PRK
    # defaults and refuse pndm below 4 steps for every model.
    try:
      schedulers.check_sampler_name(c.validation_scheduler)
    except ValueError as e:
      raise ConfigError(f"config.validation_scheduler: {e}") from None


def enable_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in `path` ("" leaves it off).

  It sets process-wide `jax.config` values, so only the entry point calls it
  (`python -m ti_jax.train` passes config.compilation_cache_dir), never `run`.
  """
  if not path:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
  # Cache every program that took over a second to compile (the train step does).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# TRANSITION (issue 29, until the config branch moves the block above to training/config.py):
# the rooms raise config.ConfigError, so this module's name is bound to that one class.
ConfigError = room_config.ConfigError  # pylint: disable=function-redefined

_log = console.log


def run(config, workdir: str, devices: Sequence | None = None, progress: bool = True) -> dict:
  """Trains (or resumes) the run in `workdir`; returns {"step", "embeds", "interrupted"}
  (SDXL: also "embeds_2", the second text encoder's vectors).

  The workdir is locked for the whole run (process 0 takes the lock; a
  refusal stops every process). Raises one of errors.UserError for bad input, a
  failed checkpoint write or a diverged run, and loop.Aborted if a second signal
  cut the run short.
  """
  validate_config(config)
  devices = _check_devices(config, devices)  # before the lock: a refusal writes nothing
  workdir = fileio.resolve(workdir)  # a local folder or gs://...
  lock, created = _lock_workdir(workdir)
  try:
    return _run_locked(config, workdir, devices, progress)
  except BaseException:
    if created:
      _remove_unclaimed_workdir(workdir)
    raise
  finally:
    if lock is not None:
      lock.release()


def _run_locked(config, workdir: str, devices: list, progress: bool) -> dict:
  """`run` once the workdir is locked (`devices` checked): the whole run, in the order it
  happens."""
  # --- Inputs: every one loaded and checked on every process ------------------------------
  inputs = _build_inputs(config, workdir, devices)
  ckpts = run_dir.Checkpoints(workdir, config.checkpoints_total_limit)
  try:
    # --- Resume: the newest usable checkpoint, or step 0 ------------------------------------
    metadata = run_metadata(config, inputs)
    state = checkpointing.resume(ckpts, jax.device_get(inputs.state), metadata,
                                 checkpointing.run_identity(config), workdir, inputs.has_run_json)
    start = int(state.step)
    _log_run(config, inputs, len(devices), start)
    tb = open_tensorboard(config, workdir, start)  # a folder it cannot write: refused here
    try:
      # --- Compile: frozen params and the state on every device, the step compiled -------
      frozen, settings = step_inputs(config, inputs)
      frozen = run_inputs.bucket_frozen(inputs, parallel.replicate(frozen, devices), devices)
      state = parallel.replicate(state, devices)
      step_fn = compile_step(config, settings, inputs, devices,
                             (state, run_inputs.frozen_for(config, inputs, frozen, start),
                              run_inputs.batch_for(config, inputs, start)))
      validator = make_validator(config, inputs, frozen[0], devices, workdir)
      limit = max(loop.norm_limit(c.table, c.init.vectors) for c in inputs.concepts)

      # --- The loop -------------------------------------------------------------------------
      state, step, interrupted = loop.train_loop(config, inputs, step_fn, state, frozen, start,
                                                 ckpts, metadata, validator, limit, workdir,
                                                 progress, tb)
    finally:
      if tb is not None:
        tb.close()  # never raises: a failure is one warning line
    ckpts.wait()
  finally:
    ckpts.close()

  # --- Export: the final vectors as diffusers' learned_embeds.safetensors --------------------
  return export(config, workdir, inputs, state, start, step, interrupted, ckpts.directory)


# ---------------------------------------------------------------------------
# Lock and inputs.
# ---------------------------------------------------------------------------


def _lock_workdir(workdir: str):
  """(lock or None, whether the workdir was created): process 0 locks, all learn the outcome."""
  lock, error, created = None, None, False
  if jax.process_index() == 0:
    created = not fileio.exists(workdir)
    try:
      lock = run_dir.lock_workdir(workdir)
    except run_dir.WorkdirError as e:
      error = e
  if parallel.any_process(error is not None):
    raise error or run_dir.WorkdirError(
        "process 0 of this run could not lock the workdir; see its log")
  return lock, created


def _remove_unclaimed_workdir(workdir: str) -> None:
  """Removes a workdir this run created if a failed start left only its lock in it."""
  if fileio.is_remote(workdir) or not os.path.isdir(workdir):
    return
  if os.listdir(workdir) == [fileio.LOCK_NAME]:
    os.unlink(os.path.join(workdir, fileio.LOCK_NAME))
    os.rmdir(workdir)


def _check_devices(config, devices: Sequence | None) -> list:
  """The run's devices over all processes (default: every device), checked against the config
  (the attention kernel, the batch over them: `inputs.batch_sizes`)."""
  devices = list(devices) if devices is not None else parallel.all_devices()
  if config.attention_impl == layers.PALLAS_TPU and devices[0].platform != "tpu":
    raise ConfigError(f"config.attention_impl='{layers.PALLAS_TPU}' needs TPU devices; these "
                      f"are {devices[0].platform} (use '' or 'cudnn' on GPU)")
  run_inputs.batch_sizes(config, len(devices))
  return devices


def _build_inputs(config, workdir: str, devices: Sequence) -> RunInputs:
  """`inputs.build` on every process. A process that fails tells the others, so a multi-host
  run stops everywhere instead of hanging in the first collective."""
  startup_error, inputs = None, None
  try:
    inputs = run_inputs.build(config, workdir, devices)
  except errors.UserError as e:
    startup_error = e
  if parallel.any_process(startup_error is not None):
    raise startup_error or run_dir.WorkdirError(
        "another process of this run failed to start; see the logs of the other processes")
  return inputs


def run_metadata(config, inputs: RunInputs) -> dict:
  """What every checkpoint of the run carries (`checkpointing.run_metadata`)."""
  p = inputs.prompts
  # Each text encoder's token ids and width, under run.json's names: token_ids and
  # embedding_dim for the first, with its suffix for each further one (SDXL: _2).
  per_encoder = {}
  for c in inputs.concepts:
    per_encoder.update({"token_ids" + c.suffix: c.token_ids,
                        "embedding_dim" + c.suffix: c.table.shape[1]})
  return checkpointing.run_metadata(
      config, tokens=p.tokens, image_tokens=p.image_tokens, model_path=inputs.sd.path,
      global_batch=inputs.global_batch, base_lr=inputs.base_lr, image_paths=inputs.images.paths,
      prompt_texts_sha256=p.texts.sha256(), **per_encoder)


def open_tensorboard(config, workdir: str, start: int) -> tensorboard.Writer | None:
  """Process 0's TensorBoard writer with config.report_to="tensorboard" (else None); a
  WORKDIR/tensorboard it cannot write stops every process with one line."""
  if config.report_to != "tensorboard":
    return None
  writer, error = None, None
  try:
    writer = tensorboard.open_writer(config.report_to, workdir, start,
                                     jax.process_index() == 0)
  except tensorboard.TensorBoardError as e:
    error = e
  if parallel.any_process(error is not None):
    raise error or tensorboard.TensorBoardError(
        "process 0 of this run could not open its TensorBoard events; see its log")
  return writer


def _log_run(config, inputs: RunInputs, num_devices: int, start: int) -> None:
  p = inputs.prompts
  extra = f" and {len(p.image_tokens)} per-image tokens" if p.image_tokens else ""
  accumulation = (f" ({inputs.per_device_batch} per device x {config.gradient_accumulation_steps}"
                  " accumulation steps)" if config.gradient_accumulation_steps > 1 else "")
  _log(f"training {p.tokens}{extra} on {num_devices} device(s) ({jax.devices()[0].platform}), "
       f"global batch {inputs.global_batch}{accumulation}, {config.optimizer} "
       f"lr {inputs.base_lr:g} ({config.lr_scheduler}), "
       f"{inputs.schedule.prediction_type} target, steps {start}->{config.max_train_steps}")
  if config.enable_bucket:
    _log(buckets.describe(inputs.images.buckets, run_inputs.bucket_sizes(inputs.images)))


# ---------------------------------------------------------------------------
# The step: its frozen arguments, settings and compiled form.
# ---------------------------------------------------------------------------


def step_inputs(config, inputs: RunInputs) -> tuple[train_lib.Frozen, train_lib.StepSettings]:
  """The step's frozen arrays (host; replicated by the caller) and its static settings, with
  one entry per text encoder (`inputs.concepts`).

  With buckets the latents are the first bucket's; `inputs.bucket_frozen` adds the others.
  """
  concepts, sd = inputs.concepts, inputs.sd
  latent_mean, latent_std = inputs.latents[0]
  frozen = train_lib.Frozen(
      unet=sd.unet_params, text_encoders=tuple(c.encoder.params for c in concepts),
      latent_mean=latent_mean, latent_std=latent_std,
      placeholder_ids=tuple(c.placeholder_ids for c in concepts), schedule=inputs.schedule,
      init_embeds=tuple(np.asarray(c.init.vectors, np.float32) for c in concepts),
      time_ids=None if inputs.time_ids is None else inputs.time_ids[0])  # SDXL's
  # SDXL: pool its last encoder at the real end token. SDXL's config says eos id 2, and
  # transformers' legacy rule for it pools at the largest id, which is the added
  # pseudo-word's in every training prompt (diffusers' SDXL script trains so). A1111
  # and ComfyUI, where users load the embedding, pool at the real end token: training
  # the way they sample keeps the pooled text embedding the one those tools compute.
  pool_eos = int(concepts[-1].encoder.tokenizer.eos_token_id) if sd.is_sdxl else None
  vae_config = sd.vae.config
  settings = train_lib.StepSettings(
      unet=sd.unet, text_encoders=tuple(c.encoder.module for c in concepts),
      suffixes=tuple(c.suffix for c in concepts), pool_eos_token_id=pool_eos,
      scaling_factor=float(vae_config.scaling_factor),
      shift_factor=float(vae_config.shift_factor), seed=int(config.seed),
      embedding_reg_weight=float(config.embedding_reg_weight),
      progressive_words=int(config.progressive_words),
      gradient_accumulation_steps=int(config.gradient_accumulation_steps),
      snr_gamma=float(config.snr_gamma), noise_offset=float(config.noise_offset))
  return frozen, settings


def make_validator(config, inputs: RunInputs, frozen: train_lib.Frozen, devices: Sequence,
                   workdir: str) -> validation.Validation | None:
  """The run's validation images (`validation.make`), sharing the step's device weights:
  the UNet's and each text encoder's params, under its pipeline role."""
  shared = {"unet": frozen.unet, **{c.encoder.role: params for c, params
                                    in zip(inputs.concepts, frozen.text_encoders)}}
  return validation.make(config, inputs.sd, [c.token_ids for c in inputs.concepts], devices,
                         workdir, shared=shared)


def compile_step(config, settings: train_lib.StepSettings, inputs: RunInputs,
                 devices: Sequence, args: tuple):
  """The pmapped step; with remat="auto" on TPU, rematerialised if the plain step does not
  fit the chip (`args`: the step's first (state, frozen, batch))."""
  limit = (train_lib.device_memory_limit(devices[0])
           if config.remat == "auto" and devices[0].platform == "tpu" else None)
  _, step_fn, remat = train_lib.remat_if_needed(settings, inputs.optimizer, inputs.lr, devices,
                                                args, limit)
  if remat:
    _log("remat=auto: the step does not fit the device memory without remat; rematerialising")
  return step_fn


# ---------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------


def export(config, workdir: str, inputs: RunInputs, state, start: int, step: int,
           interrupted: bool, checkpoints: str) -> dict:
  """The run's result, {"step", "interrupted", and each encoder's final vectors by key}. Unless
  the run was interrupted, process 0 writes the active vectors (`write_final_embedding`)."""
  params = parallel.unreplicate(state).params
  final = {c.key: np.asarray(params[c.key]) for c in inputs.concepts}  # [num_vectors, D] each
  if interrupted:
    _log(f"stopped at step {step}; checkpoint saved in {checkpoints}. "
         "Re-run the same command to resume.")
  elif jax.process_index() == 0:
    active = train_lib.active_vectors(step, config.num_vectors, config.progressive_words)
    out = write_final_embedding(config, workdir, [v[:active] for v in final.values()], step,
                                rewrite=step > start)
    pair = (f" and {embedding_io.second_file(out)} (the second text encoder's)"
            if len(final) > 1 else "")
    _log(f"done: step {step}; learned embedding in {out}{pair}")
  return {"step": step, **final, "interrupted": interrupted}


def write_final_embedding(config, workdir: str, vectors: Sequence[np.ndarray], step: int,
                          rewrite: bool) -> str:
  """Writes the active vectors, `[k, D]` per text encoder, as
  WORKDIR/learned_embeds.safetensors; returns its path.

  An SDXL run (two encoders) writes diffusers' pair: learned_embeds.safetensors and
  learned_embeds_2.safetensors beside it. Unless `rewrite` (the run trained), a file
  that already holds exactly these vectors is left alone: a re-run of a finished run
  in a workdir that has since become read-only still reports its result.
  """
  out = fileio.join(workdir, "learned_embeds.safetensors")
  # embedding_io's form of the vectors: the first encoder's, SDXL's second as vectors_2.
  first, second = vectors[0], (vectors[1] if len(vectors) > 1 else None)
  try:
    if rewrite or not embedding_io.holds_embedding(out, config.placeholder_token, first,
                                                   second):
      embedding_io.save_embedding(out, embedding_io.Concept(
          config.placeholder_token, first, f"{workdir} step {step}", vectors_2=second),
          "diffusers")
  except OSError as e:
    raise run_dir.WorkdirError(
        f"cannot write {out}: {console.one_line(e, limit=300)}; the final checkpoint, step "
        f"{step}, is saved: fix the cause and re-run the same command to write it") from None
  return out
