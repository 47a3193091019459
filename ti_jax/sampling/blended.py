"""Blended Latent Diffusion (Avrahami et al., 2023): a text-guided edit confined to a mask.

The input image is encoded once with the VAE (its posterior mean). The loop
starts from those latents noised to the first step's level and runs the
sampler's steps; after every step the latents inside the latent-grid mask
keep the guided denoising result and those outside are replaced by the
input's latents noised afresh to the level the step reached (the last step's
output is decoded as clean, so there the input's latents themselves). Thin
masks follow the paper's progressive mask shrinking: the first steps blend
with a dilated latent mask that shrinks, stage by stage, to the mask itself.
The whole loop, guidance and decode are one compiled program, pmapped over
devices like the sampler's (`generation.py`); image i of a call draws all its
noise from (seed, i), so results do not depend on the device count. The pixel
blend that keeps the background exact happens afterwards, on the host, at
the image's own resolution (`blend_pixels`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ti_jax.runtime import parallel
from ti_jax.sampling import generation, noise_schedule, schedulers


def noised_latents(sampler: schedulers.Sampler, schedule: noise_schedule.NoiseSchedule,
                   latents: jax.Array, noise: jax.Array, level: jax.Array | int) -> jax.Array:
  """The input's latents at the noise level of the loop's sample before step `level`.

  Every sampler's sample entering step k is at the level of `timesteps[k]`
  (PNDM's repeated timesteps included); `level == num_steps` (after the last
  step) is clean. Euler works in sigma (x0 + sigma * noise), the others in
  the variance-preserving form of `noise_schedule.add_noise`.

  Args:
    sampler: the loop's sampler.
    schedule: the model's training noise schedule.
    latents: clean latents `[b, h, w, C]`.
    noise: standard normal noise, same shape.
    level: step index in [0, num_steps], int or traced int32.
  """
  n = sampler.num_steps
  k = jnp.minimum(level, n - 1)
  if sampler.kind == "euler":
    noisy = latents + sampler.tables["sigma"][k] * noise
  else:
    t = jnp.broadcast_to(sampler.timesteps[k], (latents.shape[0],))
    noisy = noise_schedule.add_noise(schedule, latents, noise, t)
  return jnp.where(level >= n, latents.astype(jnp.float32), noisy)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
  """Binary dilation of a bool `[H, W]` mask by a (2 * radius + 1)-square kernel."""
  if radius <= 0:
    return mask.copy()
  h, w = mask.shape
  padded = np.pad(mask, radius)
  out = np.zeros_like(mask)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      out |= padded[dy:dy + h, dx:dx + w]
  return out


def _cover(pixel_mask: np.ndarray, factor: int) -> np.ndarray:
  """float `[h, w]`: the share of each latent cell's `factor` x `factor` pixels inside the mask."""
  h, w = pixel_mask.shape[0] // factor, pixel_mask.shape[1] // factor
  return pixel_mask[:h * factor, :w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3))


def is_thin(pixel_mask: np.ndarray, factor: int) -> bool:
  """True when fewer than half of the mask's pixels lie in latent cells it half covers.

  Downsampling such a mask (strokes, scribbles, outlines narrower than about a
  latent cell) would drop most of it: the paper's "thin mask" case.
  """
  cover = _cover(pixel_mask, factor)  # [h, w]
  return float(cover[cover >= 0.5].sum()) < 0.5 * float(cover.sum())


def latent_masks(pixel_mask: np.ndarray, factor: int, shrink_stages: int) -> np.ndarray:
  """The latent-grid masks of progressive mask shrinking, largest first, float32 `[S+1, h, w, 1]`.

  A latent cell (`factor` x `factor` pixels) is inside the mask when at least
  half of its pixels are (the paper's downsampling). For a thin mask
  (`is_thin`) that would lose most of the region, so every cell the mask
  touches is inside instead. Stage j of `shrink_stages` dilates that mask by
  `shrink_stages - j` cells; the last entry is the mask itself.
  """
  cover = _cover(pixel_mask, factor)  # [h, w]
  base = cover > 0 if is_thin(pixel_mask, factor) else cover >= 0.5
  masks = [dilate(base, shrink_stages - j) for j in range(shrink_stages)] + [base]
  return np.stack(masks).astype(np.float32)[..., None]


def stage_of_step(num_steps: int, num_masks: int) -> np.ndarray:
  """int32 `[num_steps]`: which of `num_masks` masks blends after each step.

  The steps are split into `num_masks` equal runs, largest mask first; the
  blend after the last step always uses the mask itself (the last one).
  """
  k = np.arange(1, num_steps + 1)
  stage = (k * num_masks) // (num_steps + 1)
  stage[-1] = num_masks - 1
  return stage.astype(np.int32)


