"""Exports a run's learned embedding for diffusers, AUTOMATIC1111 or kohya.

  python -m ti_jax.export --workdir runs/my-style --format a1111
  python -m ti_jax.export --workdir runs/my-style --format diffusers --output style.safetensors

Formats: diffusers (`{token: [n, dim]}` safetensors, for `load_textual_inversion`),
a1111 (safetensors) and a1111-pt (`.pt` with string_to_param/string_to_token/
name/step; needs torch), kohya (`{"emb_params": [n, dim]}` safetensors).
Each format has its own default file, so exporting several never replaces one:
  WORKDIR/export/diffusers/learned_embeds.safetensors
  WORKDIR/export/a1111/<token>.safetensors     WORKDIR/export/a1111-pt/<token>.pt
  WORKDIR/export/kohya/<token>.safetensors
A1111, kohya and ComfyUI name an embedding after its file, so those files
keep the token's own characters (`<toy>.safetensors`; `_toy_` on Windows,
which forbids `<>` in file names). An existing file is replaced only with
--overwrite. The files also load back into `ti_jax.sample --embeddings` and as
`--config.init_embedding` for further training.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from ti_jax import checkpointing, embedding_io, fileio


def _write_atomically(path: str, writer) -> None:
  """`writer(tmp)` then a rename onto `path`: an interrupted export never leaves half a file."""
  if fileio.is_remote(path):  # an object store upload replaces the object whole
    fileio.write_via_local_file(path, writer)
    return
  folder, name = os.path.split(os.path.abspath(path))
  # The temporary name keeps the extension: torch.save and safetensors write by it.
  tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}{os.path.splitext(name)[1]}")
  try:
    writer(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def export(workdir: str, fmt: str, output: str = "", step: int | None = None,
           overwrite: bool = False) -> str:
  """Writes the run's vectors (newest checkpoint, or `step`) in `fmt`; returns the path.

  Refuses NaN/inf vectors (a diverged run) and an existing file unless
  `overwrite`; the file appears whole or not at all.
  """
  return export_with_token(workdir, fmt, output, step, overwrite)[0]


def export_with_token(workdir: str, fmt: str, output: str = "", step: int | None = None,
                      overwrite: bool = False) -> tuple[str, str]:
  """`export`, also returning the run's placeholder token (for the usage line)."""
  if fmt not in embedding_io.FORMATS:
    raise embedding_io.EmbeddingFileError(
        f"unknown format {fmt!r} (known: {', '.join(embedding_io.FORMATS)})")
  if not fileio.exists(workdir):
    raise checkpointing.WorkdirError(f"run directory {workdir} does not exist")
  if not fileio.is_dir(workdir):
    raise checkpointing.WorkdirError(f"run directory {workdir} is a file, not a folder")
  vectors, meta = checkpointing.learned_from_workdir(workdir, step)
  ckpt = f"{workdir} checkpoint {meta.get('step', '?')}"
  try:
    vectors = embedding_io.check_vectors(vectors, ckpt)
  except embedding_io.EmbeddingFileError as e:
    raise embedding_io.EmbeddingFileError(f"{e}; nothing exported (pass --step of an earlier "
                                          "checkpoint)") from None
  concept = embedding_io.Concept(meta["placeholder_token"], vectors, ckpt)
  path = output or fileio.join(workdir, "export",
                               *embedding_io.default_filename(concept.token, fmt).split("/"))
  if fileio.is_dir(path):
    raise embedding_io.EmbeddingFileError(f"--output {path} is a folder; give a file name")
  if fileio.exists(path) and not overwrite:
    raise embedding_io.EmbeddingFileError(f"{path} already exists; pass --overwrite to "
                                          "replace it (or --output another file)")
  parent = os.path.dirname(path) if not fileio.is_remote(path) else path.rsplit("/", 1)[0]
  if parent:
    fileio.makedirs(parent)
  _write_atomically(path, lambda local: embedding_io.write_embedding_file(
      local, concept, fmt, step=int(meta.get("step", 0))))
  return path, concept.token


def main(argv: Sequence[str]) -> None:
  from ti_jax import cli  # pylint: disable=import-outside-toplevel
  f = cli.start(argv)
  try:
    path, token = export_with_token(f.workdir, f.format, f.output, f.step, overwrite=f.overwrite)
  except (embedding_io.EmbeddingFileError, checkpointing.WorkdirError) as e:
    raise SystemExit(f"error: {e}") from None
  except OSError as e:  # e.g. a read-only folder, or a file stands where a folder should
    raise SystemExit(f"error: cannot write {f.output or 'the export'}: {e.strerror or e}") from None
  print(f"wrote {path}", file=sys.stderr)
  print(embedding_io.prompt_usage(path, token, f.format), file=sys.stderr)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
  flags.DEFINE_enum("format", "diffusers", list(embedding_io.FORMATS),
                    "diffusers | a1111 (.safetensors) | a1111-pt (.pt) | kohya.")
  flags.DEFINE_string("output", "", "Output file (default: WORKDIR/export/FORMAT/<name>, "
                      "a folder per format).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_bool("overwrite", False, "Replace the output file if it exists.")
  from ti_jax.cli import flags_parser  # pylint: disable=import-outside-toplevel
  app.run(main, flags_parser=flags_parser)
