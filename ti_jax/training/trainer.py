"""The training run: `run(config, workdir)` from start-up checks to the final export.

`python -m ti_jax.train` is its command line. A run reads top to bottom in
`_run_locked`: set up (every input loaded and checked on every process), the
checkpoint (resume or start), the step (frozen params replicated, the pmapped
step compiled), the loop (`train_loop`), and the export of the final vectors.
The batch is sharded over every local device with `jax.pmap` (through
`ti_jax.runtime.parallel`). Re-running the same workdir resumes from the newest
checkpoint; Ctrl-C or SIGTERM saves a checkpoint before returning.

Modules of a run: `checkpointing` (the run's identity, resume checks),
`ti_jax.runtime.run_dir` (the workdir lock, run.json, Orbax checkpoints),
`train_lib` (state, loss, the step), `validation` (validation images), and
`ti_jax.data` (`image_loader`, `latent_cache`, `choices`, `captions`).
"""

from __future__ import annotations

import dataclasses
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
from ti_jax.training import inputs as run_inputs
from ti_jax.training.inputs import RunInputs
from ti_jax.training import config as room_config

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
  """Trains (or resumes) the run in `workdir`; returns {"step", "embeds", "interrupted"}.

  The workdir is locked for the whole run (process 0 takes the lock; a
  refusal stops every process). Raises one of errors.UserError for bad input, a
  failed checkpoint write or a diverged run, and Aborted if a second signal
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
  # --- Set up: every input, loaded and checked on every process ---------------------------
  # A process that fails tells the others, so a multi-host run stops everywhere
  # instead of hanging in the first collective.
  startup_error, inputs = None, None
  try:
    inputs = run_inputs.build(config, workdir, devices)
  except errors.UserError as e:
    startup_error = e
  if parallel.any_process(startup_error is not None):
    raise startup_error or run_dir.WorkdirError(
        "another process of this run failed to start; see the logs of the other processes")

  ckpts = run_dir.Checkpoints(workdir, config.checkpoints_total_limit)
  try:
    # --- Checkpoint: resume the newest usable one, or start at step 0 ---------------------
    metadata = checkpointing.run_metadata(
        config, tokens=inputs.prompts.tokens, token_ids=inputs.prompts.token_ids,
        image_tokens=inputs.prompts.image_tokens, embedding_dim=inputs.table.shape[1],
        model_path=inputs.sd.path, global_batch=inputs.global_batch, base_lr=inputs.base_lr,
        image_paths=inputs.images.paths, prompt_texts_sha256=inputs.prompts.texts.sha256(),
        **({} if inputs.table_2 is None else
           {"token_ids_2": inputs.prompts.token_ids_2,
            "embedding_dim_2": inputs.table_2.shape[1]}))
    state = checkpointing.resume(ckpts, jax.device_get(inputs.state), metadata,
                                 checkpointing.run_identity(config), workdir, inputs.has_run_json)
    start = int(state.step)
    _log_run(config, inputs, len(devices), start)
    tb = open_tensorboard(config, workdir, start)  # a folder it cannot write: refused here
    try:
      # --- The step: frozen params and the state on every device, the step compiled -------
      frozen, settings = step_inputs(config, inputs)
      frozen = bucket_frozen(inputs, parallel.replicate(frozen, devices), devices)
      state = parallel.replicate(state, devices)
      step_fn = compile_step(config, settings, inputs, devices,
                             (state, run_inputs.frozen_for(config, inputs, frozen, start),
                              run_inputs.batch_for(config, inputs, start)))
      validator = make_validator(config, inputs, frozen[0], devices, workdir)
      limit = loop.norm_limit(inputs.table, inputs.init.vectors)
      if inputs.table_2 is not None:
        limit = max(limit, loop.norm_limit(inputs.table_2, inputs.init_2.vectors))

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
  final_params = parallel.unreplicate(state).params
  final = np.asarray(final_params["embeds"])  # [num_vectors, D]
  final_2 = (np.asarray(final_params["embeds_2"]) if "embeds_2" in final_params
             else None)  # SDXL: [num_vectors, D2]
  if interrupted:
    _log(f"stopped at step {step}; checkpoint saved in {ckpts.directory}. "
         "Re-run the same command to resume.")
  elif jax.process_index() == 0:
    active = train_lib.active_vectors(step, config.num_vectors, config.progressive_words)
    out = write_final_embedding(config, workdir, final[:active], step, rewrite=step > start,
                                vectors_2=None if final_2 is None else final_2[:active])
    pair = (f" and {embedding_io.second_file(out)} (the second text encoder's)"
            if final_2 is not None else "")
    _log(f"done: step {step}; learned embedding in {out}{pair}")
  result = {"step": step, "embeds": final, "interrupted": interrupted}
  if final_2 is not None:
    result["embeds_2"] = final_2
  return result


# ---------------------------------------------------------------------------
# Set up: the run's inputs.
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
  (the attention kernel, the batch over them: `batch_sizes`)."""
  devices = list(devices) if devices is not None else parallel.all_devices()
  if config.attention_impl == layers.PALLAS_TPU and devices[0].platform != "tpu":
    raise ConfigError(f"config.attention_impl='{layers.PALLAS_TPU}' needs TPU devices; these "
                      f"are {devices[0].platform} (use '' or 'cudnn' on GPU)")
  run_inputs.batch_sizes(config, len(devices))
  return devices


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
       f"global batch {inputs.global_batch}{accumulation}, {config.optimizer} lr {inputs.base_lr:g} "
       f"({config.lr_scheduler}), "
       f"{inputs.schedule.prediction_type} target, steps {start}->{config.max_train_steps}")
  if config.enable_bucket:
    _log(buckets.describe(inputs.images.buckets, run_inputs.bucket_sizes(inputs.images)))


