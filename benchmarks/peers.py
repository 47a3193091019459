"""ti_jax.train against diffusers' own textual_inversion.py, side by side in one run.

  git -C DIFFUSERS_CHECKOUT show HEAD:examples/textual_inversion/textual_inversion.py > /tmp/ti.py
  python benchmarks/peers.py --diffusers_script /tmp/ti.py --models narrow,small --repeats 3

For each model shape it writes one random-weight diffusers folder (the text
encoder's vocabulary sized to the folder's tokenizer, so both programs train
the same token table), then alternates the two real entry points as
subprocesses on that folder and the same images (examples/toy), 256 px,
batch 1, float32, one device / process:

- `python -m ti_jax.train` with `log_every_steps=1`: the step times are its
  own metrics.jsonl `step_time_s` (the compiling first step is not among them);
- diffusers' `textual_inversion.py`, unmodified, under `accelerate`'s single
  process defaults: a step is the time between two consecutive updates of its
  tqdm "Steps" bar, read from its stderr as it runs.

Startup (imports, model loading, compilation) and the first `--warmup` steps
of every run are left out. Each run's median step is kept; the figure per
side is the median over `--repeats` runs, and the ratio is of images/s.

The script's only dependency not usable here is torchvision (no wheel for
this CPU-only torch); the script uses nothing of it but
`transforms.RandomHorizontalFlip` on PIL images, so when `import torchvision`
fails the driver runs the script through a launcher that first imports
transformers, diffusers and accelerate (so they see no torchvision and take
their PIL paths), then puts a one-class stand-in on `sys.path` and runs the
unmodified script with `runpy` as `__main__`; the report says so. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are removed from both
subprocesses' environments (they slow numpy/torch on this CPU), and
OMP_WAIT_POLICY=PASSIVE is set: on this shared 2-core machine torch's
spinning OpenMP threads made a 3x3 conv 10-40x slower than with passive
waits (47 ms vs 1.1 ms, `benchmarks/peers.py` notes in RESULTS.md), which
would flatter ti_jax. The BLAS and OpenMP libraries torch loads are reported
via threadpoolctl. `--ti_jax_xla_flags` adds XLA flags to ti_jax's runs only.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import common  # benchmarks/common.py: a script's own folder is on sys.path
from absl import app, flags

flags.DEFINE_string("diffusers_script", None, "Path to diffusers' "
                    "examples/textual_inversion/textual_inversion.py.")
flags.DEFINE_list("models", ["narrow", "small"], "Model shapes (benchmarks/common.py).")
flags.DEFINE_integer("steps", 6, "Timed steps per run (after the first and the warmup).")
flags.DEFINE_integer("warmup", 2, "Steps after the first left out of each run.")
flags.DEFINE_integer("repeats", 3, "Runs per side per model, alternating the sides.")
flags.DEFINE_string("images", "", "Training images (default: examples/toy).")
flags.DEFINE_string("ti_jax_xla_flags", "", "XLA_FLAGS for the ti_jax runs.")
common.define_model_flags(None, dtype=None, batch=None,
                          json_out_help="Also write all results as JSON here.")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLUTION = 256
PLACEHOLDER, INITIALIZER = "<bench-toy>", "toy"
_TQDM_STEP = re.compile(r"Steps:[^|\r\n]*\|[^|\r\n]*\|\s*(\d+)/(\d+)")

_TORCHVISION_STANDIN = '''"""Stand-in written by ti_jax's benchmarks/peers.py: torchvision has no wheel for this
CPU-only torch, and textual_inversion.py uses only this transform from it."""
import random

from PIL import Image


class RandomHorizontalFlip:
  def __init__(self, p=0.5):
    self.p = p

  def __call__(self, image):
    return image.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < self.p else image
'''


# Runs the script as __main__ once the libraries have settled that torchvision is absent.
_LAUNCHER = """import runpy, sys
import accelerate, diffusers, transformers, transformers.image_utils, transformers.modeling_utils
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer
sys.path.insert(0, sys.argv[1])
script = sys.argv[2]
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def _env(extra_path: str = "") -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "XLA_FLAGS")}
  env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, ROOT, env.get("PYTHONPATH", "")) if p)
  env["PYTHONUNBUFFERED"] = "1"
  env["OMP_WAIT_POLICY"] = "PASSIVE"
  env["HF_HUB_OFFLINE"] = "1"
  return env


