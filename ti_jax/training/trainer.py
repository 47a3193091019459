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

import os
from typing import Callable, Sequence

import jax
import numpy as np

from ti_jax import errors
from ti_jax.data import buckets
from ti_jax.embeddings import embedding_io, embedding_writer, file_names
from ti_jax.models import layers
from ti_jax.runtime import console, fileio, parallel, run_dir
from ti_jax.training import checkpointing, loop, tensorboard, train_lib, validation
from ti_jax.training.config import ConfigError, validate_config
from ti_jax.training import inputs as run_inputs
from ti_jax.training.inputs import RunInputs

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
  if config.get("concepts_file", ""):
    raise ConfigError("config.concepts_file is set: a run of many concepts is "
                      "ti_jax.training.concepts_run.run's (python -m ti_jax.train runs either)")
  devices = check_devices(config, devices)  # before the lock: a refusal writes nothing
  workdir = fileio.resolve(workdir)  # a local folder or gs://...
  return in_locked_workdir(workdir, lambda: _run_locked(config, workdir, devices, progress))


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
      sharded = shard_weights(config, settings, inputs, devices, state, frozen, start)
      if sharded:  # the mesh step, the weights split over the devices
        state, frozen, step_fn = compile_mesh_step(config, settings, inputs, devices, state,
                                                   frozen, start)
      else:
        frozen = run_inputs.bucket_frozen(inputs, parallel.replicate(frozen, devices), devices)
        state = parallel.replicate(state, devices)
        step_fn = compile_step(config, settings, inputs, devices,
                               (state, run_inputs.frozen_for(config, inputs, frozen, start),
                                run_inputs.batch_for(config, inputs, start)))
      validator = make_validator(config, inputs, None if sharded else frozen[0], devices,
                                 workdir)
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


def in_locked_workdir(workdir: str, body: Callable[[], dict]) -> dict:
  """`body()` with `workdir` locked for all of it (process 0 takes the lock; a refusal stops
  every process). If `body` fails and the workdir it was given is new and holds only the
  lock, the workdir is removed again."""
  lock, created = _lock_workdir(workdir)
  try:
    return body()
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


def check_devices(config, devices: Sequence | None, batch_devices: int | None = None) -> list:
  """The run's devices over all processes (default: every device), checked against the config
  (the attention kernel, the batch over `batch_devices` of them (default all):
  `inputs.batch_sizes`)."""
  devices = list(devices) if devices is not None else parallel.all_devices()
  if config.attention_impl == layers.PALLAS_TPU and devices[0].platform != "tpu":
    raise ConfigError(f"config.attention_impl='{layers.PALLAS_TPU}' needs TPU devices; these "
                      f"are {devices[0].platform} (use '' or 'cudnn' on GPU)")
  run_inputs.batch_sizes(config, batch_devices or len(devices))
  return devices


def _build_inputs(config, workdir: str, devices: Sequence) -> RunInputs:
  """`inputs.build` on every process. A process that fails tells the others, so a multi-host
  run stops everywhere instead of hanging in the first collective."""
  return parallel.on_every_process(
      lambda: run_inputs.build(config, workdir, devices), errors.UserError,
      lambda: run_dir.WorkdirError(
          "another process of this run failed to start; see the logs of the other processes"))


def run_metadata(config, inputs: RunInputs) -> dict:
  """What every checkpoint of the run carries (`checkpointing.run_metadata`)."""
  p = inputs.prompts
  first, *further = inputs.concepts
  return checkpointing.run_metadata(
      config, tokens=p.tokens, image_tokens=p.image_tokens, model_path=inputs.sd.path,
      global_batch=inputs.global_batch, base_lr=inputs.base_lr, image_paths=inputs.images.paths,
      prompt_texts_sha256=p.texts.sha256(), token_ids=first.token_ids,
      embedding_dim=first.table.shape[1],
      further_encoders=[(c.suffix, c.token_ids, c.table.shape[1]) for c in further])


def open_tensorboard(config, workdir: str, start: int) -> tensorboard.Writer | None:
  """Process 0's TensorBoard writer with config.report_to="tensorboard" (else None); a
  WORKDIR/tensorboard it cannot write stops every process with one line."""
  if config.report_to != "tensorboard":
    return None
  return parallel.on_every_process(
      lambda: tensorboard.open_writer(config.report_to, workdir, start, jax.process_index() == 0),
      tensorboard.TensorBoardError,
      lambda: tensorboard.TensorBoardError(
          "process 0 of this run could not open its TensorBoard events; see its log"))


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


