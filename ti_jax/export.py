"""Exports a run's learned embedding for diffusers, AUTOMATIC1111 or kohya.

  python -m ti_jax.export --workdir runs/my-style --format a1111
  python -m ti_jax.export --workdir runs/my-style --format diffusers --output style.safetensors

Formats: diffusers (`{token: [n, dim]}` safetensors, for `load_textual_inversion`),
a1111 (`{"emb_params": [n, dim]}` safetensors with name/step metadata) and
a1111-pt (`.pt` with string_to_param/string_to_token/name/step; needs torch),
kohya (`{"emb_params": [n, dim]}` safetensors). An SDXL run's vectors go to
`{"clip_l": ..., "clip_g": ...}` (a1111, kohya; a1111-pt as .pt) or, for
diffusers, to the pair learned_embeds.safetensors + learned_embeds_2.safetensors
(embedding_io's module docstring has the formats). Each format has its own
default file, so exporting several never replaces one:
  WORKDIR/export/diffusers/learned_embeds.safetensors
  WORKDIR/export/a1111/<token>.safetensors     WORKDIR/export/a1111-pt/<token>.pt
  WORKDIR/export/kohya/<token>.safetensors
A1111, kohya and ComfyUI name an embedding after its file, so those files
keep the token's own characters (`<toy>.safetensors`; `_toy_` on Windows,
which forbids `<>` in file names). InvokeAI also names it after its file but
reads `<NAME>` triggers of letters, digits and `._-` only: the usage line
printed after an export names the `--output` file to write for it
(`toy.safetensors`, typed `<toy>`). An existing file is replaced only with
--overwrite.

A run of many concepts (`config.concepts_file`) exports the concepts `--concept`
names (repeat it, separate names with commas, or `all`), one file per concept:
  python -m ti_jax.export --workdir runs/many --concept cat-toy,tea-pot --format a1111
  -> runs/many/cat-toy/export/a1111/<cat-toy>.safetensors, runs/many/tea-pot/export/...
With several concepts, --output names a folder: OUTPUT/<name>/<file>. A concept whose
training went non-finite is refused, and then nothing is written. The files also load back into `ti_jax.sample --embeddings` and as
`--config.init_embedding` for further training.
"""

from __future__ import annotations

import sys
from typing import Sequence

from ti_jax import cli, errors
from ti_jax.embeddings import embedding_writer, exporter, file_names


def main(argv: Sequence[str]) -> None:
  f = cli.start(argv)
  try:
    exported = exporter.export_selected(f.workdir, f.format, f.concept, f.output, f.step,
                                        overwrite=f.overwrite)
  except errors.UserError as e:
    raise SystemExit(f"error: {e}") from None
  except OSError as e:  # e.g. a read-only folder, or a file stands where a folder should
    raise SystemExit(f"error: cannot write {f.output or 'the export'}: {e.strerror or e}") from None
  for path, concept in exported:
    print(f"wrote {' and '.join(embedding_writer.output_files(path, concept, f.format))}",
          file=sys.stderr)
    print(file_names.prompt_usage(path, concept.token, f.format,
                                  sdxl=len(concept.vectors) > 1), file=sys.stderr)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "Training run directory.", required=True)
  flags.DEFINE_enum("format", "diffusers", list(embedding_writer.FORMATS),
                    "diffusers | a1111 (.safetensors) | a1111-pt (.pt) | kohya.")
  flags.DEFINE_string("output", "", "Output file (default: WORKDIR/export/FORMAT/<name>, "
                      "a folder per format).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_bool("overwrite", False, "Replace the output file if it exists.")
  flags.DEFINE_multi_string("concept", [], "A run of many concepts (config.concepts_file): "
                            "the concept(s) to export, by folder name (<cat-toy> is cat-toy); "
                            "repeat it or separate names with commas, or 'all'. Each goes to "
                            "WORKDIR/<name>/export/FORMAT/<file>; with several, --output is a "
                            "folder holding <name>/<file>. Not for a run of one concept.")
  app.run(main, flags_parser=cli.flags_parser)
