"""Writes a tiny random-weight diffusers model folder (see `ti_jax.weights.tiny_models`).

  python -m ti_jax.tiny_model --out_dir /tmp/tiny-sd --preset tiny-sd15

It loads in ti_jax and in diffusers' PyTorch pipelines, without the network;
its images are noise-like by design.
"""

from __future__ import annotations

import os

from ti_jax import cli
from ti_jax.weights import tiny_models


def main(argv):
  f = cli.start(argv)
  if not 0 <= f.seed < 2**32:  # numpy's generator takes no negative seed
    raise SystemExit(f"error: --seed must be in [0, 2**32), got {f.seed}")
  if not f.out_dir:
    raise SystemExit("error: --out_dir is empty: give the folder to write the model into")
  if os.path.exists(f.out_dir) and not os.path.isdir(f.out_dir):
    raise SystemExit(f"error: --out_dir {f.out_dir} is a file, not a folder")
  if os.path.exists(os.path.join(f.out_dir, "model_index.json")) and not f.overwrite:
    raise SystemExit(f"error: {f.out_dir} already holds a model; pass --overwrite to replace it")
  try:
    tiny_models.write_tiny_model(f.out_dir, f.preset, f.seed)
  except OSError as e:  # e.g. a read-only parent folder, or a file where a subfolder goes
    raise SystemExit(f"error: cannot write the model to {f.out_dir}: "
                     f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}") from None
  family = {"tiny-ldm": "LDM", "tiny-sdxl": "Stable Diffusion XL",
            "tiny-flux": "FLUX.1"}.get(f.preset, "Stable Diffusion")
  print(f"wrote tiny random-weight {family} "
        f"({f.preset}) to {f.out_dir}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("out_dir", None, "Folder to write the diffusers-format model into.",
                      required=True)
  flags.DEFINE_enum("preset", "tiny-sd15", list(tiny_models.TINY_PRESETS),
                    "tiny-ldm: the paper's LDM-1.4B layout (LDMBert + BERT tokenizer, DDIM); "
                    "tiny-sd15: SD 1.x topology (conv proj, quick_gelu, epsilon); "
                    "tiny-sd21: SD 2.x topology (linear proj, per-block heads, upcast "
                    "attention, gelu, v-prediction); tiny-sdxl: SDXL topology (two text "
                    "encoders, the second with projection, added size/crop conditioning, Euler); "
                    "tiny-flux: FLUX.1-dev topology (double and single-stream transformer, "
                    "16-channel VAE, CLIP-L + T5 with a tiny T5 tokenizer, flow matching).")
  flags.DEFINE_integer("seed", 0, "Seed of the random weights.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing model in --out_dir.")
  app.run(main, flags_parser=cli.flags_parser)
