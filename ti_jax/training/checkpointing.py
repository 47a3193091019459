"""What a training run checks and records in its run directory (whose format is
`ti_jax.runtime.run_dir`'s).

This module owns the run's identity and every check made before a run resumes:
`run_identity` and `run_metadata` (what a run learns; which fields count is
`ti_jax.training.config`'s), `check_identity` (run.json), `resume` (the
checkpoints' own metadata, the shapes of their vectors, a changed global batch)
and `claim_workdir`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from ti_jax.runtime import console, fileio, parallel, run_dir
from ti_jax.training.config import (CHECKPOINT_DEFAULTS, CHECKPOINT_IDENTITY, IDENTITY_DEFAULTS,
                                    IDENTITY_FIELDS, bucket_identity)


def run_identity(config) -> dict:
  """The run.json record of a training config: its IDENTITY_FIELDS."""
  computed = {"buckets": bucket_identity(config)}
  return {k: computed[k] if k in computed else config[k] for k in IDENTITY_FIELDS}


def run_metadata(config, *, tokens: list[str], token_ids: list[int], image_tokens: list[str],
                 embedding_dim: int, model_path: str, global_batch: int, base_lr: float,
                 image_paths: list[str], prompt_texts_sha256: str = "",
                 further_encoders: Sequence[tuple[str, list[int], int]] = ()) -> dict:
  """The metadata every checkpoint of the run carries: its CHECKPOINT_IDENTITY and what
  sample/export/evaluate need to use it (tokens, base model, images, the config).

  `token_ids` and `embedding_dim` are the first text encoder's; `further_encoders`
  gives (suffix, its tokens' ids, width) for each further one, recorded under the
  names with its suffix (SDXL: "token_ids_2", "embedding_dim_2"; its state holds
  "embeds_2"). The base model, part of the identity, already tells an SDXL run from
  another.
  """
  further = {}
  for suffix, ids, width in further_encoders:
    further.update({"token_ids" + suffix: list(ids), "embedding_dim" + suffix: int(width)})
  return {**further,
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


def identity_diffs(saved: dict, run: dict) -> list[str]:
  """`field: saved there, run now` for each CHECKPOINT_IDENTITY field that differs.

  Fields an older checkpoint did not record are not compared, unless they have
  a default in CHECKPOINT_DEFAULTS (the value it was made with).
  """
  def norm(v):  # JSON turns tuples into lists
    return list(v) if isinstance(v, tuple) else v
  saved = {**{k: v for k, v in CHECKPOINT_DEFAULTS.items() if k in run}, **saved}
  hints = {"prompt_texts_sha256": " (a caption file or the templates file changed)"}
  diffs = [f"{k}: {saved[k]!r} there, {run.get(k)!r} now{hints.get(k, '')}"
           for k in CHECKPOINT_IDENTITY if k in saved and norm(saved[k]) != norm(run.get(k))]
  # A run of many concepts: the same concepts in the same order, each learning the same.
  saved_concepts, run_concepts = saved.get(run_dir.CONCEPTS_KEY), run.get(run_dir.CONCEPTS_KEY)
  if saved_concepts is None and run_concepts is None:
    return diffs
  saved_names = [e.get("name") for e in saved_concepts or []]
  run_names = [e.get("name") for e in run_concepts or []]
  if saved_names != run_names:
    return diffs + [f"concepts: {saved_names or None} there, {run_names or None} now"]
  for there, now in zip(saved_concepts, run_concepts):
    diffs += [f"concept {now['name']} {d}" for d in identity_diffs(there, now)]
  return diffs


def check_identity(workdir: str, identity: dict) -> bool:
  """Checks that `workdir` is new or holds a run that learns the same thing (writes nothing).

  Returns True if the workdir already holds this run (so training resumes).
  """
  if fileio.exists(workdir) and not fileio.is_dir(workdir):
    raise run_dir.WorkdirError(f"--workdir {workdir} is a file, not a directory")
  path = fileio.join(workdir, "run.json")
  if not fileio.exists(path):
    return False
  existing = run_dir.read_json_object(path)
  diffs = [f"{k}: {existing.get(k, IDENTITY_DEFAULTS.get(k))!r} there, {identity.get(k)!r} now"
           for k in IDENTITY_FIELDS
           if existing.get(k, IDENTITY_DEFAULTS.get(k)) != identity.get(k)]
  if diffs:
    raise run_dir.WorkdirError(
        f"workdir {workdir} holds another run ({'; '.join(diffs)}); use a new --workdir "
        "or restore the original settings to resume")
  return True


# ---------------------------------------------------------------------------
# Resuming a training run.
# ---------------------------------------------------------------------------


def check_checkpoint(step: int, saved_meta: dict, metadata: dict, saved_params: Any,
                     start_params: Any, workdir: str) -> None:
  """Refuses a readable checkpoint this run must not resume: another run made it (its
  CHECKPOINT_IDENTITY differs), or its vectors have other shapes than `start_params`."""
  diffs = identity_diffs(saved_meta, metadata)
  if diffs:
    raise run_dir.WorkdirError(
        f"checkpoint {step} in {workdir} was made by another run ({'; '.join(diffs)}); "
        "use a new --workdir or restore the original settings to resume")
  want = jax.tree_util.tree_map(np.shape, start_params)
  saved_shapes = jax.tree_util.tree_map(np.shape, saved_params)
  if saved_shapes != want:
    raise run_dir.WorkdirError(
        f"checkpoint {step} in {workdir} holds vectors of shapes {saved_shapes}, this run "
        f"needs {want} (did the number of training images change?); use a new --workdir")


def restore_newest(ckpts: run_dir.Checkpoints, start_state: Any, metadata: dict,
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
    except run_dir.UnreadableCheckpointError as e:
      moved = ckpts.set_aside(step)
      console.log(f"warning: skipping checkpoint {step} in {ckpts.directory}: {e.why}; "
              f"moved it to {moved}")
      continue
    return restored["state"], step, saved_meta
  return start_state, None, None


def resume(ckpts: run_dir.Checkpoints, start_state: Any, metadata: dict, identity: dict,
           workdir: str, has_run_json: bool) -> Any:
  """The state a run starts from: its newest usable checkpoint, or `start_state` (step 0).

  Says which on stderr, warns when the global batch changed since the
  checkpoint, then writes run.json (`identity`, see `run_identity`) if missing. Raises
  run_dir.WorkdirError on every process if a checkpoint belongs to another run.
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
  error = None
  if jax.process_index() == 0:
    try:
      run_dir.write_identity(workdir, identity)
    except run_dir.WorkdirError as e:
      error = e
  if parallel.any_process(error is not None):
    raise error or run_dir.WorkdirError("process 0 could not write run.json; see its log")
