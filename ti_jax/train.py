"""Learns a pseudo-word for a concept from a few images (Textual Inversion).

  python -m ti_jax.train --config configs/style.py --workdir runs/my-style \\
      --config.train_data_dir=path/to/images --config.placeholder_token='<my-style>'

  # offline demo: tiny random-weight model, shipped example images; about 1 minute
  # on a 2-core CPU (58 s measured from an empty cache, see README "Quick start")
  python -m ti_jax.train --config configs/object.py:tiny --workdir runs/demo

The batch is sharded over every local device with `jax.pmap`. Re-running the
same command resumes from the newest checkpoint in --workdir. Ctrl-C or
SIGTERM saves a checkpoint before exiting. --dry_run loads and checks every input,
prints each image's size, caption or templates and example token ids, and exits
without training or writing anything.
"""

from __future__ import annotations

from typing import Sequence

from ti_jax import cli, errors
from ti_jax.runtime import distributed
from ti_jax.training import concepts_run, dry_run, loop, trainer


def main(argv: Sequence[str]) -> None:
  f = cli.start(argv)
  config = cli.config_or_exit(f)
  if f.dry_run:  # before the compilation cache and the workdir: a dry run writes nothing
    try:
      print("\n".join(dry_run.dry_run(config, f.workdir)), flush=True)
    except errors.UserError as e:
      cli.exit_now(f"error: {e}", 1)
    return
  distributed.maybe_initialize(f.coordinator_address, f.num_processes, f.process_id)
  # Process-wide JAX settings belong to the program, not to the library's `run`.
  distributed.enable_compilation_cache(config.compilation_cache_dir)
  try:
    run = concepts_run.run if config.concepts_file else trainer.run  # many concepts, or one
    result = run(config, f.workdir)
  except errors.UserError as e:
    cli.exit_now(f"error: {e}", 1)
  except loop.Aborted as e:
    cli.exit_now(f"error: {e}", 130)
  if result["interrupted"]:
    raise SystemExit(130)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file(
      "config", None, "Training config file, e.g. configs/style.py or configs/object.py:tiny. "
      "Override fields with --config.FIELD=VALUE (see the config file for every field).",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, validation images "
                      "and the final learned_embeds.safetensors. Re-use it to resume.")
  flags.DEFINE_bool("dry_run", False, "Load and check every input, print each image's size, "
                    "caption or templates and an example prompt's token ids (with the "
                    "placeholder's position), and exit without training or writing anything.")
  flags.mark_flags_as_required(["config", "workdir"])
  distributed.define_flags()
  app.run(main, flags_parser=cli.flags_parser)
