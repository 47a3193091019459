"""The training run: `run(config, workdir)` from start-up checks to the final export.

`python -m ti_jax.train` is its command line. The batch is sharded over every
local device with `jax.pmap` (through `ti_jax.runtime.parallel`). Re-running the
same workdir resumes from the newest checkpoint; Ctrl-C or SIGTERM saves a
checkpoint before returning.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ti_jax import cli, errors
from ti_jax.data import captions, choices, image_loader
from ti_jax.embeddings import pseudo_words
from ti_jax.models import layers
from ti_jax.runtime import fileio, parallel
from ti_jax.sampling import schedulers
from ti_jax.training import checkpointing, train_lib
from ti_jax.weights.loading import ModelLoadError, load_stable_diffusion

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(errors.UserError):
  """A config value is out of range; one-line message."""


class DivergedError(errors.UserError):
  """The loss or the learned vectors stopped being finite (or sane); one-line message."""


class Aborted(Exception):
  """A second stop signal ended the run before its checkpoint was written."""


# Errors that are the user's input, reported as one line without a traceback.

# Largest training resolution: Stable Diffusion models are trained at 512-1024 px,
# and the VAE encoder's first layers hold 128 x R x R float32 activations per
# image (2 GiB at 2048 px), beside R x R x 3 pixels per training view on the host.
MAX_RESOLUTION = 2048


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
  need(c.initializer_token.strip(), "config.initializer_token is empty: give a coarse word, e.g. 'toy'")
  need(c.num_vectors >= 1, f"config.num_vectors must be >= 1, got {c.num_vectors}")
  # Each vector takes one of the text encoder's 77 tokens, 2 of which are start
  # and end (the exact limit, which depends on the templates, is checked later).
  need(c.num_vectors <= 75, f"config.num_vectors {c.num_vectors} cannot fit the text "
       "encoder's 77-token prompts (each vector takes a token; at most 75 fit)")
  need(c.resolution >= 8 and c.resolution % 8 == 0,
       f"config.resolution must be a positive multiple of 8, got {c.resolution}")
  need(c.resolution <= MAX_RESOLUTION,
       f"config.resolution {c.resolution} is above the limit of {MAX_RESOLUTION} px: Stable "
       "Diffusion is trained at 512-1024 px, and encoding larger images needs tens of GB")
  # nan compares False with everything, so each range check below also refuses it.
  for name in ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay",
               "embedding_reg_weight", "flip_p", "per_image_token_p",
               "validation_guidance_scale"):
    need(math.isfinite(float(c[name])), f"config.{name} must be a finite number, got {c[name]}")
  need(c.train_batch_size >= 1, f"config.train_batch_size must be >= 1, got {c.train_batch_size}")
  need(c.remat in (True, False, "auto"), f"config.remat must be True, False or auto, got {c.remat!r}")
  need(c.global_batch_size >= 0, f"config.global_batch_size must be >= 0, got {c.global_batch_size}")
  need(0.0 <= c.per_image_token_p <= 1.0,
       f"config.per_image_token_p must be in [0, 1], got {c.per_image_token_p}")
  need(c.max_train_steps >= 1, f"config.max_train_steps must be >= 1, got {c.max_train_steps}")
  need(c.learning_rate > 0, f"config.learning_rate must be > 0, got {c.learning_rate}")
  for name in ("adam_beta1", "adam_beta2"):
    need(0.0 <= c[name] < 1.0, f"config.{name} must be in [0, 1), got {c[name]}")
  need(c.adam_epsilon > 0, f"config.adam_epsilon must be > 0, got {c.adam_epsilon}")
  need(c.adam_weight_decay >= 0,
       f"config.adam_weight_decay must be >= 0, got {c.adam_weight_decay}")
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
  need(c.seed >= 0, f"config.seed must be >= 0, got {c.seed}")
  need(c.progressive_words >= 0,
       f"config.progressive_words must be >= 0, got {c.progressive_words}")
  need(c.embedding_reg_weight >= 0,
       f"config.embedding_reg_weight must be >= 0, got {c.embedding_reg_weight}")
  need(c.lr_warmup_steps >= 0, f"config.lr_warmup_steps must be >= 0, got {c.lr_warmup_steps}")
  need(c.attention_impl in layers.ATTENTION_IMPLS,
       f"config.attention_impl must be one of {layers.ATTENTION_IMPLS}, got {c.attention_impl!r}")
  if c.validation_prompt:
    need(c.num_validation_images >= 1,
         f"config.num_validation_images must be >= 1, got {c.num_validation_images}")
    need(c.validation_inference_steps >= 1,
         f"config.validation_inference_steps must be >= 1, got {c.validation_inference_steps}")
    need(c.validation_batch_size >= 0,
         f"config.validation_batch_size must be >= 0, got {c.validation_batch_size}")
    try:
      schedulers.make_sampler(c.validation_scheduler, {}, max(c.validation_inference_steps, 2))
    except ValueError as e:
      raise ConfigError(f"config.validation_scheduler: {e}") from None


def _identity(c) -> dict:
  return {k: c[k] for k in checkpointing.IDENTITY_FIELDS}


def enable_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in `path` ("" leaves it off)."""
  if not path:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
  # Cache every program that took over a second to compile (the train step does).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


