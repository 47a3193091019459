"""ti_jax's Flax UNet, VAE and CLIP text encoder equal diffusers/transformers PyTorch.

Random-weight PyTorch pipelines are saved with `save_pretrained` and loaded by
`ti_jax.weights.loading.load_stable_diffusion`, so these tests also prove the loader.
fp32 must match to 1e-4 relative (max |a-b| / max |ref|); bf16 to 2e-2.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import PARITY_FIGURES, record_parity
from torch_reference import build_torch_pipeline, rel_err

from ti_jax.weights import presets
from ti_jax.weights.loading import load_stable_diffusion
from ti_jax.weights.tiny_tokenizer import write_tiny_clip_tokenizer

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
PROMPTS = ["a painting in the style of a cat", "a photo of a red toy"]


@pytest.fixture(scope="module", params=["tiny-sd15", "tiny-sd21"])
def saved_pipeline(request, tmp_path_factory):
  """(preset name, torch pipeline, folder it was saved to with save_pretrained)."""
  tmp = tmp_path_factory.mktemp(request.param)
  vocab = write_tiny_clip_tokenizer(str(tmp / "tok"))
  configs = presets.preset(request.param)
  configs["unet"]["layers_per_block"] = 2  # exercise multi-layer blocks and skip bookkeeping
  configs["text_encoder"]["vocab_size"] = vocab
  pipe = build_torch_pipeline(configs, str(tmp / "tok"))
  pipe.save_pretrained(str(tmp / "model"), safe_serialization=True)
  return request.param, pipe, str(tmp / "model")


@pytest.fixture(scope="module")
def loaded(saved_pipeline):
  """ti_jax models loaded from the saved folder, in fp32 and in bf16."""
  _, _, folder = saved_pipeline
  return {name: load_stable_diffusion(folder, dtype=dt, param_dtype=dt)
          for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unet_output_matches_diffusers(saved_pipeline, loaded, dtype):
  preset, pipe, _ = saved_pipeline
  sd = loaded[dtype]
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # NCHW for torch
  timesteps = np.array([17, 801])
  context = rng.standard_normal((2, 77, pipe.unet.config.cross_attention_dim)).astype(np.float32)
  with torch.no_grad():
    ref = pipe.unet(torch.from_numpy(latents), torch.from_numpy(timesteps),
                    torch.from_numpy(context)).sample.numpy()
  out = sd.unet.apply({"params": sd.unet_params}, latents.transpose(0, 2, 3, 1), timesteps,
                      context)
  out = np.asarray(out.astype(jnp.float32)).transpose(0, 3, 1, 2)
  record_parity(f"{preset} unet {dtype}", rel_err(out, ref), TOLERANCE[dtype])
  if dtype == "bfloat16":
    # Context for the bf16 figure: diffusers' own UNet in bf16 against its fp32 self.
    with torch.no_grad():
      unet_bf16 = copy.deepcopy(pipe.unet).to(torch.bfloat16)
      own = unet_bf16(torch.from_numpy(latents).bfloat16(), torch.from_numpy(timesteps),
                      torch.from_numpy(context).bfloat16()).sample.float().numpy()
    PARITY_FIGURES.append((f"{preset} unet bfloat16: diffusers' own bf16 (context)",
                           rel_err(own, ref), TOLERANCE[dtype]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vae_posterior_and_decode_match_diffusers(saved_pipeline, loaded, dtype):
  preset, pipe, _ = saved_pipeline
  sd = loaded[dtype]
  images = np.random.default_rng(1).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    posterior = pipe.vae.encode(torch.from_numpy(images)).latent_dist
    ref_decoded = pipe.vae.decode(posterior.mean).sample.numpy()
  mean, logvar = sd.vae.apply({"params": sd.vae_params}, images.transpose(0, 2, 3, 1),
                              method=sd.vae.encode)
  # Decode the same latents on both sides so the figure measures the decoder alone.
  decoded = sd.vae.apply({"params": sd.vae_params}, posterior.mean.numpy().transpose(0, 2, 3, 1),
                         method=sd.vae.decode)
  nchw = lambda a: np.asarray(a.astype(jnp.float32)).transpose(0, 3, 1, 2)
  tol = TOLERANCE[dtype]
  record_parity(f"{preset} vae posterior mean {dtype}", rel_err(nchw(mean), posterior.mean), tol)
  record_parity(f"{preset} vae posterior logvar {dtype}", rel_err(nchw(logvar), posterior.logvar), tol)
  record_parity(f"{preset} vae decode {dtype}", rel_err(nchw(decoded), ref_decoded), tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_text_encoder_last_hidden_state_matches_transformers(saved_pipeline, loaded, dtype):
  preset, pipe, _ = saved_pipeline
  sd = loaded[dtype]
  ids = sd.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                     return_tensors="np").input_ids
  with torch.no_grad():
    ref = pipe.text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
  out = sd.text_encoder.apply({"params": sd.text_encoder_params}, ids)
  record_parity(f"{preset} text encoder {dtype}", rel_err(out.astype(jnp.float32), ref),
                TOLERANCE[dtype])


def test_loaded_params_have_requested_dtype(loaded):
  for name, sd in loaded.items():
    leaves = jax.tree_util.tree_leaves((sd.unet_params, sd.vae_params, sd.text_encoder_params))
    assert {str(leaf.dtype) for leaf in leaves} == {name}


@pytest.mark.parametrize("tq, tk, head_dim", [(64, 64, 40), (256, 77, 64)])
def test_pallas_tpu_flash_attention_matches_xla_in_interpret_mode(tq, tk, head_dim):
  """attention_impl="pallas_tpu": JAX's Pallas TPU kernel, run by its interpreter on CPU.

  Lengths that are not multiples of the kernel's 128-blocks (8x8 latents = 64
  queries, 77 context keys) and head dims far from 128 lanes exercise the
  padding and the segment-id mask; the gradient goes through the kernel's
  backward pass.
  """
  from jax.experimental.pallas import tpu as pltpu

  from ti_jax.models import layers
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, tq, 2, head_dim)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((2, tk, 2, head_dim)), jnp.float32) for _ in range(2))

  def loss(impl, q, k, v):
    return jnp.sum(jnp.sin(layers.attention(q, k, v, implementation=impl)))

  ref, ref_grads = jax.value_and_grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
  with pltpu.force_tpu_interpret_mode():
    out, grads = jax.value_and_grad(functools.partial(loss, "pallas_tpu"),
                                    argnums=(0, 1, 2))(q, k, v)
  assert rel_err(out, ref) < 1e-5
  for g, r in zip(grads, ref_grads):
    assert rel_err(g, r) < 1e-4


def test_unet_routes_attention_to_the_pallas_kernel_and_text_encoder_stays_on_xla(tiny_sd15):
  sd = load_stable_diffusion(tiny_sd15, attention_impl="pallas_tpu")
  latents = jnp.zeros((1, 8, 8, 4))
  context = jnp.zeros((1, 77, sd.unet.config.cross_attention_dim))
  unet = str(jax.make_jaxpr(lambda p: sd.unet.apply({"params": p}, latents, jnp.ones((1,)),
                                                    context))(sd.unet_params))
  text = str(jax.make_jaxpr(lambda p: sd.text_encoder.apply(
      {"params": p}, jnp.zeros((1, 77), jnp.int32)))(sd.text_encoder_params))
  assert "pallas_call" in unet and "pallas_call" not in text
