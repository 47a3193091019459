"""Orbax checkpoints of a textual-inversion run and the run's identity record.

A run directory (`--workdir`) holds:
  run.json                 what this run learns (placeholder, base model, data...)
  checkpoints/<step>/      Orbax: {"state": learned vectors, optimizer state,
                           step and rng key data; "metadata": JSON}
  metrics.jsonl            one JSON line per logged step
  validation/              validation PNGs
  learned_embeds.safetensors  the final vectors in diffusers' format
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ti_jax import fileio, safetensors_io

# Fields of run.json that define what a run learns: resuming with any of them
# changed would silently mix two concepts, so it is refused.
IDENTITY_FIELDS = ("placeholder_token", "num_vectors", "initializer_token",
                   "pretrained_model_name_or_path", "learnable_property", "train_data_dir",
                   "resolution", "per_image_tokens")
# Values of identity fields added after runs were first written.
_IDENTITY_DEFAULTS = {"per_image_tokens": False}


class WorkdirError(ValueError):
  """The workdir belongs to another run or is unusable; one-line message."""


def check_identity(workdir: str, identity: dict) -> bool:
  """Checks that `workdir` is new or holds a run that learns the same thing (writes nothing).

  Returns True if the workdir already holds this run (so training resumes).
  """
  if fileio.exists(workdir) and not fileio.is_dir(workdir):
    raise WorkdirError(f"--workdir {workdir} is a file, not a directory")
  path = fileio.join(workdir, "run.json")
  if not fileio.exists(path):
    return False
  try:
    existing = json.loads(fileio.read_text(path))
  except (OSError, json.JSONDecodeError) as e:
    raise WorkdirError(f"cannot read {path}: {e}") from None
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
    fileio.write_text(fileio.join(workdir, "run.json"),
                      json.dumps(identity, indent=2, sort_keys=True))
  except OSError as e:
    raise WorkdirError(f"cannot write to --workdir {workdir}: {e}") from None


def read_identity(workdir: str) -> dict:
  path = fileio.join(workdir, "run.json")
  if not fileio.exists(path):
    raise WorkdirError(f"{workdir} is not a ti_jax run directory (no run.json)")
  return json.loads(fileio.read_text(path))


class Checkpoints:
  """Saves and restores {state pytree, JSON metadata} with an Orbax CheckpointManager."""

  def __init__(self, workdir: str, max_to_keep: int | None = 3):
    self.directory = fileio.join(fileio.resolve(workdir), "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "metadata"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, metadata: dict) -> None:
    """Saves host arrays at `step` (a no-op if that step is already saved)."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(jax.device_get(state)),
        metadata=ocp.args.JsonSave(metadata)))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores the state (shaped like `abstract_state`) and metadata saved at `step`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()))
    return restored.state, restored.metadata

  def restore_untyped(self, step: int) -> tuple[dict, dict]:
    """Restores the state as nested dicts of numpy arrays (no template needed) and metadata."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), metadata=ocp.args.JsonRestore()))
    return restored.state, restored.metadata

  def restore_metadata(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(
        metadata=ocp.args.JsonRestore())).metadata

  def wait(self) -> None:
    """Blocks until asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def write_learned_embeds(path: str, tokens: list[str], vectors: np.ndarray,
                         placeholder_token: str) -> None:
  """diffusers' `learned_embeds.safetensors`: `{placeholder_token: [num_vectors, D]}`."""
  del tokens  # diffusers stores all vectors of a multi-vector token under the first name
  fileio.write_via_local_file(path, lambda local: safetensors_io.save(
      local, {placeholder_token: np.asarray(vectors, np.float32)}, {"format": "pt"}))


def learned_from_workdir(workdir: str, step: int | None = None) -> tuple[np.ndarray, dict]:
  """The learned vectors `[n, dim]` and metadata of a run's checkpoint (latest if `step` is None).

  With progressive_words, only the vectors that had entered training by that
  step are returned (the others still hold their initial values).
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
    state, metadata = ckpts.restore_untyped(step)
  finally:
    ckpts.close()
  vectors = np.asarray(state["state"]["params"]["embeds"], np.float32)
  return vectors[:int(metadata.get("active_vectors") or len(vectors))], metadata
