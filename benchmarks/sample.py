"""Times image generation: ti_jax's pmapped DDIM loop against diffusers' PyTorch pipeline.

  python benchmarks/sample.py --model small --num_images 2 --steps 50
  python benchmarks/sample.py --model sd15 --dtype bfloat16 --num_images 16   # GPU/TPU

Both sides load the same random-weight diffusers folder (written once into a
temporary directory), run DDIM with classifier-free guidance (one batched
UNet call per step) and decode with the VAE. ti_jax runs its jit-compiled
`lax.fori_loop` over every device (`parallel.all_devices`); diffusers runs at its best settings
for the device: float16 with PyTorch SDPA on CUDA, float32 on CPU. Reported:
compile/first-call time, the median images/s over `--repeats` calls, and the
ratio. After one untimed call per side, the timed calls alternate between
the sides.
"""

from __future__ import annotations

import os
import tempfile
import time

import common  # benchmarks/common.py: a script's own folder is on sys.path
from absl import app, flags

common.define_model_flags(dtype_help="ti_jax UNet/text encoder dtype.", batch=None)
flags.DEFINE_integer("num_images", 2, "Images per call (over all devices for ti_jax).")
flags.DEFINE_integer("steps", 50, "DDIM steps.")
flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale.")
flags.DEFINE_integer("batch_size", 0, "ti_jax images per device per call (0: "
                     "generation.auto_batch_size, as ti_jax.sample does).")
flags.DEFINE_integer("repeats", 2, "Timed calls per side after the first.")
flags.DEFINE_enum("impl", "both", ["both", "ti_jax", "diffusers"], "Which side(s) to time.")
FLAGS = flags.FLAGS
PROMPT = "a photo of a red toy on a wooden table"


def _write_model(folder: str) -> None:
  """A random-weight diffusers folder of the benchmark shape (numpy init, no torch)."""
  import numpy as np

  from ti_jax.weights.pipeline import build_modules, param_shapes
  from ti_jax.weights.tiny_models import random_params, write_model_folder
  from ti_jax.weights.tiny_tokenizer import write_tiny_clip_tokenizer
  configs = common.model_configs(FLAGS.model)
  configs["scheduler"] = dict(configs["scheduler"], _class_name="DDIMScheduler")
  rng = np.random.default_rng(0)
  params = {k: random_params(v, rng) for k, v in param_shapes(build_modules(configs)).items()}
  write_model_folder(folder, configs, params, write_tiny_clip_tokenizer)


def _setup_ti_jax(folder: str, res: int):
  """(call generating --num_images images, its settings) for ti_jax."""
  import jax.numpy as jnp

  from ti_jax.runtime import parallel
  from ti_jax.sampling import generation
  from ti_jax.weights.loading import load_stable_diffusion
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
  sd = load_stable_diffusion(folder, dtype=dtype, param_dtype=dtype, vae_dtype=jnp.float32)
  devices = parallel.all_devices()
  gen = generation.ImageGenerator(sd, scheduler="ddim", num_inference_steps=FLAGS.steps,
                                guidance_scale=FLAGS.guidance_scale, height=res, width=res,
                                devices=devices)
  batch = FLAGS.batch_size or generation.auto_batch_size(gen, FLAGS.num_images)
  call = lambda: generation.generate_images(gen, PROMPT, FLAGS.num_images, batch_size=batch)
  return call, {"device": f"{len(devices)}x {devices[0].device_kind}", "dtype": FLAGS.dtype,
                "per_device_batch": batch}


def _setup_diffusers(folder: str, res: int):
  """(call generating --num_images images in one pipeline call, its settings) for diffusers."""
  # Passive OpenMP waits: on a shared CPU torch's spinning threads lose 10x (RESULTS.md).
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  import torch
  from diffusers import DDIMScheduler, StableDiffusionPipeline
  cuda = torch.cuda.is_available()
  dtype = torch.float16 if cuda else torch.float32
  pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                 requires_safety_checker=False)
  pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
  pipe = pipe.to("cuda" if cuda else "cpu")
  pipe.set_progress_bar_config(disable=True)

  def call():
    out = pipe([PROMPT] * FLAGS.num_images, num_inference_steps=FLAGS.steps,
               guidance_scale=FLAGS.guidance_scale, height=res, width=res, output_type="np")
    if cuda:
      torch.cuda.synchronize()
    return out

  return call, {"device": torch.cuda.get_device_name() if cuda else "cpu",
                "dtype": "float16" if cuda else "float32"}


def main(argv):
  del argv
  res = common.RESOLUTION[FLAGS.model]
  record = {"model": FLAGS.model, "resolution": res, "num_images": FLAGS.num_images,
            "ddim_steps": FLAGS.steps, "guidance_scale": FLAGS.guidance_scale}
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, "model")
    _write_model(folder)
    sides = {}
    if FLAGS.impl in ("both", "ti_jax"):
      sides["ti_jax"] = _setup_ti_jax(folder, res)
    if FLAGS.impl in ("both", "diffusers"):
      sides["diffusers"] = _setup_diffusers(folder, res)
    times = {name: [] for name in sides}
    for name, (call, info) in sides.items():  # first calls: compilation / warm-up
      t = time.perf_counter()
      call()
      record[f"{name}_first_call_s"] = time.perf_counter() - t
      record.update({f"{name}_{k}": v for k, v in info.items()})
    for _ in range(FLAGS.repeats):  # the sides alternate, so load changes hit both
      for name, (call, _) in sides.items():
        t = time.perf_counter()
        call()
        times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
      record[f"{name}_call_s_median"] = common.median(ts)
      record[f"{name}_images_per_s"] = FLAGS.num_images / common.median(ts)
  if FLAGS.impl == "both":
    record["images_per_s_ratio"] = (record["ti_jax_images_per_s"]
                                    / record["diffusers_images_per_s"])
  common.report(record, FLAGS.json_out)


if __name__ == "__main__":
  app.run(main)
