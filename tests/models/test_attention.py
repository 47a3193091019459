"""attention_impl="blocked": ti_jax's memory-efficient attention against XLA's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ti_jax.models import layers
from ti_jax.weights.loading import load_stable_diffusion


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _qkv(b, tq, tk, heads, head_dim, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, tq, heads, head_dim)), dtype)
  k, v = (jnp.asarray(rng.standard_normal((b, tk, heads, head_dim)), dtype) for _ in range(2))
  return q, k, v


def _loss(impl, q, k, v, **blocks):
  fn = (functools.partial(layers.blocked_attention, **blocks) if impl == "blocked_explicit"
        else functools.partial(layers.attention, implementation=impl))
  return jnp.sum(jnp.sin(fn(q, k, v).astype(jnp.float32)))


# (Tq, Tk, block_q, block_k): whole blocks, ragged last blocks on both sides
# (padded keys masked, padded queries dropped), one key block (cross-attention
# with 77 text tokens), and blocks larger than the sequence.
@pytest.mark.parametrize("tq, tk, block_q, block_k", [
    (256, 256, 64, 128), (200, 300, 64, 128), (96, 77, 32, 512), (48, 40, 256, 512)])
def test_blocked_attention_values_and_gradients_match_xla_in_float32(tq, tk, block_q, block_k):
  q, k, v = _qkv(2, tq, tk, 3, 16)
  grad = lambda impl, **kw: jax.value_and_grad(functools.partial(_loss, impl, **kw),
                                               argnums=(0, 1, 2))(q, k, v)
  ref, ref_grads = grad("xla")
  out, grads = grad("blocked_explicit", block_q=block_q, block_k=block_k)
  assert rel_err(out, ref) < 1e-5
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) < 1e-5


def test_blocked_attention_survives_large_logits():
  """The online softmax subtracts the running max, so logits of ~1e3 neither overflow nor NaN."""
  q, k, v = _qkv(1, 64, 96, 2, 8)
  q = q * 40.0
  ref = layers.attention(q, k, v, implementation="xla")
  out = layers.blocked_attention(q, k, v, block_q=16, block_k=32)
  assert np.isfinite(np.asarray(out)).all()
  assert rel_err(out, ref) < 1e-5


def test_blocked_attention_in_bfloat16_stays_close_to_float32():
  q, k, v = _qkv(2, 128, 128, 2, 32)
  ref = layers.attention(q, k, v, implementation="xla")
  out = layers.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), implementation="blocked")
  assert out.dtype == jnp.bfloat16
  assert rel_err(out.astype(jnp.float32), ref) < 2e-2


def test_blocked_attention_refuses_bias_and_causal_mask():
  q, k, v = _qkv(1, 8, 8, 1, 4)
  with pytest.raises(ValueError, match="blocked"):
    layers.attention(q, k, v, is_causal=True, implementation="blocked")
  with pytest.raises(ValueError, match="blocked"):
    layers.attention(q, k, v, bias=jnp.zeros((1, 1, 8, 8)), implementation="blocked")


def _uses_blocked_path(q, k, **kw):
  jaxpr = str(jax.make_jaxpr(lambda q, k: layers.attention(q, k, k, **kw))(q, k))
  return "custom_vjp_call" in jaxpr


def test_default_attention_on_cpu_is_blocked_for_long_sequences_only():
  long_q = jnp.zeros((1, 1024, 1, 8))
  short_q = jnp.zeros((1, 64, 1, 8))
  assert layers.CPU_BLOCKED_MIN_SCORES <= 1024 * 1024
  assert _uses_blocked_path(long_q, long_q, implementation=None)
  assert _uses_blocked_path(long_q, long_q, implementation="")
  assert not _uses_blocked_path(short_q, short_q, implementation="")
  assert not _uses_blocked_path(long_q, long_q, implementation="xla")  # an explicit choice holds
  assert not _uses_blocked_path(long_q, long_q, implementation="", is_causal=True)


def test_blocked_attention_backward_never_holds_the_full_score_matrix():
  """XLA's plan of temporaries for the gradient at 2048 tokens: the blocked path keeps tiles,
  the XLA path the `[B, N, Tq, Tk]` float32 scores (and probabilities)."""
  q, k, v = _qkv(1, 2048, 2048, 2, 8)
  scores_bytes = 1 * 2 * 2048 * 2048 * 4
  temp = {}
  for impl in ("xla", "blocked"):
    fn = jax.jit(jax.grad(functools.partial(_loss, impl), argnums=(0, 1, 2)))
    temp[impl] = fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  assert temp["xla"] >= scores_bytes
  assert temp["blocked"] < scores_bytes / 4


def test_unet_with_blocked_attention_matches_xla_output_and_context_gradient(tiny_sd15):
  """The UNet's self- and cross-attention through the blocked path: same noise prediction
  and the same gradient w.r.t. the text context (what textual inversion trains through)."""
  results = {}
  for impl in ("xla", "blocked"):
    sd = load_stable_diffusion(tiny_sd15, attention_impl=impl)
    rng = np.random.default_rng(1)
    latents = jnp.asarray(rng.standard_normal((2, 16, 16, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((2, 77, sd.unet.config.cross_attention_dim)),
                          jnp.float32)

    def loss(ctx, params, sd=sd, latents=latents):
      out = sd.unet.apply({"params": params}, latents, jnp.full((2,), 500), ctx)
      return jnp.mean(out ** 2), out

    # Compiled, the weights an argument (not constants of the program): the UNet's backward
    # run op by op takes most of a minute on CPU.
    (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(context, sd.unet_params)
    results[impl] = (out, grad)
  assert rel_err(results["blocked"][0], results["xla"][0]) < 1e-5
  assert rel_err(results["blocked"][1], results["xla"][1]) < 1e-4