def make_validator(config, inputs: RunInputs, frozen: train_lib.Frozen | None,
                   devices: Sequence, workdir: str) -> validation.Validation | None:
  """The run's validation images (`validation.make`), sharing the step's replicated device
  weights (`frozen`): the UNet's and each text encoder's params, under its pipeline role.
  None (sharded weights): validation replicates its own."""
  shared = {} if frozen is None else {
      "unet": frozen.unet,
      **{c.encoder.role: params for c, params in zip(inputs.concepts, frozen.text_encoders)}}
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


def shard_weights(config, settings: train_lib.StepSettings, inputs: RunInputs,
                  devices: Sequence, state, frozen: train_lib.Frozen, start: int) -> bool:
  """config.shard_weights; "auto": on TPU, whether the step with replicated weights would not
  fit the chip (decided on shapes: nothing is placed)."""
  if config.shard_weights != "auto":
    return bool(config.shard_weights)
  limit = train_lib.device_memory_limit(devices[0]) if devices[0].platform == "tpu" else None
  batch = run_inputs.batch_for(config, inputs, start)  # [local devices, b, ...]
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                  (state, frozen))
  args = (*parallel.replicate(shapes, devices), jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((len(devices),) + x.shape[1:], x.dtype), batch))
  if train_lib.replicated_weights_fit(settings, inputs.optimizer, inputs.lr, devices, args,
                                      limit, remat=config.remat is not False):
    return False
  _log(f"shard_weights=auto: the step does not fit the device memory with a copy of the weights "
       f"on each device; sharding them over {len(devices)} devices")
  return True


def compile_mesh_step(config, settings: train_lib.StepSettings, inputs: RunInputs,
                      devices: Sequence, state, frozen: train_lib.Frozen, start: int):
  """With shard_weights: (state `[1, ...]`, one `Frozen` per bucket, step) on a mesh of one
  concept over every device, the weights FSDP-sharded (`train_lib.make_mesh_step`; remat as
  `compile_step`). The step takes and gives what the pmapped one does (the loop's batches
  `[local devices, b, ...]`, metrics without the mesh step's per-concept "finite")."""
  mesh = parallel.make_mesh(devices, 1)
  stacked = train_lib.stack_frozen([frozen])
  placed = parallel.put(stacked, mesh, train_lib.mesh_frozen_specs(stacked, len(devices), True))
  buckets = [placed]
  for b, (mean, std) in enumerate(inputs.latents[1:], start=1):  # each bucket's latents once
    own = {"latent_mean": mean[None], "latent_std": std[None],
           "time_ids": None if inputs.time_ids is None else inputs.time_ids[b][None]}
    buckets.append(placed.replace(**parallel.put(own, mesh, parallel.concept_spec())))
  state = parallel.put(parallel.stack([state]), mesh, parallel.concept_spec())
  slots = parallel.put(train_lib.concept_slots([config.seed], [1.0]), mesh,
                       parallel.concept_spec())

  def mesh_batch(batch):  # the pmapped layout [d, b, ...] -> [1, d * b, ...] over the data axis
    return parallel.put_process_batch(
        jax.tree_util.tree_map(lambda x: x.reshape((1, -1) + x.shape[2:]), batch), mesh)
  limit = (train_lib.device_memory_limit(devices[0])
           if config.remat == "auto" and devices[0].platform == "tpu" else None)
  first = (state, run_inputs.frozen_for(config, inputs, buckets, start),
           mesh_batch(run_inputs.batch_for(config, inputs, start)), slots)
  _, step, remat = train_lib.mesh_remat_if_needed(settings, inputs.make_optimizer, inputs.lr,
                                                  mesh, first, limit)
  if remat:
    _log("remat=auto: the step does not fit the device memory without remat; rematerialising")

  def step_fn(state, frozen, batch):
    state, metrics = step(state, frozen, mesh_batch(batch), slots)
    return state, {k: v for k, v in metrics.items() if k != "finite"}
  return state, buckets, step_fn


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
    pair = (f" and {file_names.second_file(out)} (the second text encoder's)"
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
  per_encoder = tuple(vectors)
  try:
    if rewrite or not embedding_writer.holds_embedding(out, config.placeholder_token, per_encoder):
      embedding_writer.save_embedding(out, embedding_io.Concept(
          config.placeholder_token, per_encoder, f"{workdir} step {step}"), "diffusers")
  except OSError as e:
    raise run_dir.WorkdirError(
        f"cannot write {out}: {console.one_line(e, limit=300)}; the final checkpoint, step "
        f"{step}, is saved: fix the cause and re-run the same command to write it") from None
  return out