# ---------------------------------------------------------------------------
# The step: its frozen arguments, settings and compiled form.
# ---------------------------------------------------------------------------


def step_inputs(config, inputs: RunInputs) -> tuple[train_lib.Frozen, train_lib.StepSettings]:
  """The step's frozen arrays (host; replicated by the caller) and its static settings.

  With buckets the latents are the first bucket's; `bucket_frozen` adds the others.
  """
  p = inputs.prompts
  latent_mean, latent_std = inputs.latents[0]
  frozen = train_lib.Frozen(
      unet=inputs.sd.unet_params, text_encoder=inputs.sd.text_encoder_params,
      latent_mean=latent_mean, latent_std=latent_std,
      placeholder_ids=np.asarray(p.token_ids + p.image_token_ids, np.int32),
      schedule=inputs.schedule, init_embeds=np.asarray(inputs.init.vectors, np.float32))
  vae_config = inputs.sd.vae.config
  settings = train_lib.StepSettings(
      unet=inputs.sd.unet, text_encoder=inputs.sd.text_encoder,
      scaling_factor=float(vae_config.scaling_factor),
      shift_factor=float(vae_config.shift_factor), seed=int(config.seed),
      embedding_reg_weight=float(config.embedding_reg_weight),
      progressive_words=int(config.progressive_words),
      gradient_accumulation_steps=int(config.gradient_accumulation_steps),
      snr_gamma=float(config.snr_gamma), noise_offset=float(config.noise_offset))
  if inputs.sd.is_sdxl:
    frozen = frozen.replace(
        text_encoder_2=inputs.sd.text_encoder_2_params,
        placeholder_ids_2=np.asarray(p.token_ids_2, np.int32),
        time_ids=inputs.time_ids[0], init_embeds_2=np.asarray(inputs.init_2.vectors, np.float32))
    # Pool the second encoder at the real end token. SDXL's config says eos id 2, and
    # transformers' legacy rule for it pools at the largest id, which is the added
    # pseudo-word's in every training prompt (diffusers' SDXL script trains so). A1111
    # and ComfyUI, where users load the embedding, pool at the real end token: training
    # the way they sample keeps the pooled text embedding the one those tools compute.
    settings = dataclasses.replace(settings, text_encoder_2=inputs.sd.text_encoder_2,
                                   eos_token_id_2=int(inputs.sd.tokenizer_2.eos_token_id))
  return frozen, settings


def bucket_frozen(inputs: RunInputs, frozen: train_lib.Frozen,
                  devices: Sequence) -> list[train_lib.Frozen]:
  """One replicated `Frozen` per bucket (`frozen`, from `step_inputs`, is the first): the
  same device copies of the weights, each bucket's latents replicated once here, never
  per step. The step compiles one program per bucket shape on first use."""
  out = [frozen]
  for b, (mean, std) in enumerate(inputs.latents[1:], start=1):
    mean, std = parallel.replicate((mean, std), devices)
    bucket = frozen.replace(latent_mean=mean, latent_std=std)
    if inputs.time_ids is not None:  # SDXL: the bucket's views' micro-conditioning
      bucket = bucket.replace(time_ids=parallel.replicate(inputs.time_ids[b], devices))
    out.append(bucket)
  return out


def make_validator(config, inputs: RunInputs, frozen: train_lib.Frozen, devices: Sequence,
                   workdir: str) -> validation.Validation | None:
  """The run's validation images (`validation.make`), sharing the step's device weights.

  SDXL: validation also gets the vectors' ids in tokenizer_2 (and, per validation
  step, the second encoder's vectors; see `train_loop`).
  """
  shared = {"unet": frozen.unet, "text_encoder": frozen.text_encoder}
  if not inputs.sd.is_sdxl:
    return validation.make(config, inputs.sd, inputs.prompts.token_ids, devices, workdir,
                           shared=shared)
  return validation.make(config, inputs.sd, inputs.prompts.token_ids, devices, workdir,
                         shared=dict(shared, text_encoder_2=frozen.text_encoder_2),
                         token_ids_2=inputs.prompts.token_ids_2)


def compile_step(config, settings: train_lib.StepSettings, inputs: RunInputs, devices: Sequence,
                 args: tuple):
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


def write_final_embedding(config, workdir: str, vectors: np.ndarray, step: int,
                          rewrite: bool, vectors_2: np.ndarray | None = None) -> str:
  """Writes the active vectors `[k, D]` as WORKDIR/learned_embeds.safetensors; returns its path.

  An SDXL run (`vectors_2` `[k, D2]`, the second encoder's) writes diffusers' pair:
  learned_embeds.safetensors and learned_embeds_2.safetensors beside it.
  Unless `rewrite` (the run trained), a file that already holds exactly these
  vectors is left alone: a re-run of a finished run in a workdir that has since
  become read-only still reports its result.
  """
  out = fileio.join(workdir, "learned_embeds.safetensors")
  try:
    if rewrite or not embedding_io.holds_embedding(out, config.placeholder_token, vectors,
                                                   vectors_2):
      embedding_io.save_embedding(out, embedding_io.Concept(
          config.placeholder_token, vectors, f"{workdir} step {step}", vectors_2=vectors_2),
          "diffusers")
  except OSError as e:
    raise run_dir.WorkdirError(
        f"cannot write {out}: {console.one_line(e, limit=300)}; the final checkpoint, step "
        f"{step}, is saved: fix the cause and re-run the same command to write it") from None
  return out
