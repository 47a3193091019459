"""Helpers that build diffusers/transformers PyTorch models for parity tests."""

import contextlib

import jax.numpy as jnp
import numpy as np
import torch

from ti_jax.models import flux


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
  """Randomises every parameter: weights ~ N(0, 1/fan_in), vectors get `scale` noise.

  With the default init (norm scales 1, biases 0) a swapped or dropped norm
  parameter would go unnoticed. Fan-in-scaled weights keep activations at
  unit scale through the residual stacks, like trained models, instead of
  the default init's growth, which would make the bf16 figures measure the
  conditioning of a random network rather than the implementation.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1:
        p.add_(scale * noise)
      else:
        p.copy_(noise / float(np.prod(p.shape[1:])) ** 0.5)
  return module.eval()


def build_torch_pipeline(configs: dict, tokenizer_dir: str, seed: int = 0):
  """A StableDiffusionPipeline with random weights from component config dicts."""
  from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
  )
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
  torch.manual_seed(seed)
  unet = perturb_(UNet2DConditionModel(**configs["unet"]), seed + 1)
  vae = perturb_(AutoencoderKL(**configs["vae"]), seed + 2)
  text_cfg = {k: v for k, v in configs["text_encoder"].items()
              if k not in ("architectures", "model_type")}
  text = perturb_(CLIPTextModel(CLIPTextConfig(**text_cfg)), seed + 3)
  sched_cls = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}[
      configs["scheduler"]["_class_name"]]
  return StableDiffusionPipeline(
      vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
      unet=unet, scheduler=sched_cls.from_config(configs["scheduler"]), safety_checker=None,
      feature_extractor=None, requires_safety_checker=False)


def rel_err(a, b) -> float:
  """max |a - b| / max |b| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@contextlib.contextmanager
def flux_time_features(model: torch.nn.Module):
  """Runs diffusers' `FluxTransformer2DModel` on ti_jax's timestep/guidance sines
  (`flux.time_features`: float64 frequencies rounded once). They are sines of up to 1000
  (guidance: 3500) radians, where torch's and XLA's float32 `exp` differ by an ulp in some
  frequencies; with the same features the rest of the network is compared alone."""
  proj = model.time_text_embed.time_proj
  proj.forward = lambda t: torch.from_numpy(
      np.array(flux.time_features(jnp.asarray(t.float().numpy()))))
  try:
    yield
  finally:
    del proj.forward  # back to the class's forward
