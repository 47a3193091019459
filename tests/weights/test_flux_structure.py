"""Full-size FLUX.1-dev / FLUX.1-schnell: the Flax param trees match the PyTorch state dicts.

diffusers' `FluxTransformer2DModel` and the 16-channel `AutoencoderKL` are built on
torch's `meta` device, ti_jax's modules with `jax.eval_shape`, so no weights are
allocated. A real checkpoint has exactly these keys and shapes, so this proves
the hub's transformer and VAE folders convert (as tests/weights/test_structure.py
does for SD and SDXL).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers import FluxTransformer2DModel as TorchFlux

from ti_jax.models import flux
from ti_jax.models.vae import AutoencoderKL, VAEConfig
from ti_jax.weights import convert, presets

# Parameter counts of the meta PyTorch modules (FLUX.1-dev: 11.90e9; schnell lacks the
# guidance embedder's 2 x 3072-wide linears).
EXPECTED_PARAMS = {
    "flux-dev": {"transformer": 11_901_408_320, "vae": 83_819_683},
    "flux-schnell": {"transformer": 11_891_178_560, "vae": 83_819_683},
}


def _torch_models(configs: dict) -> dict:
  with torch.device("meta"):
    return {"transformer": TorchFlux(**configs["transformer"]),
            "vae": TorchAutoencoderKL(**configs["vae"])}


def _flax_shapes(configs: dict) -> dict:
  """Per component, the Flax param tree of `jax.ShapeDtypeStruct`s."""
  transformer = flux.FluxTransformer2DModel(flux.FluxConfig.from_diffusers(configs["transformer"]))
  cfg = transformer.config
  guidance = jnp.zeros((1,)) if cfg.guidance_embeds else None
  inputs = (jnp.zeros((1, 1, cfg.in_channels)), jnp.zeros((1, 1, cfg.joint_attention_dim)),
            jnp.zeros((1, cfg.pooled_projection_dim)), jnp.zeros((1,)), jnp.zeros((1, 3)),
            jnp.zeros((1, 3)), guidance)
  vae = AutoencoderKL(VAEConfig.from_diffusers(configs["vae"]))
  return {"transformer": jax.eval_shape(transformer.init, jax.random.key(0), *inputs)["params"],
          "vae": jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]}


SPECS = {"transformer": convert.FLUX_TRANSFORMER, "vae": convert.VAE}


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell"])
def test_full_size_param_tree_matches_converted_torch_state_dict(name):
  configs = presets.preset(name)
  models = _torch_models(configs)
  flax_shapes = _flax_shapes(configs)
  for comp, spec in SPECS.items():
    torch_shapes = {k: tuple(v.shape) for k, v in models[comp].state_dict().items()}
    plan = convert.plan_conversion(spec, torch_shapes, flax_shapes[comp])
    assert {key for key, _, _ in plan.entries} == set(torch_shapes), comp
    n_flax = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(flax_shapes[comp]))
    n_torch = sum(p.numel() for p in models[comp].parameters())
    assert n_flax == n_torch == EXPECTED_PARAMS[name][comp], (comp, n_flax, n_torch)
    # The inverse mapping (Flax names -> PyTorch keys) reproduces every key: the
    # single_transformer_blocks.N index is folded and unfolded like the others.
    zeros = jax.tree_util.tree_map(lambda s: np.zeros((0,) * len(s.shape)), flax_shapes[comp])
    assert set(convert.flax_params_to_torch_state_dict(spec, zeros)) == set(torch_shapes), comp
  assert not {"quant_conv", "post_quant_conv"} & set(flax_shapes["vae"])
