"""Orbax checkpoints of a textual-inversion run and the run's identity record.

A run directory (`--workdir`) holds:
  ti_jax.lock              the lock of the training run using it (pid, host)
  run.json                 what this run learns (placeholder, base model, data...);
                           a cache of the checkpoints' own metadata
  checkpoints/<step>/      Orbax: {"state": learned vectors, optimizer state and
                           step (older runs: also rng key data); "metadata": JSON
                           with the run's identity, see CHECKPOINT_IDENTITY}
  unreadable_checkpoints/  checkpoints a resumed run could not read, set aside
  metrics.jsonl            one JSON line per logged step
  validation/              validation PNGs
  learned_embeds.safetensors  the final vectors in diffusers' format (embedding_io); an
                           SDXL run also writes learned_embeds_2.safetensors (the
                           second text encoder's) and its state holds "embeds_2"

This module owns the run's identity and every check made before a run resumes:
`check_identity` (run.json), `resume` (the checkpoints' own metadata, the
shapes of their vectors, a changed global batch) and `claim_workdir`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ti_jax import errors
from ti_jax.runtime import console, fileio

# Fields of run.json that define what a run learns: resuming with any of them
# changed would silently mix two concepts, so it is refused.
IDENTITY_FIELDS = ("placeholder_token", "num_vectors", "initializer_token",
                   "pretrained_model_name_or_path", "learnable_property", "train_data_dir",
                   "resolution", "per_image_tokens", "caption_extension", "templates_file",
                   "buckets")
# Values of identity fields added after runs were first written.
_IDENTITY_DEFAULTS = {"per_image_tokens": False, "caption_extension": "", "templates_file": "",
                      "buckets": None}


# Fields of a checkpoint's metadata that say what it learned. A run resumes a
# checkpoint only if all of them match (run.json may be missing or rewritten).
CHECKPOINT_IDENTITY = ("placeholder_token", "initializer_token", "pretrained_model_name_or_path",
                       "num_vectors", "learnable_property", "resolution", "image_files", "seed",
                       "per_image_tokens", "snr_gamma", "noise_offset", "optimizer",
                       "caption_extension", "templates_file", "prompt_texts_sha256", "buckets")
# Values of checkpoint identity fields added later: a checkpoint without the field
# was made with this value (so it resumes only with it).
_CHECKPOINT_DEFAULTS = {"snr_gamma": 0.0, "noise_offset": 0.0, "optimizer": "adamw",
                        "caption_extension": "", "templates_file": "", "prompt_texts_sha256": "",
                        "buckets": None}


def bucket_identity(config) -> list[int] | None:
  """What aspect-ratio bucketing changes of a run: [min_bucket_reso, max_bucket_reso,
  bucket_reso_steps] with enable_bucket, None without (the reso fields are then unused)."""
  if not config.enable_bucket:
    return None
  return [int(config.min_bucket_reso), int(config.max_bucket_reso),
          int(config.bucket_reso_steps)]


def run_identity(config) -> dict:
  """The run.json record of a training config: its IDENTITY_FIELDS."""
  computed = {"buckets": bucket_identity(config)}
  return {k: computed[k] if k in computed else config[k] for k in IDENTITY_FIELDS}


def run_metadata(config, *, tokens: list[str], token_ids: list[int], image_tokens: list[str],
                 embedding_dim: int, model_path: str, global_batch: int, base_lr: float,
                 image_paths: list[str], prompt_texts_sha256: str = "",
                 token_ids_2: list[int] | None = None,
                 embedding_dim_2: int | None = None) -> dict:
  """The metadata every checkpoint of the run carries: its CHECKPOINT_IDENTITY and what
  sample/export/evaluate need to use it (tokens, base model, images, the config).

  An SDXL run also records its tokens' ids in tokenizer_2 and the second encoder's
  width (its state holds "embeds_2"); the base model, part of the identity, already
  tells an SDXL run from another.
  """
  second = ({} if token_ids_2 is None else
            {"token_ids_2": list(token_ids_2), "embedding_dim_2": int(embedding_dim_2)})
  return {**second,
      "placeholder_token": config.placeholder_token, "placeholder_tokens": tokens,
      "token_ids": token_ids, "initializer_token": config.initializer_token,
      "per_image_tokens": image_tokens,
      "num_vectors": config.num_vectors, "embedding_dim": int(embedding_dim),
      "pretrained_model_name_or_path": config.pretrained_model_name_or_path,
      "model_path": model_path, "learnable_property": config.learnable_property,
      "resolution": config.resolution, "seed": config.seed,
      "snr_gamma": float(config.snr_gamma), "noise_offset": float(config.noise_offset),
      "optimizer": config.optimizer,
      "global_batch": global_batch, "learning_rate": base_lr,
      # Where the images were, wherever the run is read from later (evaluate).
      "train_data_path": (config.train_data_dir if fileio.is_remote(config.train_data_dir)
                          else os.path.abspath(config.train_data_dir)),
      "image_files": [os.path.basename(p) for p in image_paths],
      # The captions' and templates file's texts ("" with neither): editing a caption
      # between resumes changes what is learned, so it is refused like a changed seed.
      "caption_extension": config.caption_extension, "templates_file": config.templates_file,
      "prompt_texts_sha256": prompt_texts_sha256,
      "buckets": bucket_identity(config),
      "config": json.loads(config.to_json()),
  }


class WorkdirError(errors.UserError):
  """The workdir belongs to another run or is unusable; one-line message."""


class UnreadableCheckpointError(WorkdirError):
  """A checkpoint's files cannot be restored, or it holds non-finite values."""

  def __init__(self, step: int, why: str):
    super().__init__(f"checkpoint {step} is unreadable: {why}")
    self.step, self.why = step, why


