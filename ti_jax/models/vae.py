"""Flax AutoencoderKL (the VAE of Stable Diffusion, SDXL and Flux), NHWC, with diffusers' parameter names.

Flux's VAE is the same network with 16 latent channels, no quant_conv /
post_quant_conv (`use_quant_conv=False`, `use_post_quant_conv=False`) and a
`shift_factor` subtracted from the latents before scaling.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ti_jax.models.config_utils import UnsupportedConfigError, check_supported
from ti_jax.models.layers import (
  Downsample2D,
  ResnetBlock2D,
  Upsample2D,
  multihead_attention,
)

Dtype = Any

_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "use_quant_conv": (True, False),
    "use_post_quant_conv": (True, False),
    "mid_block_add_attention": (True,),
    "latents_mean": (None,),
    "latents_std": (None,),
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The architecture fields of a diffusers `vae/config.json`."""
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 512
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  # The 1x1 convs after the encoder and before the decoder; Flux's VAE has neither.
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True

  @classmethod
  def from_diffusers(cls, cfg: Mapping[str, Any]) -> "VAEConfig":
    """Builds the config from a diffusers `vae/config.json` dict, refusing unsupported fields."""
    check_supported("vae", cfg, _REQUIRED_VALUES)
    down = cfg.get("down_block_types", ["DownEncoderBlock2D"] * 4)
    up = cfg.get("up_block_types", ["UpDecoderBlock2D"] * 4)
    for t in down:
      if t != "DownEncoderBlock2D":
        raise UnsupportedConfigError(f"vae config: down block {t!r} is not supported (DownEncoderBlock2D only)")
    for t in up:
      if t != "UpDecoderBlock2D":
        raise UnsupportedConfigError(f"vae config: up block {t!r} is not supported (UpDecoderBlock2D only)")
    channels = tuple(cfg.get("block_out_channels", cls.block_out_channels))
    if len(down) != len(channels) or len(up) != len(channels):
      raise UnsupportedConfigError(
          f"vae config: {len(channels)} block_out_channels but {len(down)} down / {len(up)} up blocks")
    return cls(
        in_channels=cfg.get("in_channels", 3),
        out_channels=cfg.get("out_channels", 3),
        block_out_channels=channels,
        layers_per_block=cfg.get("layers_per_block", 2),
        latent_channels=cfg.get("latent_channels", 4),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        sample_size=cfg.get("sample_size", 512),
        scaling_factor=cfg.get("scaling_factor", 0.18215),
        shift_factor=cfg.get("shift_factor") or 0.0,
        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
    )


class _VAEModule(nn.Module):
  config: VAEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def kw(self):
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def resnet(self, channels, name):
    return ResnetBlock2D(channels, self.config.norm_num_groups, 1e-6, residual_fp32=True,
                         name=name, **self.kw)

  def conv3(self, channels, name):
    return nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), name=name, **self.kw)

  def norm(self, name):
    return nn.GroupNorm(self.config.norm_num_groups, epsilon=1e-6, name=name, dtype=jnp.float32, param_dtype=self.param_dtype)


class _VAEBlock(_VAEModule):
  """DownEncoderBlock2D / UpDecoderBlock2D: resnets then an optional resampler."""
  channels: int = 0
  num_layers: int = 1
  resample: str | None = None  # "down", "up" or None

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = self.resnet(self.channels, f"resnets_{j}")(x)
    if self.resample == "down":
      # diffusers pads right/bottom by one, then a 3x3 stride-2 conv without padding.
      x = Downsample2D(self.channels, padding=0, name="downsamplers_0", **self.kw)(x)
    elif self.resample == "up":
      x = Upsample2D(self.channels, name="upsamplers_0", **self.kw)(x)
    return x


class _SpatialSelfAttention(_VAEModule):
  """Single-head self-attention over all pixels with GroupNorm and a residual."""

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = self.norm("group_norm")(x).reshape(b, h * w, c)  # [B, HW, C]
    # diffusers computes this softmax in fp32 (upcast_softmax); so do we.
    y = multihead_attention(y, None, heads=1, head_dim=c, out_features=c, qkv_bias=True,
                            upcast=True, **self.kw)
    return x.astype(jnp.float32) + y.reshape(b, h, w, c).astype(jnp.float32)


class _MidBlock(_VAEModule):
  """UNetMidBlock2D: resnet, attention, resnet."""
  channels: int = 0

  @nn.compact
  def __call__(self, x):
    x = self.resnet(self.channels, "resnets_0")(x)
    x = _SpatialSelfAttention(self.config, name="attentions_0", **self.kw)(x)
    return self.resnet(self.channels, "resnets_1")(x)


class Encoder(_VAEModule):
  """Image `[B, H, W, 3]` in [-1, 1] -> posterior moments `[B, H/f, W/f, 2 * latent]`."""

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    channels = cfg.block_out_channels
    x = self.conv3(channels[0], "conv_in")(x)
    for i, ch in enumerate(channels):
      x = _VAEBlock(cfg, channels=ch, num_layers=cfg.layers_per_block,
                    resample="down" if i < len(channels) - 1 else None,
                    name=f"down_blocks_{i}", **self.kw)(x)
    x = _MidBlock(cfg, channels=channels[-1], name="mid_block", **self.kw)(x)
    x = nn.silu(self.norm("conv_norm_out")(x))
    return self.conv3(2 * cfg.latent_channels, "conv_out")(x)


class Decoder(_VAEModule):
  """Latents `[B, h, w, latent]` -> image `[B, h*f, w*f, 3]` in about [-1, 1]."""

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    rev = tuple(reversed(cfg.block_out_channels))
    x = self.conv3(rev[0], "conv_in")(z)
    x = _MidBlock(cfg, channels=rev[0], name="mid_block", **self.kw)(x)
    for i, ch in enumerate(rev):
      x = _VAEBlock(cfg, channels=ch, num_layers=cfg.layers_per_block + 1,
                    resample="up" if i < len(rev) - 1 else None,
                    name=f"up_blocks_{i}", **self.kw)(x)
    x = nn.silu(self.norm("conv_norm_out")(x))
    return self.conv3(cfg.out_channels, "conv_out")(x)


class AutoencoderKL(_VAEModule):
  """The KL autoencoder of Stable Diffusion, SDXL and Flux.

  `encode(images) -> (mean, logvar)` of the diagonal Gaussian posterior over
  unscaled latents; `decode(latents) -> images`. Subtract `config.shift_factor`
  (Flux; 0 otherwise) from samples and multiply by `config.scaling_factor`
  before the denoiser, as diffusers does.
  """

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, **self.kw)
    self.decoder = Decoder(cfg, **self.kw)
    if cfg.use_quant_conv:
      self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), **self.kw)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), **self.kw)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images: [B, H, W, 3] in [-1, 1] -> (mean, logvar), each [B, H/8, W/8, latent], float32."""
    moments = self.encoder(images.astype(self.dtype))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: jax.Array) -> jax.Array:
    """latents: [B, h, w, latent] (unscaled) -> images [B, 8h, 8w, 3]."""
    latents = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      latents = self.post_quant_conv(latents)
    return self.decoder(latents)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Reconstructs images through the posterior mean (used to initialise all params)."""
    mean, _ = self.encode(images)
    return self.decode(mean)