def write_model(folder: str, model: str) -> None:
  """A random-weight diffusers folder whose text encoder's vocabulary is the tokenizer's."""
  import numpy as np

  from ti_jax.weights.pipeline import build_modules, param_shapes
  from ti_jax.weights.tiny_models import random_params, write_model_folder
  from ti_jax.weights.tiny_tokenizer import write_tiny_clip_tokenizer
  configs = common.model_configs(model)
  with tempfile.TemporaryDirectory() as tmp:
    configs["text_encoder"]["vocab_size"] = write_tiny_clip_tokenizer(tmp)
  rng = np.random.default_rng(0)
  params = {k: random_params(v, rng) for k, v in param_shapes(build_modules(configs)).items()}
  write_model_folder(folder, configs, params, write_tiny_clip_tokenizer)


def _torchvision_standin(tmp: str) -> str:
  """'' if torchvision imports; else a folder holding the stand-in package."""
  ok = subprocess.run([sys.executable, "-c", "import torchvision.transforms"], env=_env(),
                      capture_output=True).returncode == 0
  if ok:
    return ""
  folder = os.path.join(tmp, "standin")
  os.makedirs(os.path.join(folder, "torchvision"), exist_ok=True)
  with open(os.path.join(folder, "torchvision", "__init__.py"), "w") as f:
    f.write('"""Stand-in (see transforms.py)."""\n')
  with open(os.path.join(folder, "torchvision", "transforms.py"), "w") as f:
    f.write(_TORCHVISION_STANDIN)
  return folder


