"""The latent cache: every distinct training view VAE-encoded once, before training.

With the crop fixed and a flip as the only augmentation, a run only ever shows
the VAE `V` distinct views (see `image_loader.view_pixels`), so the train step
reads their posteriors from this cache instead of running the encoder.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnums=0)
def _encode(vae, vae_params, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean, logvar) of the VAE's posterior of `pixels` `[v, R, R, 3]` (compiled once per VAE
  module and shape: later runs in the process reuse the program)."""
  return vae.apply({"params": vae_params}, pixels, method=vae.encode)


def encode_views(vae, vae_params, views: np.ndarray, chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """VAE posterior (mean, std) of each view `[V, R, R, 3]`: `[V, h, w, C]` float32 each.

  Encoded `chunk` views per call, so a large resolution does not hold every
  view's encoder activations at once.
  """
  means, stds = [], []
  for i in range(0, len(views), chunk):
    mean, logvar = _encode(vae, vae_params, jnp.asarray(views[i:i + chunk]))
    means.append(np.asarray(mean, np.float32))
    stds.append(np.asarray(jnp.exp(0.5 * logvar), np.float32))
  return np.concatenate(means), np.concatenate(stds)
