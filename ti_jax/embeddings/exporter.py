"""Exports a run's learned vectors as an embedding file for another tool.

`python -m ti_jax.export` is its command line (`export_selected`); `embedding_writer`
writes the formats (`embedding_io` reads them back). A many-concept run exports one
file per concept (`export_concepts`, `concept_export_path`).
"""

from __future__ import annotations

import os
from typing import Sequence

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
  _check_workdir(workdir)
  # An SDXL run gives both encoders' vectors: the pair (diffusers) or clip_l/clip_g (A1111, kohya).
  vectors, meta = run_dir.encoder_vectors_from_workdir(workdir, step)
  concept = _checked_concept(vectors, meta, f"{workdir} checkpoint {meta.get('step', '?')}")
  path = output or fileio.join(workdir, "export",
                               *embedding_writer.default_filename(concept.token, fmt).split("/"))
  return write_export(path, concept, fmt, overwrite, step=int(meta.get("step", 0))), concept


def _check_workdir(workdir: str) -> None:
  if not fileio.exists(workdir):
    raise run_dir.WorkdirError(f"run directory {workdir} does not exist")
  if not fileio.is_dir(workdir):
    raise run_dir.WorkdirError(f"run directory {workdir} is a file, not a folder")


def export_selected(workdir: str, fmt: str, concepts: Sequence[str] = (), output: str = "",
                    step: int | None = None, overwrite: bool = False
                    ) -> list[tuple[str, embedding_io.Concept]]:
  """`ti_jax.export`: (path, concept) of each exported concept.

  A single-concept run is exported as by `export_with_token` (`concepts` must be
  empty); a many-concept run needs `concepts` (`--concept` values: names, comma
  lists, or `all`; `run_dir.select_concepts`) and goes to `export_concepts`.
  """
  _check_workdir(workdir)
  names = run_dir.select_concepts(workdir, concepts)
  if names is None:
    return [export_with_token(workdir, fmt, output, step, overwrite)]
  return export_concepts(workdir, fmt, names, output, step, overwrite)


def concept_export_path(workdir: str, name: str, fmt: str, token: str, output: str = "",
                        several: bool = False) -> str:
  """Where concept `name` (of token `token`) of a many-concept run is exported in `fmt`.

  Without `output`: WORKDIR/<name>/export/<FORMAT>/<file> (the single run's layout
  inside the concept's folder). With `output`: that file for one concept; for
  `several`, a folder holding OUTPUT/<name>/<file>. <file> is the format's default
  name (`embedding_writer.default_filename`: learned_embeds.safetensors for
  diffusers, else the token's file name).
  """
  default = embedding_writer.default_filename(token, fmt)  # "FORMAT/<file>"
  if not output:
    return fileio.join(run_dir.concept_dir(workdir, name), "export", *default.split("/"))
  if not several:
    return output
  return fileio.join(output, name, default.split("/")[-1])


def export_concepts(workdir: str, fmt: str, names: Sequence[str], output: str = "",
                    step: int | None = None, overwrite: bool = False
                    ) -> list[tuple[str, embedding_io.Concept]]:
  """Writes each named concept of a many-concept run in `fmt` (`concept_export_path`);
  returns (path, concept) per name.

  Every concept is read and checked and every target checked before the first file is
  written: a concept that went non-finite, NaN/inf vectors or an existing file (without
  `overwrite`) refuses the whole export, and nothing is written.
  """
  if fmt not in embedding_writer.FORMATS:
    raise embedding_io.EmbeddingFileError(
        f"unknown format {fmt!r} (known: {', '.join(embedding_writer.FORMATS)})")
  several = len(names) > 1
  if output and several and fileio.exists(output) and not fileio.is_dir(output):
    raise embedding_io.EmbeddingFileError(f"--output {output} is a file; with several "
                                          "concepts --output names a folder (one sub-folder "
                                          "per concept)")
  jobs = []
  for vectors, meta in run_dir.concept_vectors_from_workdir(workdir, names, step):
    concept = _checked_concept(
        vectors, meta, f"{workdir} concept {meta['concept']} checkpoint {meta.get('step', '?')}")
    path = concept_export_path(workdir, meta["concept"], fmt, concept.token, output, several)
    _check_target(path, concept, fmt, overwrite)
    jobs.append((path, concept, int(meta.get("step", 0))))
  return [(write_export(path, concept, fmt, overwrite, step=at), concept)
          for path, concept, at in jobs]


def _check_target(path: str, concept: embedding_io.Concept, fmt: str, overwrite: bool) -> None:
  """Refuses a folder at `path`, and, unless `overwrite`, any of the files the format
  makes (`embedding_writer.output_files`: two for a diffusers SDXL pair) that exists."""
  if fileio.is_dir(path):
    raise embedding_io.EmbeddingFileError(f"--output {path} is a folder; give a file name")
  for file in embedding_writer.output_files(path, concept, fmt):
    if fileio.is_dir(file):
      raise embedding_io.EmbeddingFileError(f"{file} (the pair's second file) is a folder")
    if fileio.exists(file) and not overwrite:
      raise embedding_io.EmbeddingFileError(f"{file} already exists; pass --overwrite to "
                                            "replace it (or --output another file)")


def _checked_concept(vectors, meta: dict, what: str) -> embedding_io.Concept:
  """The concept a checkpoint's vectors (one `[n, D]` per text encoder) make, `what` naming
  them; non-finite or malformed vectors are refused in one line, nothing exported."""
  try:
    vectors = tuple(embedding_io.check_vectors(v, what) for v in vectors)
  except embedding_io.EmbeddingFileError as e:
    raise embedding_io.EmbeddingFileError(f"{e}; nothing exported (pass --step of an earlier "
                                          "checkpoint)") from None
  return embedding_io.Concept(meta["placeholder_token"], vectors, what)


def write_export(path: str, concept: embedding_io.Concept, fmt: str, overwrite: bool,
                 step: int = 0) -> str:
  """Writes `concept` in `fmt` to `path` (its folder made); returns `path`.

  Refuses a folder at `path`, and, unless `overwrite`, any of the files the
  format makes (`embedding_writer.output_files`: two for a diffusers SDXL pair)
  that already exists; the files appear whole or not at all.
  """
  _check_target(path, concept, fmt, overwrite)
  parent = os.path.dirname(path) if not fileio.is_remote(path) else path.rsplit("/", 1)[0]
  if parent:
    fileio.makedirs(parent)
  embedding_writer.save_embedding(path, concept, fmt, step=step)
  return path
