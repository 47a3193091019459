"""Exports a run's learned vectors as an embedding file for another tool.

`python -m ti_jax.export` is its command line; `embedding_writer` writes the formats
(`embedding_io` reads them back).
"""

from __future__ import annotations

import os

from ti_jax.embeddings import embedding_io, embedding_writer
from ti_jax.runtime import fileio, run_dir


def export(workdir: str, fmt: str, output: str = "", step: int | None = None,
           overwrite: bool = False) -> str:
  """Writes the run's vectors (newest checkpoint, or `step`) in `fmt`; returns the path.

  Refuses NaN/inf vectors (a diverged run) and an existing file unless
  `overwrite`; the file appears whole or not at all.
  """
  return export_with_token(workdir, fmt, output, step, overwrite)[0]


def export_with_token(workdir: str, fmt: str, output: str = "", step: int | None = None,
                      overwrite: bool = False) -> tuple[str, embedding_io.Concept]:
  """`export`, also returning the exported concept (its token for the usage line)."""
  if fmt not in embedding_writer.FORMATS:
    raise embedding_io.EmbeddingFileError(
        f"unknown format {fmt!r} (known: {', '.join(embedding_writer.FORMATS)})")
  if not fileio.exists(workdir):
    raise run_dir.WorkdirError(f"run directory {workdir} does not exist")
  if not fileio.is_dir(workdir):
    raise run_dir.WorkdirError(f"run directory {workdir} is a file, not a folder")
  # An SDXL run gives both encoders' vectors: the pair (diffusers) or clip_l/clip_g (A1111, kohya).
  vectors, meta = run_dir.encoder_vectors_from_workdir(workdir, step)
  ckpt = f"{workdir} checkpoint {meta.get('step', '?')}"
  try:
    vectors = tuple(embedding_io.check_vectors(v, ckpt) for v in vectors)
  except embedding_io.EmbeddingFileError as e:
    raise embedding_io.EmbeddingFileError(f"{e}; nothing exported (pass --step of an earlier "
                                          "checkpoint)") from None
  concept = embedding_io.Concept(meta["placeholder_token"], vectors, ckpt)
  path = output or fileio.join(workdir, "export",
                               *embedding_writer.default_filename(concept.token, fmt).split("/"))
  return write_export(path, concept, fmt, overwrite, step=int(meta.get("step", 0))), concept


def write_export(path: str, concept: embedding_io.Concept, fmt: str, overwrite: bool,
                 step: int = 0) -> str:
  """Writes `concept` in `fmt` to `path` (its folder made); returns `path`.

  Refuses a folder at `path`, and, unless `overwrite`, any of the files the
  format makes (`embedding_writer.output_files`: two for a diffusers SDXL pair)
  that already exists; the files appear whole or not at all.
  """
  if fileio.is_dir(path):
    raise embedding_io.EmbeddingFileError(f"--output {path} is a folder; give a file name")
  for file in embedding_writer.output_files(path, concept, fmt):
    if fileio.is_dir(file):
      raise embedding_io.EmbeddingFileError(f"{file} (the pair's second file) is a folder")
    if fileio.exists(file) and not overwrite:
      raise embedding_io.EmbeddingFileError(f"{file} already exists; pass --overwrite to "
                                            "replace it (or --output another file)")
  parent = os.path.dirname(path) if not fileio.is_remote(path) else path.rsplit("/", 1)[0]
  if parent:
    fileio.makedirs(parent)
  embedding_writer.save_embedding(path, concept, fmt, step=step)
  return path
