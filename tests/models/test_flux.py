"""ti_jax's Flax Flux transformer and 16-channel VAE equal diffusers' PyTorch modules.

Tiny random-weight (perturbed) diffusers models are saved with `save_pretrained`
and converted by `ti_jax.weights.convert`, so these tests also prove the key
mapping. fp32 must match to 1e-5 relative (max |a-b| / max |ref|), bf16 to 2e-2,
with diffusers' own bf16-vs-fp32 error recorded beside it.

The timestep and guidance features are sines of up to 1000 (3500) radians, where
one float32 ulp of a frequency moves a feature by ~6e-5; diffusers' float32
`exp` and ti_jax's float64-rounded frequencies differ by that in a few entries.
The strict fp32 figure therefore runs diffusers with ti_jax's features (the
rest of the network is diffusers' own); the figure with diffusers' own features
is recorded beside it at the SD parity tolerance (1e-4).
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import PARITY_FIGURES, record_parity
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import FluxPipeline, FluxTransformer2DModel as TorchFlux
from diffusers.models.embeddings import get_timestep_embedding
from torch_reference import flux_time_features, perturb_, rel_err

from ti_jax.models import flux
from ti_jax.models.config_utils import UnsupportedConfigError
from ti_jax.models.vae import AutoencoderKL, VAEConfig
from ti_jax.weights import convert, presets, safetensors_io

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
SD_FP32_TOLERANCE = 1e-4  # tests/models/test_parity.py's fp32 bound
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LATENT = 8  # latent height and width: a 4 x 4 grid of packed tokens
TEXT_LEN = 7


def _saved(model: torch.nn.Module, folder) -> str:
  model.save_pretrained(str(folder), safe_serialization=True)
  return str(folder)


def _read(folder: str) -> tuple[dict, dict]:
  """(config.json, the state dict as numpy) of a diffusers model folder."""
  with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  return config, safetensors_io.load(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module", params=["dev", "schnell"])
def transformer(request, tmp_path_factory):
  """(variant, torch model, {dtype name: (Flax module, params)}) for guidance on (dev) and off."""
  cfg = presets.preset("tiny-flux")["transformer"]
  cfg["guidance_embeds"] = request.param == "dev"
  torch.manual_seed(0)
  model = perturb_(TorchFlux(**cfg), 1)
  config, state = _read(_saved(model, tmp_path_factory.mktemp(request.param) / "transformer"))
  loaded = {}
  for name, dtype in DTYPES.items():
    module = flux.FluxTransformer2DModel(flux.FluxConfig.from_diffusers(config), dtype=dtype,
                                         param_dtype=dtype)
    shapes = jax.eval_shape(module.init, jax.random.key(0), *_inputs(request.param)[1])["params"]
    loaded[name] = module, convert.convert_torch_state_dict(convert.FLUX_TRANSFORMER, state,
                                                            shapes, dtype)
  return request.param, model, loaded


def _inputs(variant: str):
  """(torch inputs, ti_jax inputs): packed latents, T5 states, pooled CLIP, t, ids, guidance.

  Latents are packed and ids built by diffusers' FluxPipeline helpers for torch
  and by ti_jax's for Flax (their equality is asserted below). The text ids
  count up on every axis (the pipeline's are zeros) so that all three RoPE
  axes rotate something.
  """
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 16, LATENT, LATENT)).astype(np.float32)  # NCHW
  context = rng.standard_normal((2, TEXT_LEN, 32)).astype(np.float32)
  pooled = rng.standard_normal((2, 32)).astype(np.float32)
  t = np.array([0.3, 0.9], np.float32)
  guidance = np.array([3.5, 1.0], np.float32) if variant == "dev" else None
  txt_ids = np.repeat(np.arange(TEXT_LEN, dtype=np.float32)[:, None], 3, axis=1)
  packed = FluxPipeline._pack_latents(torch.from_numpy(latents), 2, 16, LATENT, LATENT)
  img_ids = FluxPipeline._prepare_latent_image_ids(2, LATENT // 2, LATENT // 2, "cpu",
                                                   torch.float32)
  torch_in = dict(hidden_states=packed, encoder_hidden_states=torch.from_numpy(context),
                  pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t),
                  img_ids=img_ids, txt_ids=torch.from_numpy(txt_ids),
                  guidance=None if guidance is None else torch.from_numpy(guidance))
  ours = (flux.pack_latents(jnp.asarray(latents.transpose(0, 2, 3, 1))), context, pooled, t,
          flux.latent_image_ids(LATENT // 2, LATENT // 2), txt_ids, guidance)
  return torch_in, ours



def _run(loaded, ours):
  module, params = loaded
  return np.asarray(module.apply({"params": params}, *ours).astype(jnp.float32))


def test_packing_and_ids_equal_flux_pipeline():
  torch_in, ours = _inputs("dev")
  np.testing.assert_array_equal(np.asarray(ours[0]), torch_in["hidden_states"].numpy())
  np.testing.assert_array_equal(ours[4], torch_in["img_ids"].numpy())
  np.testing.assert_array_equal(flux.text_ids(TEXT_LEN), np.zeros((TEXT_LEN, 3), np.float32))
  # Unpacking (latent 8 x 8 of a 64-px image) gives back the NHWC latents, as diffusers' does.
  back = flux.unpack_latents(ours[0], LATENT, LATENT)
  ref = FluxPipeline._unpack_latents(torch_in["hidden_states"], 8 * LATENT, 8 * LATENT, 8)
  np.testing.assert_array_equal(np.asarray(back), ref.numpy().transpose(0, 2, 3, 1))


def test_time_features_are_nearer_exact_than_diffusers_float32():
  """The features against float64 arithmetic on the same float32 arguments (t * 1000)."""
  t = np.array([1.0, 300.0, 900.0, 1000.0, 3500.0], np.float32)
  half = flux.TIME_PROJ_DIM // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
  exact = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=-1)
  theirs = get_timestep_embedding(torch.from_numpy(t), flux.TIME_PROJ_DIM, True, 0).numpy()
  ours = np.asarray(flux.time_features(jnp.asarray(t)))
  assert np.abs(ours - exact).max() <= np.abs(theirs - exact).max()
  assert np.abs(ours - theirs).max() < 5e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transformer_matches_diffusers(transformer, dtype):
  variant, model, loaded = transformer
  torch_in, ours = _inputs(variant)
  out = _run(loaded[dtype], ours)
  with torch.no_grad():
    ref = model(**torch_in).sample.numpy()
  if dtype == "float32":
    with torch.no_grad(), flux_time_features(model):
      same_features = model(**torch_in).sample.numpy()
    record_parity(f"tiny-flux {variant} transformer float32", rel_err(out, same_features),
                  TOLERANCE[dtype])
    record_parity(f"tiny-flux {variant} transformer float32 (diffusers' own time features)",
                  rel_err(out, ref), SD_FP32_TOLERANCE)
    return
  record_parity(f"tiny-flux {variant} transformer bfloat16", rel_err(out, ref), TOLERANCE[dtype])
  # Context for the bf16 figure: diffusers' own transformer in bf16 against its fp32 self.
  # diffusers rounds t and guidance to bf16 before multiplying by 1000 in bf16 (3500 becomes
  # 3504), which moves the features of those ~1000-radian sines far more than bf16 compute
  # does (ti_jax keeps them float32); the second figure takes values bf16 holds exactly.
  own_bf16 = copy.deepcopy(model).to(torch.bfloat16)
  exact = dict(torch_in, timestep=torch.tensor([0.25, 0.5]))
  if variant == "dev":
    exact["guidance"] = torch.tensor([4.0, 1.0])
  for label, inputs in (("", torch_in), (", t and guidance exact in bf16", exact)):
    with torch.no_grad():
      fp32 = model(**inputs).sample.numpy()
      own = own_bf16(**{k: v.bfloat16() if torch.is_tensor(v) and not k.endswith("_ids") else v
                        for k, v in inputs.items()}).sample.float().numpy()
    PARITY_FIGURES.append((f"tiny-flux {variant} transformer bfloat16: diffusers' own bf16{label} "
                           "(context)", rel_err(own, fp32), TOLERANCE[dtype]))


def test_blocked_attention_and_remat_give_the_same_output(transformer):
  """attention_impl="blocked" (ti_jax's memory-efficient attention) with rematerialised
  blocks takes the same params (names unchanged) and gives the XLA path's output."""
  variant, _, loaded = transformer
  module, params = loaded["float32"]
  _, ours = _inputs(variant)
  variant_module = module.clone(attention_impl="blocked", remat=True)
  assert rel_err(_run((variant_module, params), ours), _run(loaded["float32"], ours)) < 1e-6


def test_guidance_is_required_exactly_when_embedded(transformer):
  variant, _, loaded = transformer
  module, params = loaded["float32"]
  _, ours = _inputs(variant)
  if variant == "dev":
    with pytest.raises(ValueError, match="guidance"):
      module.apply({"params": params}, *ours[:6])
  else:
    assert "guidance_embedder" not in params["time_text_embed"]


def test_config_refuses_rope_axes_that_do_not_fill_the_head():
  cfg = dict(presets.preset("tiny-flux")["transformer"], axes_dims_rope=[4, 6, 4])
  with pytest.raises(UnsupportedConfigError, match="axes_dims_rope"):
    flux.FluxConfig.from_diffusers(cfg)


# --- The 16-channel VAE (no quant convs, shifted latents).


@pytest.fixture(scope="module")
def flux_vae(tmp_path_factory):
  """(torch VAE, {dtype name: (Flax module, params)}) of tiny-flux's VAE config."""
  torch.manual_seed(0)
  model = perturb_(TorchAutoencoderKL(**presets.preset("tiny-flux")["vae"]), 2)
  config, state = _read(_saved(model, tmp_path_factory.mktemp("flux-vae") / "vae"))
  loaded = {}
  for name, dtype in DTYPES.items():
    module = AutoencoderKL(VAEConfig.from_diffusers(config), dtype=dtype, param_dtype=dtype)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    loaded[name] = module, convert.convert_torch_state_dict(convert.VAE, state, shapes, dtype)
  return model, loaded


def test_flux_vae_config_and_params(flux_vae):
  module, params = flux_vae[1]["float32"]
  cfg = module.config
  assert (cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor) == (16, 0.3611, 0.1159)
  assert not cfg.use_quant_conv and not cfg.use_post_quant_conv
  assert "quant_conv" not in params and "post_quant_conv" not in params


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flux_vae_posterior_and_decode_match_diffusers(flux_vae, dtype):
  model, loaded = flux_vae
  module, params = loaded[dtype]
  images = np.random.default_rng(1).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(images)).latent_dist
    ref_decoded = model.decode(posterior.mean).sample.numpy()
  mean, logvar = module.apply({"params": params}, images.transpose(0, 2, 3, 1),
                              method=module.encode)
  # Decode the same latents on both sides so the figure measures the decoder alone.
  decoded = module.apply({"params": params}, posterior.mean.numpy().transpose(0, 2, 3, 1),
                         method=module.decode)
  nchw = lambda a: np.asarray(a.astype(jnp.float32)).transpose(0, 3, 1, 2)
  assert mean.shape == (2, 8, 8, 16)
  tol = TOLERANCE[dtype]
  record_parity(f"tiny-flux vae posterior mean {dtype}", rel_err(nchw(mean), posterior.mean), tol)
  record_parity(f"tiny-flux vae posterior logvar {dtype}", rel_err(nchw(logvar), posterior.logvar),
                tol)
  record_parity(f"tiny-flux vae decode {dtype}", rel_err(nchw(decoded), ref_decoded), tol)
  if dtype == "bfloat16":
    with torch.no_grad():
      vae_bf16 = copy.deepcopy(model).to(torch.bfloat16)
      own_mean = vae_bf16.encode(torch.from_numpy(images).bfloat16()).latent_dist.mean
      own = vae_bf16.decode(posterior.mean.bfloat16()).sample
    PARITY_FIGURES.append(("tiny-flux vae posterior mean bfloat16: diffusers' own bf16 (context)",
                           rel_err(own_mean.float(), posterior.mean), tol))
    PARITY_FIGURES.append(("tiny-flux vae decode bfloat16: diffusers' own bf16 (context)",
                           rel_err(own.float(), ref_decoded), tol))
