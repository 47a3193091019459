"""Times ti_jax's textual-inversion training step on random weights of a given model shape.

  python benchmarks/train_step.py --model small --dtype float32 --batch 1
  python benchmarks/train_step.py --model sd15 --dtype bfloat16 --batch 4   # GPU/TPU

Reports compile time, the median steady-state step time (block_until_ready),
images/s, FLOPs per step from XLA's cost analysis of the compiled step, MFU
against a matmul peak measured on the same device, and peak memory
(device memory_stats on GPU/TPU, max RSS on CPU). Latents are cached (as in
training), so the VAE does not run.
"""

from __future__ import annotations

import time

import common  # benchmarks/common.py: a script's own folder is on sys.path
from absl import app, flags

common.define_model_flags()
flags.DEFINE_integer("devices", 1, "Devices to use (0 = all local).")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_string("attention_impl", "", "jax.nn.dot_product_attention implementation.")
flags.DEFINE_bool("remat", False, "Rematerialise the UNet's resnets/transformers (config.remat).")
FLAGS = flags.FLAGS


def matmul_peak_flops(dtype) -> float:
  """FLOP/s of a large square matmul on the default device (the practical peak)."""
  import jax
  import jax.numpy as jnp
  n = 2048 if jax.devices()[0].platform == "cpu" else 8192
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = common.timed(lambda: f(a), 5, 1, lambda x: x.block_until_ready())
  return 2 * n ** 3 / common.median(times)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ti_jax.runtime import parallel
  from ti_jax.sampling import noise_schedule
  from ti_jax.training import train_lib
  from ti_jax.weights.pipeline import build_modules, param_shapes
  from ti_jax.weights.tiny_models import random_params

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
  cfg = common.model_configs(FLAGS.model)
  res = common.RESOLUTION[FLAGS.model]
  modules = build_modules(cfg, dtype=dtype, param_dtype=dtype,
                          attention_impl=FLAGS.attention_impl or None, remat=FLAGS.remat)
  shapes = param_shapes(modules)
  rng = np.random.default_rng(0)
  cast = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), tree)
  unet_p = cast(random_params(shapes["unet"], rng))
  text_p = cast(random_params(shapes["text_encoder"], rng))
  devices = parallel.local_devices(FLAGS.devices or None)
  latent = res // 8
  vocab = cfg["text_encoder"]["vocab_size"]
  frozen = train_lib.Frozen(
      unet=unet_p, text_encoders=(text_p,),
      latent_mean=rng.standard_normal((8, latent, latent, 4)).astype(np.float32),
      latent_std=np.full((8, latent, latent, 4), 0.1, np.float32),
      placeholder_ids=(np.asarray([vocab - 1], np.int32),),
      schedule=noise_schedule.noise_schedule_from_config(cfg["scheduler"]))
  settings = train_lib.StepSettings(unet=modules["unet"], text_encoders=(modules["text_encoder"],),
                                    scaling_factor=0.18215, shift_factor=0.0, seed=0)
  lr = train_lib.learning_rate_schedule(5e-3, "constant", 0, 1000)
  opt = train_lib.make_optimizer(lr, 0.9, 0.999, 1e-8, 1e-2)
  dim = cfg["text_encoder"]["hidden_size"]
  state = train_lib.init_state({"embeds": rng.standard_normal((1, dim)).astype(np.float32) * 0.01},
                               opt)
  step_fn = train_lib.make_pmapped_step(settings, opt, lr, devices)
  frozen = parallel.replicate(frozen, devices)
  state = parallel.replicate(state, devices)
  global_batch = FLAGS.batch * len(devices)
  ids = rng.integers(0, vocab - 2, (global_batch, 77)).astype(np.int32)
  ids[:, 5] = vocab - 1  # the placeholder
  batch = parallel.shard({"input_ids": ids, "view_index": np.arange(global_batch) % 8,
                          "example_index": np.arange(global_batch, dtype=np.int32)}, len(devices))

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0))

  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step_fn(holder["state"], frozen, batch)
    return metrics["loss"]

  one_step().block_until_ready()  # also counts compiles of the pmap wrapper, if any
  times = common.timed(one_step, FLAGS.steps, FLAGS.warmup, lambda x: x.block_until_ready())
  step_s = common.median(times)
  peak = matmul_peak_flops(dtype)
  dev = devices[0]
  stats = dev.memory_stats() if dev.platform != "cpu" else None
  # XLA's own plan of the step's temporary buffers (what remat trades for FLOPs).
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  memory = stats.get("peak_bytes_in_use", 0) if stats else common.max_rss_bytes()
  # XLA's count is for one device's program; FLOPs per image = that / per-device batch.
  common.report({
      "impl": "ti_jax" + (" remat" if FLAGS.remat else ""), "model": FLAGS.model, "resolution": res, "dtype": FLAGS.dtype,
      "device": f"{len(devices)}x {dev.device_kind}", "per_device_batch": FLAGS.batch,
      "compile_s": compile_s, "step_s_median": step_s, "images_per_s": global_batch / step_s,
      "gflop_per_image": flops / FLAGS.batch / 1e9, "measured_peak_tflops": peak / 1e12,
      "mfu": flops / step_s / peak,
      "peak_memory_gib": memory / 2**30, "xla_temp_gib": temp_bytes / 2**30,
      "memory_kind": "device peak_bytes_in_use" if stats else "host max RSS",
  }, FLAGS.json_out)


if __name__ == "__main__":
  app.run(main)