def run_ti_jax(folder: str, images: str, workdir: str, cache: str) -> list[float]:
  """Step times (s) of one `python -m ti_jax.train` run, from its metrics.jsonl."""
  steps = 1 + FLAGS.warmup + FLAGS.steps
  overrides = dict(pretrained_model_name_or_path=folder, train_data_dir=images,
                   placeholder_token=PLACEHOLDER, initializer_token=INITIALIZER,
                   resolution=RESOLUTION, train_batch_size=1, dtype="float32",
                   max_train_steps=steps, log_every_steps=1, checkpointing_steps=100000,
                   validation_prompt="", compilation_cache_dir=cache)
  cmd = [sys.executable, "-m", "ti_jax.train", f"--config={ROOT}/configs/object.py",
         f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
  env = _env()
  if FLAGS.ti_jax_xla_flags:
    env["XLA_FLAGS"] = FLAGS.ti_jax_xla_flags
  subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  times = [r["step_time_s"] for r in records if "step_time_s" in r]
  return times[FLAGS.warmup:]


def run_diffusers_script(folder: str, images: str, out_dir: str, standin: str) -> list[float]:
  """Step times (s) of one run of diffusers' textual_inversion.py, from its tqdm bar."""
  steps = 1 + FLAGS.warmup + FLAGS.steps
  launch = ([sys.executable, "-c", _LAUNCHER, standin, FLAGS.diffusers_script] if standin
            else [sys.executable, FLAGS.diffusers_script])
  cmd = launch + [f"--pretrained_model_name_or_path={folder}",
         f"--train_data_dir={images}", f"--placeholder_token={PLACEHOLDER}",
         f"--initializer_token={INITIALIZER}", "--learnable_property=object",
         f"--resolution={RESOLUTION}", "--train_batch_size=1", f"--max_train_steps={steps}",
         "--learning_rate=5e-3", "--mixed_precision=no", "--report_to=all",
         "--checkpointing_steps=100000", "--save_steps=100000", "--dataloader_num_workers=0",
         "--seed=0", f"--output_dir={out_dir}"]
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  seen: dict[int, float] = {}
  text = b""
  while True:
    chunk = os.read(proc.stdout.fileno(), 65536)
    now = time.perf_counter()
    if not chunk:
      break
    text += chunk
    for m in _TQDM_STEP.finditer(chunk.decode(errors="replace")):
      seen.setdefault(int(m.group(1)), now)
  if proc.wait() != 0:
    raise RuntimeError(f"textual_inversion.py failed:\n{text.decode(errors='replace')[-3000:]}")
  if sorted(seen) != list(range(min(seen), steps + 1)) or min(seen) > 1:
    raise RuntimeError(f"could not follow the script's progress bar (steps seen: {sorted(seen)})")
  # Step k is the time from the bar showing k-1 to showing k; step 1 holds the first
  # batch's setup, so it is left out with the warmup steps.
  return [seen[k] - seen[k - 1] for k in range(2 + FLAGS.warmup, steps + 1)]


def torch_threading() -> list[dict]:
  """threadpoolctl's view of the native thread pools once torch is imported (peer's env)."""
  code = ("import json, torch, numpy; from threadpoolctl import threadpool_info; "
          "print(json.dumps([{k: d.get(k) for k in ('internal_api', 'num_threads', "
          "'architecture', 'version')} for d in threadpool_info()]))")
  out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
  return json.loads(out.stdout) if out.returncode == 0 else [{"error": out.stderr[-300:]}]


def main(argv):
  del argv
  if not FLAGS.diffusers_script or not os.path.isfile(FLAGS.diffusers_script):
    raise SystemExit("error: --diffusers_script must name diffusers' "
                     "examples/textual_inversion/textual_inversion.py")
  images = FLAGS.images or os.path.join(ROOT, "examples", "toy")
  record = {"resolution": RESOLUTION, "batch": 1, "dtype": "float32",
            "ti_jax_xla_flags": FLAGS.ti_jax_xla_flags, "omp_wait_policy": "PASSIVE",
            "timed_steps_per_run": FLAGS.steps, "repeats": FLAGS.repeats,
            "torch_threadpools": torch_threading(), "models": {}}
  with tempfile.TemporaryDirectory() as tmp:
    standin = _torchvision_standin(tmp)
    record["torchvision"] = "stand-in (RandomHorizontalFlip only)" if standin else "installed"
    cache = os.path.join(tmp, "xla-cache")
    for model in FLAGS.models:
      folder = os.path.join(tmp, f"model-{model}")
      write_model(folder, model)
      runs = {"ti_jax": [], "diffusers_script": []}
      for r in range(FLAGS.repeats):
        order = ("diffusers_script", "ti_jax") if r % 2 == 0 else ("ti_jax", "diffusers_script")
        for side in order:
          out = os.path.join(tmp, f"{model}-{side}-{r}")
          load = os.getloadavg()[0]
          times = (run_ti_jax(folder, images, out, cache) if side == "ti_jax"
                   else run_diffusers_script(folder, images, out, standin))
          runs[side].append({"median_step_s": statistics.median(times), "steps_s": times,
                             "load_avg_1min_before": load})
          print(f"{model} {side} run {r}: median step {statistics.median(times):.3f} s "
                f"(load {load:.1f})", flush=True)
      ours = statistics.median(x["median_step_s"] for x in runs["ti_jax"])
      peer = statistics.median(x["median_step_s"] for x in runs["diffusers_script"])
      record["models"][model] = {
          "unet_widths": common.model_configs(model)["unet"]["block_out_channels"],
          "ti_jax_step_s": ours, "diffusers_script_step_s": peer,
          "ti_jax_images_per_s": 1 / ours, "diffusers_script_images_per_s": 1 / peer,
          "images_per_s_ratio": peer / ours, "runs": runs}
  print(f"\n{'model':>8}  {'UNet widths':>22}  {'ti_jax s/step':>13}  "
        f"{'diffusers script s/step':>23}  images/s ratio")
  for model, m in record["models"].items():
    print(f"{model:>8}  {str(m['unet_widths']):>22}  {m['ti_jax_step_s']:>13.3f}  "
          f"{m['diffusers_script_step_s']:>23.3f}  {m['images_per_s_ratio']:.2f}")
  print(f"torchvision: {record['torchvision']}; torch thread pools: {record['torch_threadpools']}")
  common.write_json(FLAGS.json_out, record)


if __name__ == "__main__":
  app.run(main)
