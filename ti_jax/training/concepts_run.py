"""A run of many concepts (`config.concepts_file`): one compiled mesh step trains them all.

`python -m ti_jax.train --config ... --config.concepts_file=concepts.jsonl` calls `run`.
It tells the run as `trainer.run` does, with K concepts where that has one: the
concepts file read and checked before anything is written (`concepts_file`), the
workdir locked, the base model loaded once and each concept's inputs built with it
(`inputs.build`: images, prompts, its placeholder added to the shared tokenizers,
latents, its step-0 state), resume, the mesh step compiled once for all of them
(`train_lib.make_mesh_step`: concepts over the mesh's concept axis, each concept's
batch over its data axis, several concepts per device batched into one UNet call),
the loop and each concept's export to WORKDIR/<concept>/.

Concept k trained here equals concept k trained alone (`concepts_file.concept_config`):
its own vectors, optimizer state, learning rate and draws from (its seed, step,
example). A concept whose loss or vectors go non-finite (or whose vectors pass the
divergence limit) is frozen at its last finite vectors from the next log step on,
named in one line, recorded in the checkpoints ("non_finite_concepts") and not
exported; the others train on. The run directory's layout is `run_dir`'s.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ti_jax import errors
from ti_jax.models import layers
from ti_jax.runtime import console, fileio, parallel, run_dir
from ti_jax.training import (checkpointing, concepts_file, loop, tensorboard, train_lib, trainer,
                             validation)
from ti_jax.training import inputs as run_inputs
from ti_jax.training.config import ConfigError, validate_config
from ti_jax.training.inputs import RunInputs

_log = console.log


@dataclasses.dataclass(frozen=True)
class Concepts:
  """The run's concepts, in the concept axis' order: each one's spec (from the concepts
  file), config (the run's with its fields: `concept_config`) and inputs."""
  specs: tuple[concepts_file.ConceptSpec, ...]
  configs: tuple[Any, ...]
  inputs: tuple[RunInputs, ...]

  @property
  def names(self) -> list[str]:
    return [s.name for s in self.specs]

  def __len__(self) -> int:
    return len(self.specs)


def run(config, workdir: str, devices: Sequence | None = None, progress: bool = True) -> dict:
  """Trains (or resumes) the many-concept run of config.concepts_file in `workdir`.

  Returns {"step", "interrupted", "concepts": {name: {key: final vectors `[n, D]`}},
  "non_finite": {name: step}}. Errors as `trainer.run`'s; the concepts file is read and
  checked before the workdir is touched (`concepts_file.ConceptsFileError`).
  """
  validate_config(config)
  if not config.concepts_file:
    raise ConfigError("config.concepts_file is empty: a run of one concept is trainer.run's")
  specs = concepts_file.read_concepts_file(config.concepts_file, config)
  # Before the lock: a refusal writes nothing. Each concept's batch is its batch alone on
  # one device (train_batch_size x accumulation, or global_batch_size), however many
  # devices the run has: the concept axis, not the batch, spreads over them.
  devices = trainer.check_devices(config, devices, batch_devices=1)
  config = mesh_attention(config, devices)
  workdir = fileio.resolve(workdir)
  return trainer.in_locked_workdir(
      workdir, lambda: _run_locked(config, specs, workdir, devices, progress))


def mesh_attention(config, devices: Sequence):
  """`config`, or a copy whose attention the mesh step can compile: on TPUs the default
  (`attention_impl=""`) is the Pallas kernel, which `jax.jit` cannot partition over the
  mesh's concept axis, so the run takes XLA's attention (said in one line); an explicit
  "pallas_tpu" is refused in one line."""
  if layers.resolve_attention_impl(config.attention_impl or None, devices) != layers.PALLAS_TPU:
    return config
  if config.attention_impl == layers.PALLAS_TPU:
    raise ConfigError(f"config.attention_impl='{layers.PALLAS_TPU}' cannot train many concepts "
                      "yet (jax.jit does not partition the Pallas kernel over the concept "
                      "axis); use 'xla' or leave it empty")
  _log("many concepts on TPU: XLA attention (the Pallas kernel is not partitioned over the "
       "concept axis yet)")
  c = copy.deepcopy(config)
  with c.unlocked():
    c.attention_impl = "xla"
  return c


def _run_locked(config, specs, workdir: str, devices: list, progress: bool) -> dict:
  """`run` once the workdir is locked: the whole run, in the order it happens."""
  # --- Inputs: the model once, each concept's images, prompts and latents ------------------
  identity = run_identity(config, specs)
  concepts = parallel.on_every_process(
      lambda: build_concepts(config, specs, workdir, devices, identity), errors.UserError,
      lambda: run_dir.WorkdirError(
          "another process of this run failed to start; see the logs of the other processes"))
  first = concepts.inputs[0]
  ckpts = run_dir.Checkpoints(workdir, config.checkpoints_total_limit)
  try:
    # --- Resume: the newest usable checkpoint of the whole run, or step 0 -----------------
    metadata = run_metadata(config, concepts)
    start_state = parallel.stack([i.state for i in concepts.inputs])  # [K, ...] on the host
    state = checkpointing.resume(ckpts, start_state, metadata, identity, workdir,
                                 first.has_run_json)
    start = int(np.asarray(state.step).reshape(-1)[0])
    failed = _failed_at(ckpts, start)
    _log_run(config, concepts, len(devices), start, failed)
    tb = trainer.open_tensorboard(config, workdir, start)
    try:
      # --- Compile: the concepts stacked over the mesh, the step compiled once ----------
      mesh, step_fn, placed = compile_step(config, concepts, devices, state, start, failed)
      validators = make_validators(config, concepts, devices, workdir)
      limits = [max(loop.norm_limit(c.table, c.init.vectors) for c in i.concepts)
                for i in concepts.inputs]

      # --- The loop -----------------------------------------------------------------------
      state, step, interrupted, failed = train_loop(
          config, concepts, mesh, step_fn, placed, start, failed, ckpts, metadata, validators,
          limits, workdir, progress, tb)
    finally:
      if tb is not None:
        tb.close()
    ckpts.wait()
  finally:
    ckpts.close()

  # --- Export: each concept's final vectors in WORKDIR/<concept>/ -----------------------------
  return export(config, concepts, workdir, state, start, step, interrupted, failed,
                ckpts.directory)


# ---------------------------------------------------------------------------
# Inputs, identity and metadata.
# ---------------------------------------------------------------------------


def build_concepts(config, specs, workdir: str, devices: Sequence, identity: dict) -> Concepts:
  """Every concept's `RunInputs` on one model loaded once: each concept's placeholder is
  added to the shared tokenizers in file order (distinct tokens, so distinct ids; the step
  splices each concept's own). A concept's bad input is one line naming its file line."""
  has_run_json = checkpointing.check_identity(workdir, identity)
  model = run_inputs.load_model(config)
  # Batch sizes as on one device (see `run`); the mesh step lays the batches out itself.
  one = list(devices)[:1]
  configs, built = [], []
  for spec in specs:
    c = concepts_file.concept_config(config, spec)
    with concepts_file.concept_errors(config.concepts_file, spec):
      built.append(run_inputs.build(c, workdir, one, model=model, has_run_json=has_run_json))
    configs.append(c)
  shapes = {tuple(i.latents[0][0].shape[1:]) for i in built}
  if len(shapes) > 1:  # one compiled step: one latent shape (resolution is the run's)
    raise ConfigError(f"the concepts' latents differ in shape ({sorted(shapes)})")
  return Concepts(specs=tuple(specs), configs=tuple(configs), inputs=tuple(built))


def run_identity(config, specs) -> dict:
  """run.json of a many-concept run: the run's identity fields and "concepts", each
  concept's `ConceptSpec.record`."""
  return {**checkpointing.run_identity(config),
          run_dir.CONCEPTS_KEY: [s.record() for s in specs]}


def run_metadata(config, concepts: Concepts) -> dict:
  """What every checkpoint carries: the first concept's single-run metadata as the shared
  part (the model, batch, resolution, ... are the run's), the run's config, and "concepts":
  each concept's own metadata (tokens, ids, images, seed, learning rate) with its
  `ConceptSpec.checkpoint_record` (`run_dir.concept_metadata` reads one back)."""
  per_concept = [trainer.run_metadata(c, i) for c, i in zip(concepts.configs, concepts.inputs)]
  entries = []
  for spec, meta in zip(concepts.specs, per_concept):
    own = {k: v for k, v in meta.items() if k != "config"}
    entries.append({**own, **spec.checkpoint_record()})
  return {**per_concept[0], "config": json.loads(config.to_json()),
          run_dir.CONCEPTS_KEY: entries}


def _failed_at(ckpts: run_dir.Checkpoints, start: int) -> dict[str, int]:
  """{name: step} of the concepts frozen as non-finite in the checkpoint resumed (none at 0)."""
  if not start:
    return {}
  return dict(ckpts.restore_metadata(start).get(run_dir.NON_FINITE_KEY) or {})


def _log_run(config, concepts: Concepts, num_devices: int, start: int,
             failed: dict[str, int]) -> None:
  first = concepts.inputs[0]
  _log(f"training {len(concepts)} concepts ({', '.join(concepts.names)}) on {num_devices} "
       f"device(s) ({jax.devices()[0].platform}) in one step, global batch "
       f"{first.global_batch} per concept, {config.optimizer} ({config.lr_scheduler}), "
       f"{first.schedule.prediction_type} target, steps {start}->{config.max_train_steps}")
  if failed:
    _log(f"frozen since going non-finite: "
         f"{', '.join(f'{n} (step {s})' for n, s in failed.items())}")


# ---------------------------------------------------------------------------
# The mesh step.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Placed:
  """The mesh step's arguments on the mesh: state and frozen arrays `[Kp, ...]` (K concepts
  padded to a multiple of the concept shards), the slots, and K."""
  state: Any
  frozen: train_lib.Frozen
  slots: train_lib.ConceptSlots
  num_concepts: int
  padded: int
  seeds: list[int]
  lr_scales: list[float]


def compile_step(config, concepts: Concepts, devices: Sequence, state, start: int,
                 failed: dict[str, int]):
  """(mesh, compiled mesh step, `Placed`): K concepts over `parallel.concept_shards` shards
  (the fewest devices per concept whose padding costs at most one device's share), the
  frozen weights replicated or, with shard_weights, FSDP-sharded; remat as `trainer`.
  The concepts of `failed` (frozen as non-finite) start inactive."""
  first = concepts.inputs[0]
  k = len(concepts)
  # Each concept's micro-batch splits over the devices of its row of the mesh.
  shards = parallel.concept_shards(k, len(devices),
                                   first.global_batch // config.gradient_accumulation_steps)
  mesh = parallel.make_mesh(devices, shards)
  padded = parallel.padded_concepts(k, shards)
  frozens, settings = [], None
  for c, i in zip(concepts.configs, concepts.inputs):
    frozen, s = trainer.step_inputs(c, i)
    frozens.append(frozen)
    settings = settings or s  # the seed is each concept's slot; the rest is the run's
  stacked = train_lib.stack_frozen(frozens, padded)
  sharded = config.shard_weights is True or (config.shard_weights == "auto"
                                              and devices[0].platform == "tpu")
  frozen = parallel.put(stacked, mesh, train_lib.mesh_frozen_specs(stacked, len(devices),
                                                                   sharded))
  # Each concept's rate over the run's schedule shape: lr_k(step) = schedule(step) * base_k.
  unit = train_lib.learning_rate_schedule(1.0, config.lr_scheduler, config.lr_warmup_steps,
                                          config.max_train_steps)
  placed = Placed(state=parallel.put(parallel.pad_stacked(state, padded), mesh,
                                     parallel.concept_spec()),
                  frozen=frozen, slots=None, num_concepts=k, padded=padded,
                  seeds=[int(c.seed) for c in concepts.configs],
                  lr_scales=[float(i.base_lr) for i in concepts.inputs])
  placed.slots = place_slots(mesh, placed, failed, concepts.names)
  limit = (train_lib.device_memory_limit(devices[0])
           if config.remat == "auto" and devices[0].platform == "tpu" else None)
  args = (placed.state, frozen, place_batch(mesh, config, concepts, start, padded), placed.slots)
  _, step_fn, remat = train_lib.mesh_remat_if_needed(settings, first.make_optimizer, unit, mesh,
                                                     args, limit)
  if remat:
    _log("remat=auto: the step does not fit the device memory without remat; rematerialising")
  if sharded:
    _log(f"the frozen weights are sharded over {len(devices)} devices")
  _log(f"{k} concepts on {parallel.concept_size(mesh)} concept shard(s) x "
       f"{parallel.data_size(mesh)} device(s) each" + (f" ({padded - k} padding)" if padded > k
                                                        else ""))
  return mesh, step_fn, placed


def place_slots(mesh, placed: Placed, failed: dict[str, int], names: Sequence[str]):
  """The concepts' `ConceptSlots` on the mesh: a concept frozen as non-finite, and the
  padding, inactive."""
  pad = placed.padded - placed.num_concepts
  active = [n not in failed for n in names] + [False] * pad
  slots = train_lib.concept_slots(placed.seeds + [0] * pad, placed.lr_scales + [1.0] * pad,
                                  active)
  return parallel.put(slots, mesh, parallel.concept_spec())


def place_batch(mesh, config, concepts: Concepts, step: int, padded: int):
  """Every concept's global batch of `step`, stacked `[Kp, B, ...]` and placed over the
  mesh (concepts over its concept axis, examples over its data axis)."""
  batches = [run_inputs.global_batch_for(c, i, step)
             for c, i in zip(concepts.configs, concepts.inputs)]
  return parallel.put(parallel.pad_stacked(parallel.stack(batches), padded), mesh,
                      parallel.batch_spec())


def make_validators(config, concepts: Concepts, devices: Sequence, workdir: str) -> list:
  """Each concept's `Validation` (into WORKDIR/<concept>/validation, TensorBoard tags under
  "<concept>/"), or [] without validation. They share one image generator (`train_loop`)."""
  if not validation.enabled(config):
    return []
  first = concepts.inputs[0]
  return [validation.make(c, first.sd, [e.token_ids for e in i.concepts], devices,
                          run_dir.concept_dir(workdir, s.name), shared={},
                          tag_prefix=f"{s.name}/")
          for s, c, i in zip(concepts.specs, concepts.configs, concepts.inputs)]


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


@jax.jit
def _first_failure(failed_at: jax.Array, finite: jax.Array, step: jax.Array) -> jax.Array:
  """`[Kp]` int32: the step at which each concept first went non-finite, -1 while it has not."""
  return jnp.where((failed_at < 0) & ~finite, step, failed_at)


def train_loop(config, concepts: Concepts, mesh, step_fn, placed: Placed, start: int,
               failed: dict[str, int], ckpts: run_dir.Checkpoints, metadata: dict,
               validators: list, limits: list[float], workdir: str, progress: bool,
               tb: tensorboard.Writer | None):
  """Steps from `start` to config.max_train_steps; returns (host state `[K, ...]`, step,
  interrupted, {name: step} of the concepts frozen as non-finite).

  Every log_every_steps: one metrics.jsonl record per concept ({"step", "concept", "loss",
  ...}, the loss averaged since the last log), TensorBoard scalars under "<concept>/train/",
  and the non-finite check; checkpoints every checkpointing_steps and at the end; each
  concept's validation images at validation steps. Signals as `loop.train_loop`.
  """
  is_main = jax.process_index() == 0
  names = concepts.names
  k = placed.num_concepts
  metrics_log = loop.open_metrics_log(workdir, start, is_main)
  bar = loop.progress_bar(start, config.max_train_steps, progress and is_main)
  flag = loop.StopFlag()
  state, step, interrupted = placed.state, start, False
  loss_sum, count, failed_at = None, 0, jnp.full((placed.padded,), -1, jnp.int32)
  interval = loop.LogInterval(time.perf_counter(), start)
  batch_size = concepts.inputs[0].global_batch
  try:
    with loop.stop_on_signals(flag):
      if step < config.max_train_steps:
        _log("compiling the training step (the first step takes a while)")
        batch = place_batch(mesh, config, concepts, step, placed.padded)
      while step < config.max_train_steps:
        state, metrics = step_fn(state, placed.frozen, batch, placed.slots)
        failed_at = _first_failure(failed_at, metrics["finite"], jnp.int32(step + 1))
        loss_sum = metrics["loss"] if loss_sum is None else loss_sum + metrics["loss"]
        count += 1
        step += 1
        if step == start + 1:
          jax.block_until_ready(metrics)
          _log(f"compiled and ran the first step in {time.perf_counter() - interval.time:.1f}s")
          interval.restart(step)
        if step < config.max_train_steps:  # the next batch while the device computes
          batch = place_batch(mesh, config, concepts, step, placed.padded)
        at_log = step % config.log_every_steps == 0 or step == config.max_train_steps
        stop = (parallel.any_process(flag.signal is not None)
                if at_log or jax.process_count() == 1 else False)
        if at_log or stop:
          newly = _log_concepts(interval, step, metrics, loss_sum, count, failed_at, failed,
                                names, limits, batch_size * k, metrics_log, bar, tb)
          loss_sum, count = None, 0
          if newly:
            failed.update(newly)
            placed.slots = place_slots(mesh, placed, failed, names)
            if len(failed) == k:
              raise loop.DivergedError(
                  f"every concept went non-finite by step {step} ({', '.join(failed)}); "
                  "lower config.learning_rate or check the adam_* settings")
        bar.update(1)
        if step % config.checkpointing_steps == 0:
          _save(ckpts, state, step, k, metadata, config, flag, failed)
          interval.restart(step)
        if validators and not stop and validation.is_due(config, step):
          _validate(validators, concepts, state, step, k, failed, tb)
          interval.restart(step)
        if stop:
          interrupted = True
          break
      _save(ckpts, state, step, k, metadata, config, flag, failed)
  except OSError as e:
    last = ckpts.latest_step()
    raise run_dir.WorkdirError(
        f"cannot write to {workdir} at step {step}: {console.one_line(e, limit=300)}; the "
        f"last good checkpoint is step {last if last is not None else 'none'}") from None
  except KeyboardInterrupt:
    last = ckpts.latest_step()
    raise loop.Aborted(f"aborted by a second signal at step {step} without saving; the last "
                       f"checkpoint is step {last if last is not None else 'none'}") from None
  finally:
    bar.close()
    metrics_log.close()
  return _host_state(state, k), step, interrupted, failed


def _log_concepts(interval: loop.LogInterval, step: int, metrics: dict, loss_sum, count: int,
                  failed_at, failed: dict[str, int], names: Sequence[str],
                  limits: Sequence[float], examples: int, metrics_log, bar,
                  tb: tensorboard.Writer | None) -> dict[str, int]:
  """Writes each concept's metrics.jsonl record (and TensorBoard scalars); returns the
  concepts that went non-finite (or past their norm limit) since the last log, {name: step},
  each named in one line."""
  k = len(names)
  host = parallel.fetch({**{key: v for key, v in metrics.items() if key != "finite"},
                         "loss": loss_sum, "failed_at": failed_at})
  now = time.perf_counter()
  timing = {}
  if step > interval.step:
    step_time = (now - interval.time) / (step - interval.step)
    timing = {"step_time_s": step_time, "images_per_sec": examples / step_time}
  interval.time, interval.step = now, step
  newly = {}
  losses = []
  for i, name in enumerate(names[:k]):
    if name in failed:
      continue
    loss = float(host["loss"][i]) / count
    norm = float(host["max_vector_norm"][i])
    bad_at = int(host["failed_at"][i])
    if bad_at >= 0 or not math.isfinite(loss) or not norm <= limits[i]:
      newly[name] = bad_at if bad_at >= 0 else step
      why = (f"largest vector norm {norm:.3g} (limit {limits[i]:.3g})"
             if bad_at < 0 and math.isfinite(loss) else "its loss or vectors went non-finite")
      _log(f"concept {name}: {why} by step {newly[name]}; frozen at its last finite vectors, "
           "the others train on (its export will be refused)")
      continue
    record = {"step": step, "concept": name, "loss": loss,
              **{key: float(host[key][i]) for key in metrics if key not in ("finite", "loss")},
              **timing, "time": time.time()}
    metrics_log.write(json.dumps(record) + "\n")
    if tb is not None:
      tb.scalars(step, record, prefix=f"{name}/train/")
    losses.append(loss)
  if losses:
    bar.set_postfix({"loss": f"{np.mean(losses):.4f}", "concepts": f"{len(losses)}/{k}",
                     **({"step_s": f"{timing['step_time_s']:.3f}"} if timing else {})})
  return newly


def _host_state(state, k: int):
  """The mesh state on the host, its padding dropped: `[K, ...]`."""
  return jax.tree_util.tree_map(lambda x: x[:k], parallel.fetch(state))


def _save(ckpts: run_dir.Checkpoints, state, step: int, k: int, metadata: dict, config,
          flag: loop.StopFlag, failed: dict[str, int]) -> None:
  """Saves checkpoint `step` of every concept (`[K, ...]`), with the non-finite ones named."""
  host = _host_state(state, k)
  active = train_lib.active_vectors(step, config.num_vectors, config.progressive_words)
  meta = dict(metadata, step=step, active_vectors=int(active))
  if failed:
    meta[run_dir.NON_FINITE_KEY] = dict(failed)
  flag.saving = True
  try:
    ckpts.save(step, {"state": host}, meta)
  finally:
    flag.saving = False


def _validate(validators: list, concepts: Concepts, state, step: int, k: int,
              failed: dict[str, int], tb) -> None:
  """Each trained concept's validation images; the first concept's image generator (compiled
  once) serves all of them."""
  params = _host_state(state, k).params
  keys = [c.key for c in concepts.inputs[0].concepts]
  generator = next((v.generator for v in validators if v.generator is not None), None)
  for i, (v, name) in enumerate(zip(validators, concepts.names)):
    if name in failed:
      continue
    if v.generator is None:
      v.generator = generator
    validation.write_images(v, step, tuple(np.asarray(params[key][i]) for key in keys), tb)
    generator = generator or v.generator


# ---------------------------------------------------------------------------
# Export.
# ---------------------------------------------------------------------------


def export(config, concepts: Concepts, workdir: str, state, start: int, step: int,
           interrupted: bool, failed: dict[str, int], checkpoints: str) -> dict:
  """The run's result; unless interrupted, process 0 writes each finite concept's active
  vectors to WORKDIR/<concept>/learned_embeds.safetensors (SDXL: and the _2 file)."""
  keys = [c.key for c in concepts.inputs[0].concepts]
  out = {name: {key: np.asarray(state.params[key][i]) for key in keys}
         for i, name in enumerate(concepts.names)}
  if interrupted:
    _log(f"stopped at step {step}; checkpoint saved in {checkpoints}. "
         "Re-run the same command to resume.")
  elif jax.process_index() == 0:
    active = train_lib.active_vectors(step, config.num_vectors, config.progressive_words)
    written = []
    for spec, c in zip(concepts.specs, concepts.configs):
      if spec.name in failed:
        continue
      folder = run_dir.concept_dir(workdir, spec.name)
      fileio.makedirs(folder)
      trainer.write_final_embedding(c, folder, [v[:active] for v in out[spec.name].values()],
                                    step, rewrite=step > start)
      written.append(spec.name)
    _log(f"done: step {step}; learned embeddings of {len(written)} concept(s) in "
         f"{workdir}/<concept>/learned_embeds.safetensors" + (
             f"; not exported (non-finite): {', '.join(failed)}" if failed else ""))
  return {"step": step, "interrupted": interrupted, "concepts": out, "non_finite": dict(failed)}