def blend_pixels(original: np.ndarray, edited: np.ndarray, region: np.ndarray) -> np.ndarray:
  """uint8 `[..., H, W, 3]`: `edited` inside bool `region` `[H, W]`, `original` elsewhere."""
  return np.where(region[..., None], edited, original).astype(np.uint8)


@flax.struct.dataclass
class _EditArrays:
  """Arrays the edit program reads (replicated over devices)."""
  unet: Any
  text_encoders: tuple[Any, ...]  # each text encoder's params
  vae: Any
  learned: tuple[jax.Array, ...]  # per encoder: [m, D_e] vectors of all learned tokens
  placeholder_ids: tuple[jax.Array, ...]  # per encoder: [m] their ids in its tokenizer
  sampler: schedulers.Sampler
  schedule: noise_schedule.NoiseSchedule
  latents: jax.Array  # [h, w, C] the input image's scaled latents
  masks: jax.Array  # [S, h, w, 1] latent masks, largest first
  mask_stage: jax.Array  # [num_steps] int32 mask index of the blend after each step
  # SDXL only (None otherwise), as generation's `_GenArrays`.
  zero_uncond: jax.Array | None = None  # bool []


@dataclasses.dataclass(frozen=True)
class _EditSettings:
  unet: Any
  text_encoders: tuple[Any, ...]  # each text encoder's module
  vae: Any
  guidance_scale: float
  scaling_factor: float
  shift_factor: float
  guidance_rescale: float = 0.0
  pool_eos_token_id: int | None = None  # SDXL only, as generation's `_GenSettings`
  time_ids: tuple[float, ...] | None = None


def _edit_shard(arrays: _EditArrays, cond_ids: jax.Array, uncond_ids: jax.Array,
                image_index: jax.Array, seed: jax.Array, *, settings: _EditSettings) -> jax.Array:
  """Decoded edits `[b, H, W, 3]` in [0, 1] for this device's prompts (token ids `[b, T]`,
  SDXL `[b, 2, T]`)."""
  sampler, n = arrays.sampler, arrays.sampler.num_steps
  cond = generation.guidance_conditioning(settings, arrays, cond_ids, uncond_ids)
  b = cond_ids.shape[0]
  source = jnp.broadcast_to(arrays.latents, (b,) + arrays.latents.shape)  # [b, h, w, C]
  key = jax.random.key(seed)

  def noise(level):  # [b, h, w, C]: image g's noise for `level` is drawn from (seed, g, level)
    return jax.vmap(lambda g: jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(key, g), level), arrays.latents.shape))(image_index)

  x = noised_latents(sampler, arrays.schedule, source, noise(0), 0)  # [b, h, w, C]

  def body(i, carry):
    x, state = carry
    out = generation.guided_output(settings, arrays, sampler, x, i, cond)
    x, state = sampler.step(state, out, i, x)
    # The blend: the denoised sample inside the mask, the input noised to the same level outside.
    background = noised_latents(sampler, arrays.schedule, source, noise(i + 1), i + 1)
    m = arrays.masks[arrays.mask_stage[i]]  # [h, w, 1]
    return m * x + (1.0 - m) * background, state

  x, _ = jax.lax.fori_loop(0, n, body, (x, sampler.init_state(x)))
  return generation.decode_latents(settings, arrays, x)


@functools.lru_cache(maxsize=16)
def _edit_program(settings: _EditSettings, devices: tuple):
  """The pmapped edit loop of `settings` (the sampler travels in its arrays), memoized as
  `generation`'s: editors of the same settings share one traced program."""
  return parallel.pmapped(functools.partial(_edit_shard, settings=settings), devices)


@functools.lru_cache(maxsize=16)
def _encode_program(vae):
  """The VAE's jitted encode (the posterior mean), one per VAE module config."""
  return jax.jit(lambda params, x: vae.apply({"params": params}, x, method=vae.encode)[0])