class CheckpointWriteError(WorkdirError):
  """Saving a checkpoint failed; the message names the last good one."""


def _read_json_object(path: str) -> dict:
  """A JSON object file; WorkdirError with one line if unreadable, not UTF-8 or not an object."""
  try:
    value = json.loads(fileio.read_small_file(path).decode("utf-8"))
  except UnicodeDecodeError as e:
    raise WorkdirError(f"cannot read {path}: not UTF-8 text ({e.reason} at byte {e.start})") \
        from None
  except json.JSONDecodeError as e:
    raise WorkdirError(f"cannot read {path}: not JSON ({e.msg} at line {e.lineno})") from None
  except OSError as e:
    raise WorkdirError(f"cannot read {path}: {console.one_line(e, limit=300)}") from None
  if not isinstance(value, dict):
    raise WorkdirError(f"cannot read {path}: it holds a JSON {type(value).__name__}, "
                       "not an object")
  return value


def lock_workdir(workdir: str) -> fileio.DirLock:
  """Takes the exclusive lock of a run directory (created if absent) for a training run.

  Raises WorkdirError (one line, naming the holder) if another live process
  holds it or the directory cannot be written.
  """
  if fileio.exists(workdir) and not fileio.is_dir(workdir):
    raise WorkdirError(f"--workdir {workdir} is a file, not a directory")
  lock = fileio.DirLock(workdir)
  try:
    fileio.makedirs(workdir)
    lock.acquire()
  except fileio.LockHeld as e:
    h = e.holder
    who = (f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}"
           if h else "a process that has not written its record yet")
    hint = (f"; if that run is dead, delete {e.path}" if fileio.is_remote(workdir) else "")
    raise WorkdirError(f"--workdir {workdir} is in use by another training run ({who}); "
                       f"wait for it to finish or use another --workdir{hint}") from None
  except OSError as e:
    raise WorkdirError(f"cannot lock --workdir {workdir} for training: {console.one_line(e, limit=300)} "
                       "(a training run needs a writable workdir; sample, export and evaluate "
                       "only read it)") from None
  return lock


def vectors_finite(tree: Any) -> bool:
  """True if every floating-point leaf of `tree` is finite."""
  for leaf in jax.tree_util.tree_leaves(tree):
    a = np.asarray(leaf)
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
      return False
  return True


def identity_diffs(saved: dict, run: dict) -> list[str]:
  """`field: saved there, run now` for each CHECKPOINT_IDENTITY field that differs.

  Fields an older checkpoint did not record are not compared, unless they have
  a default in _CHECKPOINT_DEFAULTS (the value it was made with).
  """
  def norm(v):  # JSON turns tuples into lists
    return list(v) if isinstance(v, tuple) else v
  saved = {**{k: v for k, v in _CHECKPOINT_DEFAULTS.items() if k in run}, **saved}
  hints = {"prompt_texts_sha256": " (a caption file or the templates file changed)"}
  return [f"{k}: {saved[k]!r} there, {run.get(k)!r} now{hints.get(k, '')}"
          for k in CHECKPOINT_IDENTITY if k in saved and norm(saved[k]) != norm(run.get(k))]


