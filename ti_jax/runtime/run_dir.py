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

A run of many concepts (`config.concepts_file`, one JSON line per concept) keeps one
lock, one run.json and one checkpoints/ for the whole run, and gives each concept a
folder named after its token (`<cat-toy>` -> `cat-toy`; `concepts_file.concept_name`):
  ti_jax.lock, checkpoints/, unreadable_checkpoints/   as above, one for the run
  run.json                 as above (the run's shared fields), plus "concepts": one
                           object per concept in the order of the concept axis, each
                           {"name", "placeholder_token", "train_data_dir",
                           "initializer_token", "learnable_property", "caption_extension",
                           "init_embedding", "learning_rate", "seed"}: the concept's
                           identity (CONCEPT_FIELDS; `ConceptSpec.record`)
  checkpoints/<step>/      the state's params keep a single run's keys ("embeds",
                           SDXL also "embeds_2") with a leading concept axis `[K, n, D]`
                           (row k is concept k of "concepts"); "metadata" holds the
                           run's shared fields, the same "concepts" list (each entry
                           also with "train_data_path", the images' absolute folder:
                           `ConceptSpec.checkpoint_record`; a concept's own metadata may
                           go there too), and
                           "non_finite_concepts": {name: step} for each concept whose
                           loss or vectors went non-finite (frozen at its last finite
                           vectors from that step; no reader uses its vectors)
  <name>/                  one folder per concept (the names RESERVED_NAMES are
                           refused): learned_embeds.safetensors (SDXL: also
                           learned_embeds_2.safetensors), validation/, and by default
                           what sample (samples/), export (export/) and evaluate
                           (eval/) write for that concept alone
A reader sees one concept as a single run: `concept_metadata` overlays its entry on the
shared metadata (and its CONCEPT_FIELDS on the shared "config"), and
`concept_vectors_from_workdir` returns its row of the checkpoint in the shape
`encoder_vectors_from_workdir` returns for a single run. `concept_names` tells the two
kinds of run apart; `select_concepts` resolves the `--concept` flag of ti_jax.sample,
ti_jax.export and ti_jax.evaluate.

