"""Runs ti_jax's step and the diffusers-style PyTorch step on the same shapes; prints both and the ratios.

  python benchmarks/compare.py --model small --batch 1
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import common  # benchmarks/common.py: a script's own folder is on sys.path
from absl import app, flags

# No --dtype or --json_out: the two sides' dtypes differ, and the results are printed.
common.define_model_flags(dtype=None, batch_help="Per-device batch (both sides).", json_out=False)
flags.DEFINE_string("jax_dtype", "float32", "ti_jax frozen-model dtype.")
flags.DEFINE_integer("steps", 10, "Timed steps per side.")
FLAGS = flags.FLAGS
HERE = os.path.dirname(os.path.abspath(__file__))


def _run(script, *args):
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    subprocess.run([sys.executable, os.path.join(HERE, script), *args, f"--json_out={out.name}"],
                   check=True)
    return json.load(open(out.name))


def main(argv):
  del argv
  common = [f"--model={FLAGS.model}", f"--batch={FLAGS.batch}", f"--steps={FLAGS.steps}"]
  ours = _run("train_step.py", *common, f"--dtype={FLAGS.jax_dtype}")
  ref = _run("torch_reference.py", *common)
  print(f"\n{'':>22}  {'ti_jax':>12}  {'PyTorch ref':>12}  ratio")
  for key in ("images_per_s", "gflop_per_image", "peak_memory_gib"):
    print(f"{key:>22}  {ours[key]:>12.4g}  {ref[key]:>12.4g}  {ours[key] / ref[key]:.3f}")


if __name__ == "__main__":
  app.run(main)