def check_identity(workdir: str, identity: dict) -> bool:
  """Checks that `workdir` is new or holds a run that learns the same thing (writes nothing).

  Returns True if the workdir already holds this run (so training resumes).
  """
  if fileio.exists(workdir) and not fileio.is_dir(workdir):
    raise WorkdirError(f"--workdir {workdir} is a file, not a directory")
  path = fileio.join(workdir, "run.json")
  if not fileio.exists(path):
    return False
  existing = _read_json_object(path)
  diffs = [f"{k}: {existing.get(k, _IDENTITY_DEFAULTS.get(k))!r} there, {identity.get(k)!r} now"
           for k in IDENTITY_FIELDS
           if existing.get(k, _IDENTITY_DEFAULTS.get(k)) != identity.get(k)]
  if diffs:
    raise WorkdirError(
        f"workdir {workdir} holds another run ({'; '.join(diffs)}); use a new --workdir "
        "or restore the original settings to resume")
  return True


def write_identity(workdir: str, identity: dict) -> None:
  """Writes run.json (once every input has been checked, so a failed start leaves nothing)."""
  try:
    fileio.makedirs(workdir)
    text = json.dumps(identity, indent=2, sort_keys=True)
    # Atomically: a half-written run.json would make the run unreadable.
    fileio.write_via_local_file(fileio.join(workdir, "run.json"),
                                lambda local: fileio.write_text(local, text))
  except OSError as e:
    raise WorkdirError(f"cannot write to --workdir {workdir}: {e}") from None


def read_identity(workdir: str) -> dict:
  """run.json of a run directory (WorkdirError if missing or unreadable)."""
  path = fileio.join(workdir, "run.json")
  if not fileio.exists(path):
    raise WorkdirError(f"{workdir} is not a ti_jax run directory (no run.json)")
  return _read_json_object(path)


class _QuietOrbaxErrors(logging.Filter):
  """Drops Orbax's error logs. A write that fails in Orbax's worker threads (a disk that
  fills up mid-checkpoint) is logged there with its traceback, once per thread, and then
  raised again by the save, which reports it in one line (CheckpointWriteError)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR
                and f"{os.sep}orbax{os.sep}" in (record.pathname or ""))


def _event_loop_closed(unraisable) -> bool:
  """Whether an unraisable exception is tensorstore calling back into Orbax's closed event
  loop: when a read or write fails, its pending callbacks land there and Python prints each
  as a traceback; the failure itself is reported once, in one line."""
  return (isinstance(unraisable.exc_value, RuntimeError)
          and "Event loop is closed" in str(unraisable.exc_value))


class Checkpoints:
  """Saves and restores {state pytree, JSON metadata} with an Orbax CheckpointManager.

  Saves are synchronous: the state is a few KB of vectors, and an asynchronous
  save that fails leaves Orbax threads waiting for signals that never come
  (the process then cannot exit). A failed save raises CheckpointWriteError;
  Orbax's own tracebacks of it (its threads' logs, tensorstore's late callbacks)
  are dropped from then until `close`, as they may still come after the save
  returned.
  """

  def __init__(self, workdir: str, max_to_keep: int | None = 3):
    # (log filter, the unraisable hook it replaced) while a failed save may still print
    self._quiet: tuple[_QuietOrbaxErrors, Any] | None = None
    self.workdir = fileio.resolve(workdir)
    self.directory = fileio.join(self.workdir, "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False),
        item_names=("state", "metadata"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, metadata: dict) -> None:
    """Saves host arrays at `step` (a no-op if that step is already saved).

    Raises CheckpointWriteError if `state` holds non-finite values (nothing is
    written) or the write fails; either way earlier checkpoints are kept.
    """
    steps = self.all_steps()
    if step in steps:
      return
    last = (f"the last good checkpoint is step {max(steps)}" if steps
            else "there is no earlier checkpoint")
    state = jax.device_get(state)
    if not vectors_finite(state):
      raise CheckpointWriteError(f"refusing to write checkpoint {step}: it holds non-finite "
                                 f"values; {last} in {self.directory}")
    self._quiet_orbax_errors(True)
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)))
    except Exception as e:  # pylint: disable=broad-except  # Orbax raises many types
      raise CheckpointWriteError(f"cannot write checkpoint {step} in {self.directory}: "
                                 f"{console.one_line(e, limit=300)}; {last}") from None
    self._quiet_orbax_errors(False)  # saved: nothing of it is left to fail

  def _quiet_orbax_errors(self, on: bool) -> None:
    """Drops (on) or again shows (off) Orbax's error logs (`_QuietOrbaxErrors`) and the
    tracebacks of tensorstore's late callbacks (`_event_loop_closed`)."""
    absl_logger = logging.getLogger("absl")  # where Orbax logs (absl.logging)
    if on and self._quiet is None:
      previous = sys.unraisablehook

      def hook(unraisable):
        if not _event_loop_closed(unraisable):
          previous(unraisable)
      self._quiet = (_QuietOrbaxErrors(), previous)
      absl_logger.addFilter(self._quiet[0])
      sys.unraisablehook = hook
    elif not on and self._quiet is not None:
      errors_filter, sys.unraisablehook = self._quiet
      absl_logger.removeFilter(errors_filter)
      self._quiet = None

  def _restore(self, step: int, args: ocp.args.Composite):
    # A failed read is reported once, below: not again by tensorstore's late callbacks.
    previous = sys.unraisablehook

    def quiet(unraisable):
      if not _event_loop_closed(unraisable):
        previous(unraisable)
    sys.unraisablehook = quiet
    try:
      return self._manager.restore(step, args=args)
    except Exception as e:  # pylint: disable=broad-except  # tensorstore/JSON/asyncio errors
      raise UnreadableCheckpointError(step, console.one_line(e, limit=300)) from None
    finally:
      sys.unraisablehook = previous

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores the state (shaped like `abstract_state`) and metadata saved at `step`.

    Raises UnreadableCheckpointError if the files cannot be read or hold
    non-finite values.
    """
    restored = self._restore(step, ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()))
    if not vectors_finite(restored.state):
      raise UnreadableCheckpointError(step, "it holds non-finite (NaN or inf) values")
    return restored.state, restored.metadata

  def restore_untyped(self, step: int) -> tuple[dict, dict]:
    """Restores the state as nested dicts of numpy arrays (no template needed) and metadata."""
    restored = self._restore(step, ocp.args.Composite(
        state=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()))
    if not vectors_finite(restored.state):
      raise UnreadableCheckpointError(step, "it holds non-finite (NaN or inf) values")
    return restored.state, restored.metadata

  def restore_metadata(self, step: int) -> dict:
    return self._restore(step, ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata

  def set_aside(self, step: int) -> str:
    """Moves an unreadable step to `unreadable_checkpoints/` (kept, no longer a step).

    Process 0 moves it; every process then reloads the step list. Returns the new path.
    """
    from ti_jax.runtime import parallel  # pylint: disable=import-outside-toplevel
    target = fileio.join(self.workdir, "unreadable_checkpoints",
                         f"{step}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    if jax.process_index() == 0:
      fileio.makedirs(fileio.join(self.workdir, "unreadable_checkpoints"))
      fileio.rename(fileio.join(self.directory, str(step)), target)
    parallel.sync(f"ti_jax:set_aside:{step}")
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Closes the manager (waiting for its threads), then shows Orbax's error logs again."""
    try:
      self._manager.close()
    finally:
      self._quiet_orbax_errors(False)