This module is in the bottom layer so that every reader of a run (embeddings,
export, sampling, evaluation) reads it without importing training: the workdir
lock (`lock_workdir`), run.json (`read_identity`, `write_identity`), the Orbax
checkpoints (`Checkpoints`) and a run's learned vectors (`learned_from_workdir`,
`encoder_vectors_from_workdir`; of a many-concept run, `concept_vectors_from_workdir`).
What a training run checks before it resumes (its
identity, the checkpoints' metadata) is `ti_jax.training.checkpointing`'s.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Sequence

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

  def restore_untyped(self, step: int, check_finite: bool = True) -> tuple[dict, dict]:
    """Restores the state as nested dicts of numpy arrays (no template needed) and metadata.

    `check_finite=False` leaves non-finite values to the caller (a many-concept run's
    reader refuses only the concept that holds them).
    """
    restored = self._restore(step, ocp.args.Composite(
        state=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()))
    if check_finite and not vectors_finite(restored.state):
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

  One `[n, D_e]` array per text encoder the run trained (SD/LDM one, SDXL two). A run
  of many concepts is refused (`concept_vectors_from_workdir` reads it).

  With progressive_words, only the vectors that had entered training by that
  step are returned (the others still hold their initial values). A checkpoint
  that cannot be read (or holds non-finite vectors) raises WorkdirError naming
  it and the newest readable step to pass as --step instead.
  """
  names = concept_names(workdir)
  if names is not None:  # its params are [K, n, D]: one concept at a time
    raise WorkdirError(f"{workdir} is a run of {len(names)} concepts ({', '.join(names)}): "
                       "read one with ti_jax.sample/export/evaluate --workdir and --concept "
                       "NAME, or use its WORKDIR/<name>/learned_embeds.safetensors")
  params, metadata = _restore_params(workdir, step, check_finite=True)
  vectors = [np.asarray(params[k], np.float32) for k in EMBEDS_KEYS if k in params]
  active = int(metadata.get("active_vectors") or len(vectors[0]))
  return tuple(v[:active] for v in vectors), metadata


def _restore_params(workdir: str, step: int | None, check_finite: bool) -> tuple[dict, dict]:
  """(the state's params, metadata) of a run's checkpoint (latest if `step` is None).

  A checkpoint that cannot be read (or, with `check_finite`, holds non-finite values)
  raises WorkdirError naming it and the newest readable step to pass as --step instead.
  """
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
      state, metadata = ckpts.restore_untyped(step, check_finite)
    except UnreadableCheckpointError as e:
      good = None
      for other in sorted((s for s in steps if s != step), reverse=True):
        try:
          ckpts.restore_untyped(other, check_finite)
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
  return state["state"]["params"], metadata


# --- Runs of many concepts (the module docstring has the layout) ---------------------------

# run.json's and every checkpoint metadata's list of concepts, in the concept axis' order.
CONCEPTS_KEY = "concepts"
# A checkpoint metadata's {name: step} of the concepts frozen after going non-finite.
NON_FINITE_KEY = "non_finite_concepts"
# The config fields a concept of a concepts file may set for itself; every other field is
# the run's and shared. An entry of CONCEPTS_KEY holds them all, and "name".
CONCEPT_FIELDS = ("placeholder_token", "train_data_dir", "initializer_token",
                  "learnable_property", "caption_extension", "init_embedding", "learning_rate",
                  "seed")
# `--concept all` selects every concept of a run.
ALL_CONCEPTS = "all"
# Names no concept folder may take (compared without case: macOS and Windows file systems
# do not tell `Export` from `export`): what a run directory already holds, what sample,
# edit and evaluate write into it by default, and `all`.
RESERVED_NAMES = ("checkpoints", "unreadable_checkpoints", "validation", "tensorboard",
                  "samples", "edits", "eval", "export", "run.json", "metrics.jsonl",
                  fileio.LOCK_NAME, "learned_embeds.safetensors", "learned_embeds_2.safetensors",
                  ALL_CONCEPTS)


def concept_dir(workdir: str, name: str) -> str:
  """The folder of concept `name` in a many-concept run directory: WORKDIR/<name>."""
  return fileio.join(workdir, name)


def concept_entries(record: dict, where: str) -> list[dict] | None:
  """The "concepts" list of a run.json or checkpoint metadata `record` (None: one concept).

  WorkdirError (one line, naming `where`) if it is not a list of objects with unique
  string names.
  """
  entries = record.get(CONCEPTS_KEY)
  if entries is None:
    return None
  if not isinstance(entries, list) or not entries or not all(
      isinstance(e, dict) and isinstance(e.get("name"), str) and e["name"] for e in entries):
    raise WorkdirError(f"{where}: {CONCEPTS_KEY!r} must be a non-empty list of objects with "
                       "a 'name' each")
  names = [e["name"] for e in entries]
  if len(set(names)) != len(names):
    twice = next(n for n in names if names.count(n) > 1)
    raise WorkdirError(f"{where}: concept {twice!r} is listed twice")
  return entries


def concept_names(workdir: str) -> list[str] | None:
  """The concepts of a many-concept run, in the concept axis' order; None for a
  single-concept run (run.json without "concepts")."""
  entries = concept_entries(read_identity(workdir), fileio.join(workdir, "run.json"))
  return None if entries is None else [e["name"] for e in entries]


def parse_concept_flag(values: Sequence[str]) -> list[str]:
  """`--concept` values as names: each value one name or a comma list; duplicates dropped."""
  names = (n.strip() for v in values for n in str(v).split(","))
  return list(dict.fromkeys(n for n in names if n))


def select_concepts(workdir: str, requested: Sequence[str], flag: str = "--concept"
                    ) -> list[str] | None:
  """The concepts of `workdir` that `requested` (`--concept` values) names, in their order.

  None for a single-concept run without `requested`. One-line WorkdirError for a
  many-concept run without `requested` (listing its names), for `requested` on a
  single-concept run, and for a name the run lacks. `all` selects every concept.
  """
  names = concept_names(workdir)
  wanted = parse_concept_flag(requested)
  if names is None:
    if wanted:
      raise WorkdirError(f"{flag} {','.join(wanted)}: {workdir} is a run of one concept "
                         f"(no {CONCEPTS_KEY!r} in its run.json); drop {flag}")
    return None
  listed = ", ".join(names)
  if not wanted:
    raise WorkdirError(f"{workdir} is a run of {len(names)} concepts: pass {flag} NAME "
                       f"(repeat it or separate names with commas; {flag} {ALL_CONCEPTS} for "
                       f"every one); its concepts: {listed}")
  if ALL_CONCEPTS in wanted:
    return list(names)
  unknown = [n for n in wanted if n not in names]
  if unknown:
    raise WorkdirError(f"{flag} {unknown[0]}: {workdir} has no such concept; its concepts: "
                       f"{listed} (or {ALL_CONCEPTS})")
  return wanted


def concept_metadata(metadata: dict, entry: dict) -> dict:
  """What a reader sees of one concept of a many-concept checkpoint: the run's `metadata`
  with the concept's `entry` over it, and its CONCEPT_FIELDS over the shared "config"
  (so `placeholder_token`, `config.train_data_dir`, ... are the concept's, as in a
  single run's metadata); "concept" is its name."""
  config = dict(metadata.get("config") or {})
  config.update({k: entry[k] for k in CONCEPT_FIELDS if k in entry})
  shared = {k: v for k, v in metadata.items() if k not in (CONCEPTS_KEY, NON_FINITE_KEY)}
  return {**shared, **entry, "config": config, "concept": entry["name"]}


def concept_vectors_from_workdir(workdir: str, names: Sequence[str], step: int | None = None
                                 ) -> list[tuple[tuple[np.ndarray, ...], dict]]:
  """Per name in `names`: (vectors per text encoder, that concept's metadata), read from
  one checkpoint of a many-concept run (latest if `step` is None).

  Each is what `encoder_vectors_from_workdir` gives for a single run: one `[n, D_e]`
  array per text encoder (row k of each `[K, n, D_e]` key, its first `active_vectors`
  vectors) and the metadata of `concept_metadata`. A concept that went non-finite in
  training (the metadata's "non_finite_concepts") or whose row holds NaN/inf is refused
  in one line naming it and the others.
  """
  read_identity(workdir)
  # Not whole: a concept's non-finite row refuses that concept alone, below.
  params, metadata = _restore_params(workdir, step, check_finite=False)
  where = f"{workdir} checkpoint {metadata.get('step', step)}"
  entries = concept_entries(metadata, where)
  if entries is None:  # run.json lists concepts but the checkpoint does not
    raise WorkdirError(f"{where} is not a checkpoint of a many-concept run (its metadata "
                       f"lists no {CONCEPTS_KEY!r})")
  index = {e["name"]: k for k, e in enumerate(entries)}
  failed = dict(metadata.get(NON_FINITE_KEY) or {})
  keys = [k for k in EMBEDS_KEYS if k in params]
  stacked = [np.asarray(params[k], np.float32) for k in keys]  # each [K, n, D_e]
  for key, a in zip(keys, stacked):
    if a.ndim != 3 or a.shape[0] != len(entries):
      raise WorkdirError(f"{where}: {key!r} has shape {tuple(a.shape)}, not [{len(entries)}, "
                         "n, D] (one row per concept)")
  out = []
  for name in names:
    if name not in index:
      raise WorkdirError(f"{where} has no concept {name!r}; its concepts: "
                         f"{', '.join(index)}")
    k = index[name]
    rows = [a[k] for a in stacked]  # each [n, D_e]
    usable = ", ".join(n for n in index if n not in failed and n != name) or "none"
    if name in failed or not vectors_finite(rows):
      what = (f"went non-finite (NaN or inf) at step {failed[name]} and was frozen at "
              "its last finite vectors" if name in failed else "holds NaN or inf vectors")
      raise WorkdirError(f"concept {name!r} of {where} {what}: its vectors are refused; the "
                         f"run's other concepts: {usable}")
    meta = concept_metadata(metadata, entries[k])
    active = int(meta.get("active_vectors") or len(rows[0]))
    out.append((tuple(r[:active] for r in rows), meta))
  return out