class BlendedEditor:
  """Edits one image region with a prompt (Blended Latent Diffusion) over several devices."""

  def __init__(self, sd, *, scheduler: str = "ddim", num_inference_steps: int = 50,
               guidance_scale: float = 7.5, height: int = 512, width: int = 512,
               devices: Sequence | None = None, guidance_rescale: float = 0.0):
    """`height` and `width` (the working size) must be multiples of `size_multiple(sd)`.

    SDXL edits as it samples (`generation.prompt_arrays`, `guidance_conditioning`);
    `guidance_rescale` as `generation.ImageGenerator`'s."""
    multiple = size_multiple(sd)
    if height % multiple or width % multiple:
      raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
    self.sd = sd
    self.factor = latent_factor(sd)
    self.image_size = (height, width)
    self.devices = list(devices) if devices is not None else parallel.all_devices()
    self.sampler = schedulers.make_sampler(scheduler, sd.scheduler_config, num_inference_steps)
    self.schedule = noise_schedule.noise_schedule_from_config(sd.scheduler_config)
    self.settings = _EditSettings(
        unet=sd.unet, vae=sd.vae,
        guidance_scale=float(guidance_scale),
        scaling_factor=float(sd.vae.config.scaling_factor),
        shift_factor=float(sd.vae.config.shift_factor), guidance_rescale=float(guidance_rescale),
        **generation.text_settings(sd, height, width))
    weights = {"unet": sd.unet_params, "vae": sd.vae_params,
               "text_encoders": tuple(e.params for e in sd.text_encoders)}
    self._params = parallel.replicate(weights, self.devices)
    self._fn = _edit_program(self.settings, tuple(self.devices))
    # One jitted encode on the host's default device: the image is encoded once per edit.
    self._encode = _encode_program(sd.vae)

  def encode(self, image: np.ndarray) -> np.ndarray:
    """Scaled latents `[h, w, C]` (float32) of a uint8 `[H, W, 3]` image at the working size."""
    if image.shape[:2] != self.image_size:
      raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, the editor works at "
                       f"{self.image_size[1]}x{self.image_size[0]}")
    pixels = jnp.asarray(image, jnp.float32)[None] / 127.5 - 1.0  # [1, H, W, 3] in [-1, 1]
    mean = self._encode(self.sd.vae_params, pixels)[0]  # [h, w, C]
    return np.asarray((mean - self.settings.shift_factor) * self.settings.scaling_factor, np.float32)

  def edit(self, prompts: Sequence[str], latents: np.ndarray, masks: np.ndarray, *,
           seed: int = 0, negative_prompt: str = "",
           learned: Sequence[tuple[np.ndarray, Sequence[int]]] = (),
           first_index: int = 0, tokenizers: Sequence | None = None) -> np.ndarray:
    """Decoded edits, uint8 `[N, H, W, 3]`, one per prompt (no pixel blend yet).

    Args:
      prompts: one prompt per edited image.
      latents: the input's latents from `encode`, `[h, w, C]`.
      masks: `latent_masks(...)`, `[S, h, w, 1]`, largest first.
      seed: image i draws its noise from (seed, first_index + i).
      negative_prompt: the unconditional prompt of classifier-free guidance.
      learned: per text encoder, (vectors `[m, D_e]`, token ids `[m]`) of all learned
        concepts (`generation.ImageGenerator.generate`'s).
      first_index: global index of the first image (for batches of a longer run).
      tokenizers: per text encoder, a tokenizer holding the learned tokens (default:
        the model's).
    """
    n, d = len(prompts), len(self.devices)
    padded = -(-n // d) * d
    cond, uncond, text = generation.prompt_arrays(
        self.sd, list(prompts) + [prompts[-1]] * (padded - n), negative_prompt, learned=learned,
        tokenizers=tokenizers)
    index = np.arange(first_index, first_index + padded, dtype=np.int32)
    extra = parallel.replicate({
        **text, "sampler": self.sampler,
        "schedule": self.schedule, "latents": np.asarray(latents, np.float32),
        "masks": np.asarray(masks, np.float32),
        "mask_stage": stage_of_step(self.sampler.num_steps, len(masks))}, self.devices)
    arrays = _EditArrays(**self._params, **extra)
    local = len(parallel.addressable(self.devices))
    rows = slice(jax.process_index() * local * (padded // d),
                 (jax.process_index() + 1) * local * (padded // d))
    seeds = np.full((local,), seed, np.uint32)
    images = self._fn(arrays, *parallel.shard((cond[rows], uncond[rows], index[rows]), local),
                      seeds)
    images = parallel.allgather(parallel.unshard(images))[:n]
    return np.round(images * 255.0).astype(np.uint8)


def latent_factor(sd) -> int:
  """Pixels per latent cell along each side (8 for Stable Diffusion's VAE)."""
  return 2 ** (len(sd.vae.config.block_out_channels) - 1)


def size_multiple(sd) -> int:
  """What image sides must be multiples of: the VAE's factor times the UNet's downsampling."""
  return latent_factor(sd) * 2 ** (len(sd.unet.config.block_out_channels) - 1)