def learned_from_workdir(workdir: str, step: int | None = None) -> tuple[np.ndarray, dict]:
  """The learned vectors `[n, dim]` and metadata of a run's checkpoint (latest if `step` is None).

  For an SDXL run these are the first encoder's; `learned_pair_from_workdir` gives both.
  """
  vectors, _, metadata = learned_pair_from_workdir(workdir, step)
  return vectors, metadata


def learned_pair_from_workdir(workdir: str, step: int | None = None
                              ) -> tuple[np.ndarray, np.ndarray | None, dict]:
  """(vectors `[n, dim]`, SDXL's second encoder's `[n, dim_2]` or None, metadata) of a run's
  checkpoint (latest if `step` is None).

  With progressive_words, only the vectors that had entered training by that
  step are returned (the others still hold their initial values). A checkpoint
  that cannot be read (or holds non-finite vectors) raises WorkdirError naming
  it and the newest readable step to pass as --step instead.
  """
  read_identity(workdir)
  ckpts = Checkpoints(workdir, max_to_keep=None)
  try:
    steps = ckpts.all_steps()
    if not steps:
      raise WorkdirError(f"{workdir} has no checkpoint yet")
    if step is None:
      step = max(steps)
    elif step not in steps:
      raise WorkdirError(f"{workdir} has no checkpoint at step {step} "
                         f"(available: {', '.join(map(str, sorted(steps)))})")
    try:
      state, metadata = ckpts.restore_untyped(step)
    except UnreadableCheckpointError as e:
      good = None
      for other in sorted((s for s in steps if s != step), reverse=True):
        try:
          ckpts.restore_untyped(other)
        except UnreadableCheckpointError:
          continue
        good = other
        break
      advice = (f"use --step {good} (the newest readable checkpoint)" if good is not None
                else "no other checkpoint is readable either")
      raise WorkdirError(f"checkpoint {step} in {ckpts.directory} is unreadable ({e.why}); "
                         f"{advice}") from None
  finally:
    ckpts.close()
  params = state["state"]["params"]
  vectors = np.asarray(params["embeds"], np.float32)
  active = int(metadata.get("active_vectors") or len(vectors))
  vectors_2 = (np.asarray(params["embeds_2"], np.float32)[:active] if "embeds_2" in params
               else None)
  return vectors[:active], vectors_2, metadata


