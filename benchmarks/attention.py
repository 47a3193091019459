"""Times one attention call: XLA's `dot_product_attention` against ti_jax's blocked attention.

  python benchmarks/attention.py --batch 2 --tokens 1024 --heads 8 --head_dim 8
  python benchmarks/attention.py --tokens 1024 --blocks 128x256,256x512,256x1024,1024x1024

Forward alone (sampling) and forward + backward to q, k and v (training,
where gradients reach the text context through every later layer), each
jit-compiled; median of `--repeats` calls. This is the measurement behind
`layers.BLOCK_Q`, `layers.BLOCK_K` and `layers.CPU_BLOCKED_MIN_SCORES`.
"""

from __future__ import annotations

import common  # benchmarks/common.py: a script's own folder is on sys.path
from absl import app, flags

common.define_model_flags(None, dtype=None, batch=2,
                          batch_help="Batch (2 = one image with classifier-free guidance).")
flags.DEFINE_integer("tokens", 1024, "Query and key tokens (32x32 latents = 1024).")
flags.DEFINE_integer("key_tokens", 0, "Key tokens if not --tokens (77 = cross-attention).")
flags.DEFINE_integer("heads", 8, "Heads.")
flags.DEFINE_integer("head_dim", 8, "Head width.")
flags.DEFINE_string("blocks", "128x256,256x512,256x1024,512x1024",
                    "Comma-separated QxK block sizes of the blocked path to time.")
flags.DEFINE_integer("repeats", 5, "Timed calls per variant.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ti_jax.models import layers

  rng = np.random.default_rng(0)
  tk = FLAGS.key_tokens or FLAGS.tokens
  shape_q = (FLAGS.batch, FLAGS.tokens, FLAGS.heads, FLAGS.head_dim)
  shape_k = (FLAGS.batch, tk, FLAGS.heads, FLAGS.head_dim)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (shape_q, shape_k, shape_k))
  variants = {"xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")}
  for spec in FLAGS.blocks.split(","):
    bq, bk = (int(x) for x in spec.split("x"))
    variants[f"blocked_{bq}x{bk}"] = (
        lambda q, k, v, bq=bq, bk=bk: layers.blocked_attention(q, k, v, block_q=bq, block_k=bk))
  sync = lambda x: jax.block_until_ready(x)
  record = {"shape_q": str(shape_q), "shape_k": str(shape_k),
            "device": jax.devices()[0].device_kind}
  for name, fn in variants.items():
    fwd = jax.jit(fn)
    grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))
    record[f"{name}_fwd_ms"] = 1e3 * common.median(
        common.timed(lambda: fwd(q, k, v), FLAGS.repeats, 1, sync))
    record[f"{name}_fwd_bwd_ms"] = 1e3 * common.median(
        common.timed(lambda: grad(q, k, v), FLAGS.repeats, 1, sync))
  common.report(record, FLAGS.json_out)


if __name__ == "__main__":
  app.run(main)