_log = cli.log


def encode_views(vae, vae_params, views: np.ndarray, chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """VAE posterior (mean, std) of each distinct training view, `[V, h, w, C]` float32 each."""
  encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))
  means, stds = [], []
  for i in range(0, len(views), chunk):
    mean, logvar = encode(vae_params, jnp.asarray(views[i:i + chunk]))
    means.append(np.asarray(mean, np.float32))
    stds.append(np.asarray(jnp.exp(0.5 * logvar), np.float32))
  return np.concatenate(means), np.concatenate(stds)


class _StopFlag:
  """Turns SIGINT/SIGTERM into a flag the loop checks at step boundaries.

  A second signal aborts without saving, except while a checkpoint is being
  written (`saving`): that write always completes, so no step is lost.
  """

  def __init__(self):
    self.signal: int | None = None
    self.saving = False

  def __call__(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.saving:
      _log(f"received {name} while writing a checkpoint: finishing the write first")
      if self.signal is None:
        self.signal = signum
      return
    if self.signal is not None:  # second signal: the user insists
      raise KeyboardInterrupt
    self.signal = signum
    _log(f"\nreceived {name}: saving a checkpoint after this step "
         "(press Ctrl-C again to abort without saving)")


@contextlib.contextmanager
def _stop_on_signals(flag: _StopFlag):
  previous = {}
  for sig in (signal.SIGINT, signal.SIGTERM):
    try:
      previous[sig] = signal.signal(sig, flag)
    except ValueError:  # not the main thread (e.g. tests): no handler
      pass
  try:
    yield flag
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def run(config, workdir: str, devices: Sequence | None = None, progress: bool = True) -> dict:
  """Trains (or resumes) the run in `workdir`; returns {"step", "embeds", "interrupted"}.

  The workdir is locked for the whole run (process 0 takes the lock; a
  refusal stops every process). Raises one of errors.UserError for bad input, a
  failed checkpoint write or a diverged run, and Aborted if a second signal
  cut the run short.
  """
  validate_config(config)
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


def _lock_workdir(workdir: str):
  """(lock or None, whether the workdir was created): process 0 locks, all learn the outcome."""
  lock, error, created = None, None, False
  if jax.process_index() == 0:
    created = not fileio.exists(workdir)
    try:
      lock = checkpointing.lock_workdir(workdir)
    except checkpointing.WorkdirError as e:
      error = e
  if parallel.any_process(error is not None):
    raise error or checkpointing.WorkdirError(
        "process 0 of this run could not lock the workdir; see its log")
  return lock, created


def _remove_unclaimed_workdir(workdir: str) -> None:
  """Removes a workdir this run created if a failed start left only its lock in it."""
  if fileio.is_remote(workdir) or not os.path.isdir(workdir):
    return
  if os.listdir(workdir) == [fileio.LOCK_NAME]:
    os.unlink(os.path.join(workdir, fileio.LOCK_NAME))
    os.rmdir(workdir)


def _check_prompts_fit(tokenizer, templates, tokens: list[str], image_tokens: list[str]) -> None:
  """Refuses a vector count whose prompts would be cut off by the text encoder's token limit."""
  limit = int(tokenizer.model_max_length)
  count = lambda text: len(tokenizer(text).input_ids)  # with the start/end tokens
  # Tokens the longest template takes besides the placeholder (one token for "x").
  overhead = max(count(t.format("x")) - 1 for t in templates)
  if image_tokens:
    overhead += max(count(captions.with_image_token("x", t)) - count("x") for t in image_tokens)
  room = limit - overhead
  if len(tokens) > room:
    raise ConfigError(
        f"config.num_vectors {len(tokens)} does not fit the prompts: the longest training "
        f"template takes {overhead} of the text encoder's {limit} tokens, leaving room for "
        f"at most {max(room, 0)} vectors")


def _run_locked(config, workdir: str, devices: Sequence | None, progress: bool) -> dict:
  """`run` once the workdir is locked."""
  enable_compilation_cache(config.compilation_cache_dir)
  devices = list(devices) if devices is not None else parallel.all_devices()
  if config.attention_impl == layers.PALLAS_TPU and devices[0].platform != "tpu":
    raise ConfigError(f"config.attention_impl='{layers.PALLAS_TPU}' needs TPU devices; these "
                      f"are {devices[0].platform} (use '' or 'cudnn' on GPU)")
  num_devices = len(devices)  # over all processes
  # Load and check every input. A process that fails tells the others, so a
  # multi-host run stops everywhere instead of hanging in the first collective.
  startup_error = None
  try:
    has_run_json = checkpointing.check_identity(workdir, _identity(config))

    try:
      images = load_images(config.train_data_dir, config.resolution, config.center_crop)
    except MemoryError:
      raise ConfigError(f"config.resolution {config.resolution}: not enough host memory to "
                        "hold the training images at that size") from None
    for warning in images.warnings:
      _log(f"warning: {warning}")
    templates = captions.templates_for(config.learnable_property)

    dtype = _DTYPES[config.dtype]
    sd = load_stable_diffusion(
        config.pretrained_model_name_or_path, dtype=dtype, param_dtype=dtype,
        vae_dtype=_DTYPES[config.vae_dtype], variant=config.variant or None,
        revision=config.revision or None, allow_pickle=config.allow_pickle,
        attention_impl=config.attention_impl or None, cache_dir=config.cache_dir,
        remat=config.remat is True)
    try:
      schedule = schedulers.noise_schedule_from_config(sd.scheduler_config)
    except ValueError as e:
      raise ModelLoadError(f"{sd.path}: scheduler config: {e}") from None
    latent_size = config.resolution // 2 ** (len(sd.vae.config.block_out_channels) - 1)
    if latent_size % 2 ** (len(sd.unet.config.block_out_channels) - 1):
      raise ConfigError(f"config.resolution {config.resolution} gives {latent_size}px latents, "
                        "which the UNet cannot downsample evenly")

    token_ids = pseudo_words.add_placeholder_tokens(sd.tokenizer, config.placeholder_token,
                                                  config.num_vectors)
    tokens = pseudo_words.placeholder_tokens(config.placeholder_token, config.num_vectors)
    # Paper ablation: a token per training image, mixed into some prompts.
    image_tokens = (pseudo_words.per_image_tokens(config.placeholder_token, images.num_images)
                    if config.per_image_tokens else [])
    image_token_ids = pseudo_words.add_new_tokens(sd.tokenizer, image_tokens) if image_tokens else []
    _check_prompts_fit(sd.tokenizer, templates, tokens, image_tokens)
    table = np.asarray(pseudo_words.token_table(sd.text_encoder, sd.text_encoder_params),
                       np.float32)
    if config.init_embedding:
      init = _init_from_embedding(config.init_embedding, config.num_vectors, table.shape[1])
    else:
      init = pseudo_words.initializer_vectors(sd.tokenizer, table, config.initializer_token,
                                            config.num_vectors)
    if not np.all(np.isfinite(init.vectors)):
      raise ConfigError("the initial vectors are not finite (NaN or inf): "
                        + (f"config.init_embedding {config.init_embedding} holds such values"
                           if config.init_embedding else "the model's token table holds them"))
    _log(init.note)
    template_ids, image_template_ids = prompt_tables(sd.tokenizer, templates, tokens,
                                                    image_tokens)

    flip = config.flip_p > 0
    try:
      views = image_loader.view_pixels(images.pixels, flip)  # [V, R, R, 3]
      _log(f"encoding {len(views)} training view(s) of {images.num_images} image(s) with the "
           "VAE once")
      latent_mean, latent_std = encode_views(sd.vae, sd.vae_params, views)
    except MemoryError:
      raise ConfigError(f"config.resolution {config.resolution}: not enough memory to encode "
                        "the training images at that size") from None

    if config.global_batch_size:
      if config.global_batch_size % num_devices:
        raise ConfigError(f"config.global_batch_size {config.global_batch_size} is not divisible "
                          f"by the {num_devices} devices")
      per_device_batch = config.global_batch_size // num_devices
    else:
      per_device_batch = config.train_batch_size
    global_batch = per_device_batch * num_devices
    base_lr = config.learning_rate * (global_batch if config.scale_lr else 1)
    lr = train_lib.learning_rate_schedule(base_lr, config.lr_scheduler, config.lr_warmup_steps,
                                          config.max_train_steps)
    optimizer = train_lib.make_optimizer(lr, config.adam_beta1, config.adam_beta2,
                                         config.adam_epsilon, config.adam_weight_decay)
    # Per-image vectors start where S* starts (its first vector).
    image_init = np.repeat(init.vectors[:1], len(image_tokens), axis=0) if image_tokens else None
    state = train_lib.init_state(init.vectors, optimizer, image_init)
  except errors.UserError as e:
    startup_error = e
  if parallel.any_process(startup_error is not None):
    raise startup_error or checkpointing.WorkdirError(
        "another process of this run failed to start; see the logs of the other processes")
  ckpts = checkpointing.Checkpoints(workdir, config.checkpoints_total_limit)
  try:
    return _train(config, workdir, ckpts, devices, progress, sd=sd, images=images,
                  templates=templates, schedule=schedule, tokens=tokens, token_ids=token_ids,
                  image_tokens=image_tokens, image_token_ids=image_token_ids, table=table,
                  init=init, template_ids=template_ids, image_template_ids=image_template_ids,
                  latent_mean=latent_mean, latent_std=latent_std,
                  per_device_batch=per_device_batch, global_batch=global_batch,
                  base_lr=base_lr, lr=lr, optimizer=optimizer, state=state,
                  has_run_json=has_run_json)
  finally:
    ckpts.close()


def _restore_checkpoint(ckpts, start_state, metadata: dict, workdir: str):
  """(state, step, saved metadata) of the newest usable checkpoint, or (start_state, None, None).

  An unreadable checkpoint (corrupt files, non-finite vectors) is moved to
  unreadable_checkpoints/ with a warning and the next older one is tried. A
  readable one made by another run (its own metadata says so) is refused.
  """
  for step in reversed(ckpts.all_steps()):
    try:
      untyped, saved_meta = ckpts.restore_untyped(step)
    except checkpointing.UnreadableCheckpointError as e:
      moved = ckpts.set_aside(step)
      _log(f"warning: skipping checkpoint {step} in {ckpts.directory}: {e.why}; "
           f"moved it to {moved}")
      continue
    diffs = checkpointing.identity_diffs(saved_meta, metadata)
    if diffs:
      raise checkpointing.WorkdirError(
          f"checkpoint {step} in {workdir} was made by another run ({'; '.join(diffs)}); "
          "use a new --workdir or restore the original settings to resume")
    want = jax.tree_util.tree_map(np.shape, start_state.params)
    saved_shapes = jax.tree_util.tree_map(np.shape, untyped["state"]["params"])
    if saved_shapes != want:
      raise checkpointing.WorkdirError(
          f"checkpoint {step} in {workdir} holds vectors of shapes {saved_shapes}, this run "
          f"needs {want} (did the number of training images change?); use a new --workdir")
    abstract = {"state": start_state}
    if "rng" in untyped:  # checkpoints of older versions also stored the seed's key
      abstract["rng"] = np.asarray(untyped["rng"])
    try:
      restored, _ = ckpts.restore(step, abstract)
    except checkpointing.UnreadableCheckpointError as e:
      moved = ckpts.set_aside(step)
      _log(f"warning: skipping checkpoint {step} in {ckpts.directory}: {e.why}; "
           f"moved it to {moved}")
      continue
    return restored["state"], step, saved_meta
  return start_state, None, None


def _train(config, workdir, ckpts, devices, progress, *, sd, images, templates, schedule, tokens,
           token_ids, image_tokens, image_token_ids, table, init, template_ids,
           image_template_ids, latent_mean, latent_std, per_device_batch, global_batch, base_lr,
           lr, optimizer, state, has_run_json) -> dict:
  """Resumes from the newest usable checkpoint and runs the training loop."""
  num_devices = len(devices)
  local_count = len(parallel.addressable(devices))
  is_main = jax.process_index() == 0
  metadata = {
      "placeholder_token": config.placeholder_token, "placeholder_tokens": tokens,
      "token_ids": token_ids, "initializer_token": config.initializer_token,
      "per_image_tokens": image_tokens,
      "num_vectors": config.num_vectors, "embedding_dim": int(table.shape[1]),
      "pretrained_model_name_or_path": config.pretrained_model_name_or_path,
      "model_path": sd.path, "learnable_property": config.learnable_property,
      "resolution": config.resolution, "seed": config.seed,
      "global_batch": global_batch, "learning_rate": base_lr,
      # Where the images were, wherever the run is read from later (evaluate).
      "train_data_path": (config.train_data_dir if fileio.is_remote(config.train_data_dir)
                          else os.path.abspath(config.train_data_dir)),
      "image_files": [os.path.basename(p) for p in images.paths],
      "config": json.loads(config.to_json()),
  }
  had_checkpoints = bool(ckpts.all_steps())
  state, start, saved_meta = _restore_checkpoint(ckpts, jax.device_get(state), metadata, workdir)
  if start is not None:
    if saved_meta.get("global_batch", global_batch) != global_batch:
      _log(f"warning: resuming with global batch {global_batch} (lr {base_lr:g}) where the run "
           f"used {saved_meta['global_batch']} (lr {saved_meta.get('learning_rate')}): "
           "train_batch_size is per device and the device count changed "
           "(set config.global_batch_size to keep it fixed)")
    _log(f"resuming from step {start} in {workdir}")
  elif had_checkpoints:
    _log(f"no readable checkpoint left in {ckpts.directory}: starting from step 0")
  elif has_run_json:
    _log(f"{workdir} holds this run but no checkpoint yet: starting from step 0")
  # run.json caches the identity the checkpoints carry; (re)written once it is
  # known to match them, so a failed start leaves none.
  error = None
  if is_main and not has_run_json:
    try:
      checkpointing.write_identity(workdir, _identity(config))
    except checkpointing.WorkdirError as e:
      error = e
  if parallel.any_process(error is not None):
    raise error or checkpointing.WorkdirError("process 0 could not write run.json; see its log")
  start = int(state.step)

  extra = f" and {len(image_tokens)} per-image tokens" if image_tokens else ""
  _log(f"training {tokens}{extra} on {num_devices} device(s) ({jax.devices()[0].platform}), "
       f"global batch {global_batch}, lr {base_lr:g} ({config.lr_scheduler}), "
       f"{schedule.prediction_type} target, steps {start}->{config.max_train_steps}")

  frozen = train_lib.Frozen(
      unet=sd.unet_params, text_encoder=sd.text_encoder_params,
      latent_mean=latent_mean, latent_std=latent_std,
      placeholder_ids=np.asarray(token_ids + image_token_ids, np.int32), schedule=schedule,
      init_embeds=np.asarray(init.vectors, np.float32))
  settings = train_lib.StepSettings(
      unet=sd.unet, text_encoder=sd.text_encoder,
      scaling_factor=float(sd.vae.config.scaling_factor),
      shift_factor=float(sd.vae.config.shift_factor), seed=int(config.seed),
      embedding_reg_weight=float(config.embedding_reg_weight),
      progressive_words=int(config.progressive_words))
  frozen = parallel.replicate(frozen, devices)
  state = parallel.replicate(state, devices)
  # Norm above which a vector has diverged (see MAX_NORM_FACTOR).
  norm_limit = MAX_NORM_FACTOR * max(float(np.linalg.norm(table, axis=-1).max()),
                                     float(np.linalg.norm(init.vectors, axis=-1).max()))

  validator = _make_validator(config, sd, token_ids, devices, workdir,
                              shared={"unet": frozen.unet, "text_encoder": frozen.text_encoder})
  flag = _StopFlag()

  def check_sane(step: int, loss: float | None, params: dict | None, norm: float | None) -> None:
    """Raises DivergedError if the loss or the vectors are not finite or too large."""
    if params is not None:
      norm = max(float(np.linalg.norm(np.asarray(v), axis=-1).max()) for v in params.values())
    bad = [f"loss {loss}"] if loss is not None and not math.isfinite(loss) else []
    if norm is not None and not norm <= norm_limit:  # also catches nan
      bad.append(f"largest vector norm {norm:.3g} (limit {norm_limit:.3g})")
    if bad:
      last = ckpts.latest_step()
      kept = (f"the last finite checkpoint, step {last}, is kept" if last is not None
              else "no checkpoint was written")
      raise DivergedError(f"training diverged by step {step} ({', '.join(bad)}); {kept}. Lower "
                          "config.learning_rate or check the adam_* settings")

  def save(step: int) -> None:
    host_state = parallel.unreplicate(state)
    check_sane(step, None, host_state.params, None)
    # With progressive_words, later vectors may not have entered training yet.
    active = train_lib.active_vectors(step, config.num_vectors, config.progressive_words)
    flag.saving = True  # a further signal waits for this write instead of cutting it short
    try:
      ckpts.save(step, {"state": host_state}, dict(metadata, step=step, active_vectors=int(active)))
    finally:
      flag.saving = False

  def batch_for(step: int) -> dict:
    # This process's share of the global batch (all of it on one host).
    offset = jax.process_index() * per_device_batch * local_count
    example_index = offset + np.arange(per_device_batch * local_count)
    view_index, template_index = choices.example_choices(
        config.seed, step, example_index, global_batch_size=global_batch,
        num_images=images.num_images, flip_p=config.flip_p, num_templates=len(templates))
    k = train_lib.active_vectors(step, config.num_vectors, config.progressive_words)
    mixed = (choices.per_image_choices(config.seed, step, example_index, config.per_image_token_p)
             if image_tokens else None)
    input_ids = batch_input_ids(template_ids, image_template_ids, k, template_index, view_index,
                                mixed)
    batch = {"input_ids": input_ids, "view_index": view_index,
             "example_index": example_index.astype(np.int32)}
    return parallel.shard(batch, local_count)

  # remat="auto": rematerialise only if the plain step does not fit a TPU chip.
  limit = train_lib.device_memory_limit(devices[0]) if config.remat == "auto" and \
      devices[0].platform == "tpu" else None
  settings, step_fn, remat = train_lib.remat_if_needed(settings, optimizer, lr, devices,
                                                       (state, frozen, batch_for(start)), limit)
  if remat:
    _log("remat=auto: the step does not fit the device memory without remat; rematerialising")

  # Drop records past the restored step: a killed run logged steps it is about to redo.
  try:
    metrics_log = fileio.LineLog(fileio.join(workdir, "metrics.jsonl"), enabled=is_main,
                                 keep=lambda line: json.loads(line).get("step", 0) <= start)
  except (OSError, UnicodeDecodeError) as e:
    raise checkpointing.WorkdirError(f"cannot open {fileio.join(workdir, 'metrics.jsonl')}: "
                                     f"{checkpointing.one_line(e)}") from None
  bar = _progress_bar(start, config.max_train_steps, progress and is_main)
  interrupted = False
  step = start
  last_log_time, last_log_step = time.perf_counter(), start
  loss_sum, loss_count = None, 0  # device-side running sum: no host sync between logs
  try:
    with _stop_on_signals(flag):
      next_batch = batch_for(step) if step < config.max_train_steps else None
      if step < config.max_train_steps:
        _log("compiling the training step (the first step takes a while)")
      while step < config.max_train_steps:
        state, metrics = step_fn(state, frozen, next_batch)
        step += 1
        loss_sum = metrics["loss"] if loss_sum is None else loss_sum + metrics["loss"]
        loss_count += 1
        if step == start + 1:  # the first call compiles; keep that out of the step times
          jax.block_until_ready(metrics)
          _log(f"compiled and ran the first step in {time.perf_counter() - last_log_time:.1f}s")
          last_log_time, last_log_step = time.perf_counter(), step
        # Build the next batch while the device computes this one.
        next_batch = batch_for(step) if step < config.max_train_steps else None
        # Every process stops at the same step when any of them was signalled; with
        # several processes that takes a collective, so it is asked at log steps only.
        at_log = step % config.log_every_steps == 0 or step == config.max_train_steps
        stop = (parallel.any_process(flag.signal is not None)
                if at_log or jax.process_count() == 1 else False)
        if at_log or stop:
          m = {k: float(parallel.unreplicate(v)) for k, v in metrics.items()}
          m["loss"] = float(parallel.unreplicate(loss_sum)) / loss_count  # mean since last log
          loss_sum, loss_count = None, 0
          # A nan in any step since the last log makes the summed loss nan.
          check_sane(step, m["loss"], None, m["max_vector_norm"])
          record = {"step": step, **m, "time": time.time()}
          postfix = {"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}"}
          now = time.perf_counter()
          if step > last_log_step:  # no timing for an interval that held only the compile
            step_time = (now - last_log_time) / (step - last_log_step)
            record.update(step_time_s=step_time, images_per_sec=global_batch / step_time)
            postfix.update(step_s=f"{step_time:.3f}", img_s=f"{global_batch / step_time:.1f}")
          last_log_time, last_log_step = now, step
          metrics_log.write(json.dumps(record) + "\n")
          bar.set_postfix(postfix)
        bar.update(1)
        if step % config.checkpointing_steps == 0:
          save(step)
          last_log_time, last_log_step = time.perf_counter(), step
        if validator and not stop and (step % config.validation_steps == 0
                                       or step == config.max_train_steps):
          validator(step, parallel.unreplicate(state).params["embeds"])
          last_log_time, last_log_step = time.perf_counter(), step
        if stop:
          interrupted = True
          break
      save(step)
  except OSError as e:  # metrics.jsonl or a validation image (checkpoints raise their own)
    last = ckpts.latest_step()
    raise checkpointing.WorkdirError(
        f"cannot write to {workdir} at step {step}: {checkpointing.one_line(e)}; the last good "
        f"checkpoint is step {last if last is not None else 'none'}") from None
  except KeyboardInterrupt:
    last = ckpts.latest_step()
    raise Aborted(f"aborted by a second signal at step {step} without saving; the last "
                  f"checkpoint is step {last if last is not None else 'none'}") from None
  finally:
    bar.close()  # ends the bar's line, so an error message starts on its own line
    metrics_log.close()
  ckpts.wait()
  final = np.asarray(parallel.unreplicate(state).params["embeds"])
  if interrupted:
    _log(f"stopped at step {step}; checkpoint saved in {ckpts.directory}. "
         "Re-run the same command to resume.")
  elif is_main:
    out = fileio.join(workdir, "learned_embeds.safetensors")
    active = train_lib.active_vectors(step, config.num_vectors, config.progressive_words)
    try:
      # A re-run of a finished run finds the file already right: no write, so a
      # workdir that has become read-only since still reports its result.
      if step > start or not _file_holds(out, config.placeholder_token, final[:active]):
        checkpointing.write_learned_embeds(out, tokens, final[:active], config.placeholder_token)
    except OSError as e:
      raise checkpointing.WorkdirError(
          f"cannot write {out}: {checkpointing.one_line(e)}; the final checkpoint, step "
          f"{step}, is saved: fix the cause and re-run the same command to write it") from None
    _log(f"done: step {step}; learned embedding in {out}")
  return {"step": step, "embeds": final, "interrupted": interrupted}


def _file_holds(path: str, key: str, vectors: np.ndarray) -> bool:
  """True if the safetensors file `path` exists and holds exactly `vectors` under `key`."""
  from ti_jax.weights import safetensors_io  # pylint: disable=import-outside-toplevel
  if not fileio.exists(path):
    return False
  try:
    saved = safetensors_io.load(path).get(key)
  except Exception:  # pylint: disable=broad-except  # unreadable: rewrite it
    return False
  return saved is not None and np.array_equal(np.asarray(saved), vectors)


def prompt_tables(tokenizer, templates, tokens: list[str], image_tokens: list[str]):
  """Token ids of every training prompt, so a step only indexes (no tokenizing in the loop).

  Returns:
    `[n, num_templates, T]`: the templates filled with the first k of the n
    vectors' tokens, for every k (progressive_words grows k during training;
    otherwise only k = n is used); and, with per-image tokens,
    `[n, N, num_templates, T]` with "S* with S_i" for each image i (else None).
  """
  n = len(tokens)
  fill = lambda text: captions.tokenize(tokenizer, captions.build_prompts(
      np.arange(len(templates)), templates, text))
  template_ids = np.stack([fill(" ".join(tokens[:k])) for k in range(1, n + 1)])
  if not image_tokens:
    return template_ids, None
  image_template_ids = np.stack([
      np.stack([fill(captions.with_image_token(" ".join(tokens[:k]), t)) for t in image_tokens])
      for k in range(1, n + 1)])
  return template_ids, image_template_ids


def batch_input_ids(template_ids, image_template_ids, active: int, template_index, view_index,
                    mixed) -> np.ndarray:
  """`[b, T]` prompt ids of a batch: `active` vectors; per-image prompts where `mixed`.

  A per-image prompt names the token of the example's own image: view v shows
  image v mod N (views N..2N-1 are the mirrors, see `image_loader.view_pixels`).
  """
  ids = template_ids[active - 1][template_index]  # [b, T]
  if image_template_ids is None:
    return ids
  num_images = image_template_ids.shape[1]
  image = np.asarray(view_index) % num_images
  return np.where(np.asarray(mixed)[:, None],
                  image_template_ids[active - 1][image, template_index], ids)


def load_images(folder: str, resolution: int, center_crop: bool) -> image_loader.TrainingImages:
  """The training images of `folder`, copied from gs:// to a local folder first when remote."""
  if not fileio.is_remote(folder):
    return image_loader.load_training_images(folder, resolution, center_crop)
  import tempfile  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    try:
      fileio.copy_tree_to_local(folder, tmp)
    except OSError as e:
      raise image_loader.DataError(f"cannot read training images from {folder}: {e}") from None
    return image_loader.load_training_images(tmp, resolution, center_crop)


def _init_from_embedding(spec: str, num_vectors: int, dim: int) -> pseudo_words.Initializer:
  from ti_jax.embeddings import embedding_io  # pylint: disable=import-outside-toplevel
  try:
    concepts = embedding_io.load_concepts(spec)
  except (embedding_io.EmbeddingFileError, checkpointing.WorkdirError) as e:
    raise ConfigError(f"config.init_embedding: {e}") from None
  if len(concepts) != 1:  # PATH:TOKEN picks one of them (embedding_io.load_concepts)
    raise ConfigError(f"config.init_embedding: {spec} holds {len(concepts)} tokens "
                      f"({', '.join(c.token for c in concepts)}); pick one as "
                      f"{spec}:{concepts[0].token}")
  vectors = concepts[0].vectors
  if vectors.shape != (num_vectors, dim):
    raise ConfigError(f"config.init_embedding: {spec} has shape {tuple(vectors.shape)}, "
                      f"but this run needs ({num_vectors}, {dim}) (num_vectors, model width)")
  return pseudo_words.Initializer(vectors, f"initialised {num_vectors} vector(s) from {spec}")


def _make_validator(config, sd, token_ids, devices, workdir, shared=None):
  """A `fn(step, learned_vectors)` that writes validation PNGs, or None without a prompt.

  The generator is built on first use and reuses `shared` (the step's replicated
  UNet and text-encoder params), so validation adds only the VAE to device memory.
  """
  if not config.validation_prompt:
    return None
  from ti_jax.sampling import generation  # pylint: disable=import-outside-toplevel
  prompt = config.validation_prompt.replace("{}", config.placeholder_token)
  prompt = pseudo_words.expand_placeholder(prompt, config.placeholder_token, config.num_vectors)
  out_dir = fileio.join(workdir, "validation")
  generator = None

  def validate(step, learned):
    nonlocal generator
    if generator is None:
      generator = generation.ImageGenerator(
          sd, scheduler=config.validation_scheduler,
          num_inference_steps=config.validation_inference_steps,
          guidance_scale=config.validation_guidance_scale, height=config.resolution,
          width=config.resolution, devices=devices, replicated_params=shared)
    # Every process takes part in generating; process 0 writes each batch as it is done.
    for start, images in generation.image_batches(
        generator, prompt, config.num_validation_images,
        batch_size=config.validation_batch_size, seed=config.seed,
        learned=[(np.asarray(learned), token_ids)]):
      if jax.process_index() != 0:
        continue
      fileio.makedirs(out_dir)
      for i, image in enumerate(images, start):
        generation.save_png(fileio.join(out_dir, f"step{step:06d}_{i}.png"), image,
                          {"prompt": prompt, "step": str(step), "seed": str(config.seed)})
  return validate


def _progress_bar(start: int, total: int, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
              disable=not enabled, file=sys.stderr)
