"""Exports a run's learned embedding for diffusers, AUTOMATIC1111 or kohya.

  python -m ti_jax.export --workdir runs/my-style --format a1111
  python -m ti_jax.export --workdir runs/my-style --format diffusers --output style.safetensors

Formats: diffusers (`{token: [n, dim]}` safetensors, for `load_textual_inversion`),
a1111 (safetensors) and a1111-pt (`.pt` with string_to_param/string_to_token/
name/step; needs torch), kohya (`{"emb_params": [n, dim]}` safetensors).
The files also load back into `ti_jax.sample --embeddings` and as
`--config.init_embedding` for further training.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from ti_jax import checkpointing, embedding_io, fileio


def export(workdir: str, fmt: str, output: str = "", step: int | None = None) -> str:
  """Writes the run's vectors (newest checkpoint, or `step`) in `fmt`; returns the path."""
  vectors, meta = checkpointing.learned_from_workdir(workdir, step)
  concept = embedding_io.Concept(meta["placeholder_token"], vectors, workdir)
  if fmt not in embedding_io.FORMATS:
    raise embedding_io.EmbeddingFileError(
        f"unknown format {fmt!r} (known: {', '.join(embedding_io.FORMATS)})")
  path = output or fileio.join(workdir, "export",
                               embedding_io.default_filename(concept.token, fmt))
  parent = os.path.dirname(path) if not fileio.is_remote(path) else path.rsplit("/", 1)[0]
  if parent:
    fileio.makedirs(parent)
  fileio.write_via_local_file(path, lambda local: embedding_io.write_embedding_file(
      local, concept, fmt, step=int(meta.get("step", 0))))
  return path


def main(argv: Sequence[str]) -> None:
  from ti_jax import cli  # pylint: disable=import-outside-toplevel
  f = cli.start(argv)
  try:
    path = export(f.workdir, f.format, f.output, f.step)
  except (embedding_io.EmbeddingFileError, checkpointing.WorkdirError) as e:
    raise SystemExit(f"error: {e}") from None
  except OSError as e:  # e.g. --output names a folder, or a file stands where a folder should
    raise SystemExit(f"error: cannot write {f.output or 'the export'}: {e.strerror or e}") from None
  print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
  flags.DEFINE_enum("format", "diffusers", list(embedding_io.FORMATS),
                    "diffusers | a1111 (.safetensors) | a1111-pt (.pt) | kohya.")
  flags.DEFINE_string("output", "", "Output file (default: WORKDIR/export/<name>).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  from ti_jax.cli import flags_parser  # pylint: disable=import-outside-toplevel
  app.run(main, flags_parser=flags_parser)
