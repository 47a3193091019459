"""Times one UNet forward pass, alone under jit and inside a `lax.fori_loop` (as sampling runs it).

  python benchmarks/unet_forward.py --model small --batch 4

Separates the cost of the UNet itself from the sampling loop around it; the
batch of 4 is what 2 images with classifier-free guidance evaluate per step.
"""

from __future__ import annotations

import time

import common  # benchmarks/common.py: a script's own folder is on sys.path
from absl import app, flags

common.define_model_flags(dtype_help="UNet dtype.", batch=4, batch_help="Batch of latents.")
flags.DEFINE_string("attention_impl", "", "config.attention_impl (\"\": ti_jax's default).")
flags.DEFINE_integer("repeats", 3, "Timed calls (and loop steps).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ti_jax.weights.pipeline import build_modules
  from ti_jax.weights.tiny_models import random_params

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
  cfg = common.model_configs(FLAGS.model)
  unet = build_modules(cfg, dtype=dtype, param_dtype=dtype,
                       attention_impl=FLAGS.attention_impl or None)["unet"]
  cast = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype), tree)
  params = jax.device_put(cast(random_params(_unet_shapes(unet), np.random.default_rng(0))))
  latent = common.RESOLUTION[FLAGS.model] // 8
  b = FLAGS.batch
  x = jnp.ones((b, latent, latent, 4), dtype)
  context = jnp.ones((b, 77, cfg["unet"]["cross_attention_dim"]), dtype)
  t = jnp.full((b,), 500)
  forward = jax.jit(lambda p, x: unet.apply({"params": p}, x, t, context))
  loop = jax.jit(lambda p, x: jax.lax.fori_loop(
      0, FLAGS.repeats, lambda i, y: unet.apply({"params": p}, y, t, context), x))
  compiled = forward.lower(params, x).compile()
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, list) else cost)["flops"])
  sync = lambda y: y.block_until_ready()
  alone = common.median(common.timed(lambda: forward(params, x), FLAGS.repeats, 1, sync))
  sync(loop(params, x))
  start = time.perf_counter()
  sync(loop(params, x))
  in_loop = (time.perf_counter() - start) / FLAGS.repeats
  common.report({
      "model": FLAGS.model, "dtype": FLAGS.dtype, "batch": b,
      "attention_impl": FLAGS.attention_impl or "default",
      "device": jax.devices()[0].device_kind, "gflop_per_call": flops / 1e9,
      "jit_forward_s": alone, "fori_loop_step_s": in_loop,
      "gflop_per_s": flops / alone / 1e9,
  }, FLAGS.json_out)


def _unet_shapes(unet):
  import jax
  import jax.numpy as jnp
  down = 2 ** (len(unet.config.block_out_channels) - 1)
  return jax.eval_shape(unet.init, jax.random.key(0),
                        jnp.zeros((1, down, down, unet.config.in_channels)), jnp.zeros((1,)),
                        jnp.zeros((1, 1, unet.config.cross_attention_dim)))["params"]


if __name__ == "__main__":
  app.run(main)
