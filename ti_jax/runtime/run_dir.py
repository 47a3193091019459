"""The run-directory format: what a textual-inversion run (`--workdir`) holds and how to read it.

A run directory holds:
  ti_jax.lock              the lock of the training run using it (pid, host)
  run.json                 what this run learns (placeholder, base model, data...);
                           a cache of the checkpoints' own metadata
  checkpoints/<step>/      Orbax: {"state": learned vectors, optimizer state and
                           step (older runs: also rng key data); "metadata": JSON
                           with the run's identity (training.config's
                           CHECKPOINT_IDENTITY)}
  unreadable_checkpoints/  checkpoints a resumed run could not read, set aside
  metrics.jsonl            one JSON line per logged step
  validation/              validation PNGs
  learned_embeds.safetensors  the final vectors in diffusers' format (embedding_writer); an
                           SDXL run also writes learned_embeds_2.safetensors (the
                           second text encoder's) and its state holds "embeds_2"

This module is in the bottom layer so that every reader of a run (embeddings,
export, sampling, evaluation) reads it without importing training: the workdir
lock (`lock_workdir`), run.json (`read_identity`, `write_identity`), the Orbax
checkpoints (`Checkpoints`) and a run's learned vectors (`learned_from_workdir`,
`encoder_vectors_from_workdir`). What a training run checks before it resumes (its
identity, the checkpoints' metadata) is `ti_jax.training.checkpointing`'s.
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
from ti_jax.runtime import console, fileio, parallel


class WorkdirError(errors.UserError):
  """The workdir belongs to another run or is unusable; one-line message."""


class UnreadableCheckpointError(WorkdirError):
  """A checkpoint's files cannot be restored, or it holds non-finite values."""

  def __init__(self, step: int, why: str):
    super().__init__(f"checkpoint {step} is unreadable: {why}")
    self.step, self.why = step, why


class CheckpointWriteError(WorkdirError):
  """Saving a checkpoint failed; the message names the last good one."""


def read_json_object(path: str) -> dict:
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
    raise WorkdirError(f"cannot lock --workdir {workdir} for training: "
                       f"{console.one_line(e, limit=300)} "
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
  return read_json_object(path)


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

  For an SDXL run these are the first encoder's; `encoder_vectors_from_workdir` gives
  every encoder's.
  """
  vectors, metadata = encoder_vectors_from_workdir(workdir, step)
  return vectors[0], metadata


# The checkpoint's key of each text encoder's learned vectors, in the pipeline's order
# (the encoders' `TextEncoder.suffix`: "", "_2"); a run holds the first one or more.
EMBEDS_KEYS = ("embeds", "embeds_2")


def encoder_vectors_from_workdir(workdir: str, step: int | None = None
                                 ) -> tuple[tuple[np.ndarray, ...], dict]:
  """(vectors per text encoder, metadata) of a run's checkpoint (latest if `step` is None).

  One `[n, D_e]` array per text encoder the run trained (SD/LDM one, SDXL two).

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
  vectors = [np.asarray(params[k], np.float32) for k in EMBEDS_KEYS if k in params]
  active = int(metadata.get("active_vectors") or len(vectors[0]))
  return tuple(v[:active] for v in vectors), metadata