# ---------------------------------------------------------------------------
# Resuming a training run.
# ---------------------------------------------------------------------------


def check_checkpoint(step: int, saved_meta: dict, metadata: dict, saved_params: Any,
                     start_params: Any, workdir: str) -> None:
  """Refuses a readable checkpoint this run must not resume: another run made it (its
  CHECKPOINT_IDENTITY differs), or its vectors have other shapes than `start_params`."""
  diffs = identity_diffs(saved_meta, metadata)
  if diffs:
    raise WorkdirError(
        f"checkpoint {step} in {workdir} was made by another run ({'; '.join(diffs)}); "
        "use a new --workdir or restore the original settings to resume")
  want = jax.tree_util.tree_map(np.shape, start_params)
  saved_shapes = jax.tree_util.tree_map(np.shape, saved_params)
  if saved_shapes != want:
    raise WorkdirError(
        f"checkpoint {step} in {workdir} holds vectors of shapes {saved_shapes}, this run "
        f"needs {want} (did the number of training images change?); use a new --workdir")


def restore_newest(ckpts: Checkpoints, start_state: Any, metadata: dict,
                   workdir: str) -> tuple[Any, int | None, dict | None]:
  """(state, step, saved metadata) of the newest usable checkpoint, or (start_state, None, None).

  An unreadable checkpoint (corrupt files, non-finite vectors) is moved to
  unreadable_checkpoints/ with a warning and the next older one is tried. A
  readable one this run must not resume is refused (`check_checkpoint`).
  """
  for step in reversed(ckpts.all_steps()):
    try:
      untyped, saved_meta = ckpts.restore_untyped(step)
      check_checkpoint(step, saved_meta, metadata, untyped["state"]["params"],
                       start_state.params, workdir)
      abstract = {"state": start_state}
      if "rng" in untyped:  # checkpoints of older versions also stored the seed's key
        abstract["rng"] = np.asarray(untyped["rng"])
      restored, _ = ckpts.restore(step, abstract)
    except UnreadableCheckpointError as e:
      moved = ckpts.set_aside(step)
      console.log(f"warning: skipping checkpoint {step} in {ckpts.directory}: {e.why}; "
              f"moved it to {moved}")
      continue
    return restored["state"], step, saved_meta
  return start_state, None, None


def resume(ckpts: Checkpoints, start_state: Any, metadata: dict, identity: dict, workdir: str,
           has_run_json: bool) -> Any:
  """The state a run starts from: its newest usable checkpoint, or `start_state` (step 0).

  Says which on stderr, warns when the global batch changed since the
  checkpoint, then writes run.json (`identity`, see `run_identity`) if missing. Raises
  WorkdirError on every process if a checkpoint belongs to another run.
  """
  had_checkpoints = bool(ckpts.all_steps())
  state, step, saved_meta = restore_newest(ckpts, start_state, metadata, workdir)
  if step is not None:
    global_batch = metadata["global_batch"]
    if saved_meta.get("global_batch", global_batch) != global_batch:
      console.log(f"warning: resuming with global batch {global_batch} (lr "
              f"{metadata['learning_rate']:g}) where the run used {saved_meta['global_batch']} "
              f"(lr {saved_meta.get('learning_rate')}): train_batch_size is per device and the "
              "device count changed (set config.global_batch_size to keep it fixed)")
    console.log(f"resuming from step {step} in {workdir}")
  elif had_checkpoints:
    console.log(f"no readable checkpoint left in {ckpts.directory}: starting from step 0")
  elif has_run_json:
    console.log(f"{workdir} holds this run but no checkpoint yet: starting from step 0")
  if not has_run_json:
    claim_workdir(workdir, identity)
  return state


def claim_workdir(workdir: str, identity: dict) -> None:
  """Process 0 writes run.json (a cache of the identity the checkpoints carry), once it
  is known to match them, so a failed start leaves none; every process learns the outcome."""
  from ti_jax.runtime import parallel  # pylint: disable=import-outside-toplevel
  error = None
  if jax.process_index() == 0:
    try:
      write_identity(workdir, identity)
    except WorkdirError as e:
      error = e
  if parallel.any_process(error is not None):
    raise error or WorkdirError("process 0 could not write run.json; see its log")
