"""K concepts in one run (`--config.concepts_file`) vs K separate runs, end to end.

  python benchmarks/concepts.py --num_concepts=1,4,16 --steps=100 --json_out=concepts.json

Each arm is real `python -m ti_jax.train` processes on the tiny model (configs/object.py:tiny,
the shipped examples/toy and examples/style images alternating, each concept its own
token), timed from process start to exit: start-up, model load, VAE cache, compile, the
steps and the export. The separate runs go one after another, as a user runs them; both
arms start from an empty persistent compilation cache, which the separate runs share (so
every run after the first finds the step compiled: the peers' best case, which is why the
concepts share one seed and learning rate; with a seed or rate each, every separate run
would compile its own step). Reports wall seconds and the CPU seconds of the processes
(user + sys), and the speed-up of the one run.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = (os.path.join(REPO, "examples", "toy"), os.path.join(REPO, "examples", "style"))

flags.DEFINE_list("num_concepts", ["1", "4", "16"], "Concept counts K to measure.")
flags.DEFINE_integer("steps", 100, "Training steps of every run.")
flags.DEFINE_string("out_dir", "", "Where the runs go (default: a temporary folder, removed).")
flags.DEFINE_string("json_out", "", "Also write the results as JSON here.")
FLAGS = flags.FLAGS


def _train(workdir: str, cache: str, xla_cache: str, steps: int, *overrides: str) -> None:
  cmd = [sys.executable, "-m", "ti_jax.train", "--config",
         os.path.join(REPO, "configs", "object.py:tiny"), "--workdir", workdir,
         f"--config.cache_dir={cache}", f"--config.compilation_cache_dir={xla_cache}",
         f"--config.max_train_steps={steps}", "--config.validation_prompt=", *overrides]
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  env.pop("XLA_FLAGS", None)  # this machine's devices, as a user has them
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
  if out.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")


def _timed(fn) -> tuple[float, float]:
  """(wall seconds, CPU seconds of the child processes) of `fn()`."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  fn()
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _concepts(k: int) -> list[dict]:
  return [{"placeholder_token": f"<c{i}>", "train_data_dir": FOLDERS[i % 2]} for i in range(k)]


def measure(k: int, steps: int, root: str, cache: str) -> dict:
  """One K: the K separate runs, then the one run of K concepts."""
  concepts = _concepts(k)
  base = os.path.join(root, f"k{k}")
  sep_cache = os.path.join(base, "xla-separate")

  def separate():
    for c in concepts:
      _train(os.path.join(base, "separate", c["placeholder_token"][1:-1]), cache, sep_cache,
             steps, f"--config.train_data_dir={c['train_data_dir']}",
             f"--config.placeholder_token={c['placeholder_token']}")
  concepts_path = os.path.join(base, "concepts.jsonl")
  os.makedirs(base, exist_ok=True)
  with open(concepts_path, "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(c) + "\n" for c in concepts))

  def one():
    _train(os.path.join(base, "one"), cache, os.path.join(base, "xla-one"), steps,
           f"--config.concepts_file={concepts_path}")
  sep_wall, sep_cpu = _timed(separate)
  one_wall, one_cpu = _timed(one)
  row = {"num_concepts": k, "steps": steps, "separate_wall_s": round(sep_wall, 1),
         "separate_cpu_s": round(sep_cpu, 1), "one_run_wall_s": round(one_wall, 1),
         "one_run_cpu_s": round(one_cpu, 1), "speedup_wall": round(sep_wall / one_wall, 2),
         "speedup_cpu": round(sep_cpu / one_cpu, 2)}
  print(json.dumps(row), flush=True)
  return row


def main(argv) -> None:
  del argv
  root = FLAGS.out_dir or tempfile.mkdtemp(prefix="ti_jax-concepts-bench-")
  cache = os.path.join(root, "models")
  # The tiny model written once before any timing (a dry run loads it: written on first use).
  _train(os.path.join(root, "warmup"), cache, os.path.join(root, "xla-warmup"), 1,
         f"--config.train_data_dir={FOLDERS[0]}", "--dry_run")
  rows = [measure(int(k), FLAGS.steps, root, cache) for k in FLAGS.num_concepts]
  print(f"{'K':>3} {'separate wall/cpu s':>20} {'one run wall/cpu s':>19} {'speed-up wall/cpu':>18}")
  for r in rows:
    print(f"{r['num_concepts']:>3} {r['separate_wall_s']:>9.1f} / {r['separate_cpu_s']:<8.1f} "
          f"{r['one_run_wall_s']:>8.1f} / {r['one_run_cpu_s']:<8.1f} "
          f"{r['speedup_wall']:>8.2f}x / {r['speedup_cpu']:.2f}x")
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w", encoding="utf-8") as f:
      json.dump({"device": "cpu", "rows": rows}, f, indent=1)
  if not FLAGS.out_dir:
    subprocess.run(["rm", "-rf", root], check=False)


if __name__ == "__main__":
  app.run(main)
