"""Trains `tiny-world`: a small Stable Diffusion learned from scratch on ti_jax's procedural world.

  python -m ti_jax.train_world --workdir runs/world --steps 16000 --seed 0

Three resumable phases (the attribute checker, the KL autoencoder, then the
UNet with the text encoder), each checkpointed in --workdir: re-running the
same command continues where it stopped, and a larger --steps extends a finished
run (the diffusion rate is constant after warmup, so the extension equals a
longer run). The shipped `tiny-world` is 16,000 steps. At the end it writes a diffusers
folder (loadable by `StableDiffusionPipeline.from_pretrained` too) with the
checker files and a TRAINING.md to --out_dir (default: --workdir/tiny-world).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ti_jax import cli, errors
from ti_jax.world import base_model


def main(argv: Sequence[str]) -> None:
  f = cli.start(argv)
  settings = base_model.Settings(
      seed=f.seed, steps=f.steps, vae_steps=f.vae_steps, checker_steps=f.checker_steps,
      batch_size=f.batch_size, vae_batch_size=f.vae_batch_size, num_images=f.num_images,
      checkpoint_every=f.checkpoint_every)
  try:
    result = base_model.train_world(f.workdir, f.out_dir or None, settings,
                                    num_devices=f.num_devices or None,
                                    command=" ".join(["python -m ti_jax.train_world"] + sys.argv[1:]))
  except errors.UserError as e:
    cli.exit_now(f"error: {e}", 1)
  print(f"wrote {result['out_dir']} (diffusion loss {result['diffusion'].get('loss', float('nan')):.4f}, "
        f"{result['seconds'] / 60:.1f} min)", flush=True)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  defaults = base_model.Settings()
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, the checker. "
                      "Re-use it to resume.", required=True)
  flags.DEFINE_string("out_dir", "", "Model folder to write (default: WORKDIR/tiny-world).")
  flags.DEFINE_integer("seed", defaults.seed, "Seed of the world, the weights and every step.")
  flags.DEFINE_integer("steps", defaults.steps, "Diffusion (UNet + text encoder) steps; raise it to "
                       "extend a finished run.")
  flags.DEFINE_integer("vae_steps", defaults.vae_steps, "Autoencoder steps.")
  flags.DEFINE_integer("checker_steps", defaults.checker_steps, "Attribute checker steps.")
  flags.DEFINE_integer("batch_size", defaults.batch_size, "Global diffusion batch.")
  flags.DEFINE_integer("vae_batch_size", defaults.vae_batch_size, "Global autoencoder batch.")
  flags.DEFINE_integer("num_images", defaults.num_images, "Captioned renders of the diffusion phase.")
  flags.DEFINE_integer("checkpoint_every", defaults.checkpoint_every, "Steps between checkpoints.")
  flags.DEFINE_integer("num_devices", 0, "Local devices to shard over (0: all).")
  app.run(main, flags_parser=cli.flags_parser)
