"""A many-concept run directory written directly, as the trainer writes one (no training):
run.json with its "concepts" list and one Orbax checkpoint whose params hold `[K, n, D]`
vectors. For the tests of everything that reads such a run (run_dir, export, sample,
evaluate)."""

import os

import numpy as np

from ti_jax.runtime import run_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "examples", "toy")
STYLE = os.path.join(REPO, "examples", "style")


def concept_entry(name: str, token: str, folder: str = TOY, **fields) -> dict:
  """One concept's entry of run.json's and the checkpoint's "concepts" list."""
  entry = {"name": name, "placeholder_token": token, "train_data_dir": folder,
           "initializer_token": "toy", "learnable_property": "object", "caption_extension": "",
           "init_embedding": "", "learning_rate": 5e-3, "seed": 0,
           "train_data_path": os.path.abspath(folder)}
  entry.update(fields)
  return entry


def write_multi_run(workdir: str, model_dir: str, entries, *, step: int = 4,
                    num_vectors: int = 2, widths=(32,), non_finite=None, resolution: int = 64,
                    seed: int = 0) -> list[tuple[np.ndarray, ...]]:
  """Writes a many-concept run of `entries` on the model at `model_dir`; returns each
  concept's vectors per text encoder (`[num_vectors, D_e]` each), as saved.

  `widths`: the text encoders' widths ((32,) tiny SD, (32, 32) tiny SDXL); `non_finite`:
  the metadata's {name: step} of concepts frozen after going non-finite.
  """
  rng = np.random.default_rng(seed)
  k = len(entries)
  keys = run_dir.EMBEDS_KEYS[:len(widths)]
  stacked = {key: rng.normal(size=(k, num_vectors, w)).astype(np.float32)  # [K, n, D_e]
             for key, w in zip(keys, widths)}
  config = {"pretrained_model_name_or_path": model_dir, "resolution": resolution,
            "center_crop": False, "num_vectors": num_vectors, "placeholder_token": "<concept>",
            "train_data_dir": "", "learning_rate": 5e-3, "max_train_steps": step,
            "concepts_file": "concepts.jsonl"}
  shared = {"pretrained_model_name_or_path": model_dir, "model_path": model_dir,
            "resolution": resolution, "num_vectors": num_vectors, "config": config}
  identity = {**shared, run_dir.CONCEPTS_KEY: [
      {f: e[f] for f in ("name",) + run_dir.CONCEPT_FIELDS} for e in entries]}
  del identity["config"]
  run_dir.write_identity(workdir, identity)
  metadata = {**shared, run_dir.CONCEPTS_KEY: list(entries), "step": step,
              "active_vectors": num_vectors}
  if non_finite:
    metadata[run_dir.NON_FINITE_KEY] = dict(non_finite)
  ckpts = run_dir.Checkpoints(workdir)
  try:
    ckpts.save(step, {"state": {"params": stacked, "step": np.int32(step)}}, metadata)
  finally:
    ckpts.close()
  return [tuple(stacked[key][i] for key in keys) for i in range(k)]
