"""Full-size SD 1.5 / SD 2.1 / SDXL / LDM-1.4B: the Flax param tree matches the converted PyTorch state dict.

PyTorch modules are built on torch's `meta` device and the Flax tree with
`jax.eval_shape`, so no weights are allocated. A real checkpoint has exactly
these keys and shapes, so this proves real checkpoints load.
"""

import math

import jax
import numpy as np
import pytest
import torch

from ti_jax.weights import convert, presets
from ti_jax.weights.pipeline import build_modules, component_spec, param_shapes

# Parameter counts of the public checkpoints (UNet, VAE, text encoder).
EXPECTED_PARAMS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    # The paper's model: UNet + LDMBert = 1.415e9, its "1.4B" (LDMBert's unused
    # 39M-parameter to_logits head is not loaded).
    "ldm": {"unet": 872_300_484, "vae": 83_653_863, "text_encoder": 542_895_360},
    # SDXL base 1.0: the 2.57e9-parameter UNet, CLIP ViT-L and OpenCLIP bigG with projection.
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
             "text_encoder_2": 694_659_840},
}

# Checkpoint keys that hold no weight of ti_jax's modules: LDMBert's language-model head.
UNLOADED_KEYS = {("ldm", "text_encoder"): {"to_logits.weight", "to_logits.bias"}}


def _torch_shapes(configs):
  from diffusers import AutoencoderKL, UNet2DConditionModel
  from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
    LDMBertConfig,
    LDMBertModel,
  )
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
  text_kwargs = lambda role: {k: v for k, v in configs[role].items()
                              if k not in ("architectures", "model_type")}
  text_cfg = text_kwargs("text_encoder")
  with torch.device("meta"):
    text = (LDMBertModel(LDMBertConfig(**text_cfg))
            if configs["text_encoder"]["model_type"] == "ldmbert"
            else CLIPTextModel(CLIPTextConfig(**text_cfg)))
    models = {"unet": UNet2DConditionModel(**configs["unet"]),
              "vae": AutoencoderKL(**configs["vae"]), "text_encoder": text}
    if "text_encoder_2" in configs:
      models["text_encoder_2"] = CLIPTextModelWithProjection(
          CLIPTextConfig(**text_kwargs("text_encoder_2")))
  return {name: {k: tuple(v.shape) for k, v in m.state_dict().items()}
          for name, m in models.items()}


@pytest.mark.parametrize("name", ["sd15", "sd21", "ldm", "sdxl"])
def test_full_size_param_tree_matches_converted_torch_state_dict(name):
  configs = presets.preset(name)
  flax_shapes = param_shapes(build_modules(configs))
  torch_shapes = _torch_shapes(configs)
  assert set(flax_shapes) == set(torch_shapes) == set(EXPECTED_PARAMS[name])
  for comp in EXPECTED_PARAMS[name]:
    spec = component_spec(comp, configs[comp])
    plan = convert.plan_conversion(spec, torch_shapes[comp], flax_shapes[comp])
    flax_leaves = jax.tree_util.tree_leaves(flax_shapes[comp])
    left_out = set(torch_shapes[comp]) - {key for key, _, _ in plan.entries}
    assert left_out == UNLOADED_KEYS.get((name, comp), set()), (comp, sorted(left_out))
    n_flax = sum(math.prod(leaf.shape) for leaf in flax_leaves)
    assert n_flax == EXPECTED_PARAMS[name][comp], (comp, n_flax)


def test_flax_to_torch_names_invert_the_conversion():
  """The tiny writer's inverse mapping reproduces the PyTorch key names for SD 1.5 and SDXL
  (its tiny preset: the same names at fewer layers, cheaper to trace).

  The writer uses the hub layout `text_model.*` for the text encoders
  (`text_projection` beside it); transformers 5 itself saves without that prefix. Both load.
  """
  for name in ("sd15", "tiny-sdxl"):
    _check_inverse_names(presets.preset(name))


def _check_inverse_names(configs):
  torch_shapes = _torch_shapes(configs)
  flax_shapes = param_shapes(build_modules(configs))
  specs = {"unet": convert.UNET, "vae": convert.VAE, "text_encoder": convert.TEXT_ENCODER,
           "text_encoder_2": convert.TEXT_ENCODER_2}
  for comp in flax_shapes:
    spec = specs[comp]
    zeros = jax.tree_util.tree_map(lambda s: np.zeros((0,) * len(s.shape)), flax_shapes[comp])
    strip = lambda k: k.removeprefix("text_model.")
    names = {strip(k) for k in convert.flax_params_to_torch_state_dict(spec, zeros)}
    expected = {strip(k) for k in torch_shapes[comp] if not k.endswith("position_ids")}
    assert names == expected, comp
