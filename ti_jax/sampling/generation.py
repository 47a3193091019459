"""Text-to-image generation with learned pseudo-words: a jit-compiled, pmapped denoising loop.

Classifier-free guidance runs the conditional and unconditional halves in one
batched UNet call (optionally rescaled, `guidance_rescale`); the loop is a
`lax.fori_loop`, so a whole image is one compiled program. Each image's
starting noise is a function of (seed, image index) alone, so the images do
not depend on how many devices share the work.

Whatever repeats per text encoder (its module and params, tokenizer, learned
vectors and their ids) is a tuple indexed like `StableDiffusion.text_encoders`.
Stable Diffusion XL goes through the same program: its prompts are token ids
of both tokenizers (`[b, 2, T]`), each encoder gets its own learned vectors
(with their ids in its own tokenizer), and the UNet also reads the pooled
text embedding and the size conditioning (`ti_jax.models.sdxl`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re
from typing import Any, Iterator, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, PngImagePlugin

from ti_jax.data import captions
from ti_jax.embeddings.pseudo_words import embed_tokens, token_table
from ti_jax.models import sdxl
from ti_jax.runtime import fileio, parallel
from ti_jax.sampling import schedulers


@flax.struct.dataclass
class _GenArrays:
  """Arrays the generation program reads (replicated over devices).

  `text_encoders`, `learned` and `placeholder_ids` hold one entry per text encoder.
  """
  unet: Any
  text_encoders: tuple[Any, ...]  # each encoder's params
  vae: Any
  learned: tuple[jax.Array, ...]  # per encoder: [m, D_e] vectors of all learned tokens
  placeholder_ids: tuple[jax.Array, ...]  # per encoder: [m] their ids in its tokenizer
  sampler: schedulers.Sampler
  # SDXL only (None otherwise): whether the unconditional half is zeros (an empty
  # negative prompt with the model's force_zeros_for_empty_prompt).
  zero_uncond: jax.Array | None = None  # bool []


@dataclasses.dataclass(frozen=True)
class _GenSettings:
  unet: Any
  text_encoders: tuple[Any, ...]  # each encoder's module
  vae: Any
  guidance_scale: float
  latent_shape: tuple[int, int, int]  # (h, w, C)
  scaling_factor: float
  shift_factor: float
  guidance_rescale: float = 0.0
  pool_eos_token_id: int | None = None  # SDXL: where the pooled embedding is read
  time_ids: tuple[float, ...] | None = None  # SDXL: the 6 size-conditioning values


# The three pieces of every guided denoising program (this sampler's and ti_jax.edit's).
# `settings` holds the modules and scalars, `arrays` the params and learned vectors; any pair
# with those fields works (`_GenSettings`/`_GenArrays` here, their editing counterparts).


def encode_prompts(settings, arrays, ids: jax.Array) -> tuple[jax.Array, Any]:
  """What the UNet reads for token ids, the learned vectors spliced in: (context, added_cond).

  SD/LDM (one text encoder): `ids` `[b, T]`; returns (text-encoder states `[b, T, D]`,
  None). SDXL (two): `ids` `[b, 2, T]`, the prompts in each encoder's tokenizer;
  returns (context `[b, T, D1 + D2]`, {"text_embeds" `[b, P]`, "time_ids" `[b, 6]`}).
  The pooled embedding is read at the real end token (`settings.pool_eos_token_id`),
  where A1111 and ComfyUI read it, not at the largest id (transformers' legacy rule
  for SDXL's eos id 2, which picks an added pseudo-word).
  """
  one = len(settings.text_encoders) == 1
  # [b, T] token ids per encoder
  per_encoder = (ids,) if one else tuple(ids[:, e] for e in range(len(settings.text_encoders)))
  embeds = tuple(  # [b, T, D_e] per encoder, the learned vectors spliced in
      embed_tokens(token_table(module, params), learned, placeholder_ids, e_ids)
      for module, params, learned, placeholder_ids, e_ids in zip(
          settings.text_encoders, arrays.text_encoders, arrays.learned, arrays.placeholder_ids,
          per_encoder))
  if one:
    return settings.text_encoders[0].apply({"params": arrays.text_encoders[0]}, ids,
                                           inputs_embeds=embeds[0]), None
  context, pooled = sdxl.text_conditioning(
      settings.text_encoders, arrays.text_encoders, per_encoder, embeds,
      pool_eos_token_id=settings.pool_eos_token_id)
  return context, sdxl.added_cond(pooled, settings.time_ids)


def guidance_conditioning(settings, arrays, cond_ids: jax.Array, uncond_ids: jax.Array):
  """The (context, added_cond) of one guided UNet call: the unconditional half first.

  Without guidance (`guidance_scale == 1`) only the prompts' own. SDXL's
  unconditional half is zeros where `arrays.zero_uncond` (diffusers'
  `force_zeros_for_empty_prompt` with no negative prompt).
  """
  cond = encode_prompts(settings, arrays, cond_ids)
  if settings.guidance_scale == 1.0:
    return cond
  uncond = encode_prompts(settings, arrays, uncond_ids)
  if len(settings.text_encoders) > 1:  # SDXL
    context, added = uncond
    zeros = sdxl.unconditional(context, added["text_embeds"])
    keep = jnp.logical_not(arrays.zero_uncond)
    uncond = (jnp.where(keep, context, zeros[0]),
              dict(added, text_embeds=jnp.where(keep, added["text_embeds"], zeros[1])))
  # [2b, T, D] context (and [2b, ...] added conditioning)
  return jax.tree_util.tree_map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)


def rescale_guidance(guided: jax.Array, cond: jax.Array, rescale: float) -> jax.Array:
  """Guidance rescale (Lin et al. 2023, sec. 3.4; diffusers' `rescale_noise_cfg`).

  Scales the guided output `[b, h, w, C]` to the per-image standard deviation of the
  conditional output, then mixes: `rescale * scaled + (1 - rescale) * guided`.
  """
  axes = tuple(range(1, guided.ndim))
  # ddof=1 as torch's std; the ratio does not depend on it, its rounding does.
  ratio = jnp.std(cond, axis=axes, keepdims=True, ddof=1) / jnp.std(
      guided, axis=axes, keepdims=True, ddof=1)
  return rescale * (guided * ratio) + (1.0 - rescale) * guided


def guided_output(settings, arrays, sampler: schedulers.Sampler, x: jax.Array, i: jax.Array,
                  cond) -> jax.Array:
  """The UNet's float32 output for latents `x` `[b, h, w, C]` at sampler step `i`.

  `cond` is `guidance_conditioning`'s (context, added_cond): with classifier-free
  guidance (`settings.guidance_scale != 1`) a context `[2b, T, D]`, the unconditional
  half first; otherwise `[b, T, D]`. `settings.guidance_rescale` 0 leaves the guided
  output as it is (the same program as without the option).
  """
  guided = settings.guidance_scale != 1.0
  context, added = cond
  x_in = sampler.scale_model_input(x, i)
  if guided:
    x_in = jnp.concatenate([x_in, x_in])
  t = jnp.broadcast_to(sampler.timesteps[i], (x_in.shape[0],))
  out = settings.unet.apply({"params": arrays.unet}, x_in, t, context,
                            added_cond=added).astype(jnp.float32)
  if guided:
    uncond, cond_out = jnp.split(out, 2)
    out = uncond + settings.guidance_scale * (cond_out - uncond)
    if settings.guidance_rescale > 0.0:
      out = rescale_guidance(out, cond_out, settings.guidance_rescale)
  return out


def decode_latents(settings, arrays, latents: jax.Array) -> jax.Array:
  """Images `[b, H, W, 3]` in [0, 1] from scaled latents `[b, h, w, C]`."""
  z = latents / settings.scaling_factor + settings.shift_factor
  images = settings.vae.apply({"params": arrays.vae}, z, method=settings.vae.decode)
  return jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def _generate_shard(arrays: _GenArrays, cond_ids: jax.Array, uncond_ids: jax.Array,
                    image_index: jax.Array, seed: jax.Array, *,
                    settings: _GenSettings) -> jax.Array:
  """Images `[b, H, W, 3]` in [0, 1] for this device's prompts (token ids `[b, T]`,
  SDXL `[b, 2, T]`)."""
  sampler = arrays.sampler
  cond = guidance_conditioning(settings, arrays, cond_ids, uncond_ids)
  key = jax.random.key(seed)
  latents = jax.vmap(lambda g: jax.random.normal(jax.random.fold_in(key, g),
                                                 settings.latent_shape))(image_index)
  latents = latents * sampler.init_noise_sigma  # [b, h, w, C]

  def body(i, carry):
    x, state = carry
    return sampler.step(state, guided_output(settings, arrays, sampler, x, i, cond), i, x)

  latents, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (latents, sampler.init_state(latents)))
  return decode_latents(settings, arrays, latents)


def text_settings(sd, height: int, width: int) -> dict[str, Any]:
  """The text side of a program's settings: every encoder's module and, for SDXL, the
  second encoder's end token (the pooling position) and the size conditioning of
  `height` x `width`."""
  out = {"text_encoders": tuple(e.module for e in sd.text_encoders)}
  if len(sd.text_encoders) == 1:
    return out
  return dict(out, pool_eos_token_id=int(sd.text_encoders[-1].tokenizer.eos_token_id),
              # The pipeline's default: original = target = the generated size, no crop.
              time_ids=tuple(float(v) for v in sdxl.time_ids((height, width), (0, 0))))


def learned_arrays(learned, width: int, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """One encoder's learned vectors `[m, D]` and their token ids `[m]`, as the program reads
  them, from (vectors, ids) or None (no learned tokens)."""
  if learned is None or not len(learned[1]):  # an id that never occurs, so nothing is spliced
    return np.zeros((1, width), np.float32), np.full((1,), -1, np.int32)
  vectors = np.asarray(learned[0], np.float32).reshape(-1, width)  # [m, D]
  ids = np.asarray(learned[1], np.int32).reshape(-1)  # [m]
  if ids.max() >= len(tokenizer):  # the ids were added to another tokenizer
    raise ValueError(f"learned token id {int(ids.max())} is not in the tokenizer "
                     f"({len(tokenizer)} tokens): pass the tokenizer that "
                     "concepts.tokenizer_with_concepts returned with these ids")
  return vectors, ids


def prompt_arrays(sd, prompts: Sequence[str], negative_prompt: str, *, learned=(),
                  tokenizers=None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Host arrays of a guided program's text side: (cond ids, uncond ids, learned arrays).

  Ids are `[B, T]` (SD/LDM) or `[B, 2, 77]` (SDXL: each tokenizer's); the dict
  holds `learned`/`placeholder_ids` (a tuple, one entry per text encoder) and for
  SDXL `zero_uncond` (an empty negative prompt with the model's
  `force_zeros_for_empty_prompt`, which diffusers' SDXL pipeline defaults to True).
  Arguments as `ImageGenerator.generate`'s.
  """
  encoders = sd.text_encoders
  tokenizers = tuple(tokenizers or (e.tokenizer for e in encoders))
  if learned and len(learned) != len(encoders):
    raise ValueError(f"learned vectors for {len(learned)} text encoder(s); the model has "
                     f"{len(encoders)} (each concept needs vectors for every encoder)")
  if len(tokenizers) != len(encoders):
    raise ValueError(f"{len(tokenizers)} tokenizer(s) for {len(encoders)} text encoder(s)")
  arrays = [learned_arrays(learned[e] if learned else None, encoders[e].width, tokenizers[e])
            for e in range(len(encoders))]
  if learned and len({len(ids) for _, ids in arrays}) > 1:
    raise ValueError("each concept needs as many vectors for every text encoder: "
                     + ", ".join(str(len(ids)) for _, ids in arrays))
  extra = {"learned": tuple(v for v, _ in arrays), "placeholder_ids": tuple(i for _, i in arrays)}
  negatives = [negative_prompt] * len(prompts)
  if len(encoders) == 1:
    return (captions.tokenize(tokenizers[0], prompts), captions.tokenize(tokenizers[0], negatives),
            extra)
  every = lambda texts: np.stack([captions.tokenize(t, texts, sdxl.MAX_LENGTH)
                                  for t in tokenizers], axis=1)  # [B, 2, 77]
  zeros = not negative_prompt and bool(sd.model_index.get("force_zeros_for_empty_prompt", True))
  extra["zero_uncond"] = np.asarray(zeros)
  return every(prompts), every(negatives), extra


def device_params(sd, devices, replicated_params: dict | None = None) -> dict:
  """A generation program's frozen params by component role ("unet" or FLUX.1's "transformer",
  "vae", each text encoder's), on every device: `replicated_params` (already replicated, e.g.
  the training step's) as given, the pieces it lacks replicated here."""
  denoiser = ({"transformer": sd.transformer_params} if sd.is_flux
              else {"unet": sd.unet_params})
  own = {**denoiser, "vae": sd.vae_params, **{e.role: e.params for e in sd.text_encoders}}
  shared = dict(replicated_params or {})
  return dict(shared, **parallel.replicate(
      {k: v for k, v in own.items() if k not in shared}, devices))


def device_padded(prompts: Sequence[str], devices) -> list[str]:
  """`prompts` padded with the last one to a multiple of the devices (one program call
  gives every device the same number of rows)."""
  d = len(devices)
  return list(prompts) + [prompts[-1]] * (-(-len(prompts) // d) * d - len(prompts))


def run_program(fn, arrays, per_row: tuple, devices, first_index: int, n: int,
                seed: int) -> np.ndarray:
  """Runs a pmapped generation program `fn(arrays, *per_row, index, seeds)` on `per_row`
  (host arrays with one row per padded prompt: `device_padded`): each process feeds its own
  devices' rows (all rows with one process), image i starts from (seed, first_index + i).
  Returns the first `n` images, uint8 `[n, H, W, 3]`, on every process."""
  padded, d = len(per_row[0]), len(devices)
  index = np.arange(first_index, first_index + padded, dtype=np.int32)
  local = len(parallel.addressable(devices))
  rows = slice(jax.process_index() * local * (padded // d),
               (jax.process_index() + 1) * local * (padded // d))
  seeds = np.full((local,), seed, np.uint32)
  images = fn(arrays, *parallel.shard(tuple(x[rows] for x in per_row) + (index[rows],), local),
              seeds)
  images = parallel.allgather(parallel.unshard(images))[:n]
  return np.round(images * 255.0).astype(np.uint8)


@functools.lru_cache(maxsize=16)
def _generate_program(settings: _GenSettings, devices: tuple):
  """The pmapped guided loop of `settings` (the sampler travels in its arrays): memoized, so
  generators of the same settings (validation at every run of a process, sample after
  sample) share one traced program."""
  return parallel.pmapped(functools.partial(_generate_shard, settings=settings), devices)


class ImageGenerator:
  """Generates images for prompts that may use learned pseudo-words, over several devices.

  Learned vectors come per text encoder, as tuples indexed like `sd.text_encoders`:
  `learned[e]` is (the concepts' vectors `[m, D_e]`, their ids `[m]` in
  `tokenizers[e]`), the same concepts in the same order for every encoder
  (`concepts.tokenizers_with_concepts` returns both).
  """

  def __init__(self, sd, *, scheduler: str = "ddim", num_inference_steps: int = 50,
               guidance_scale: float = 7.5, height: int = 512, width: int = 512,
               devices: Sequence | None = None, replicated_params: dict | None = None,
               guidance_rescale: float = 0.0):
    """`replicated_params`: already replicated params to share (e.g. the training step's),
    keyed by component role ("unet", "text_encoder", ...), instead of placing another
    copy on every device; a piece it lacks (SDXL's "text_encoder_2") is replicated here.

    `guidance_rescale` (Lin et al. 2023; diffusers' name): 0 is off, the images of
    plain classifier-free guidance.
    """
    factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(sd.unet.config.block_out_channels) - 1)
    if height % (factor * unet_factor) or width % (factor * unet_factor):
      raise ValueError(f"height and width must be multiples of {factor * unet_factor}, "
                       f"got {height}x{width}")
    if not 0.0 <= guidance_rescale <= 1.0:
      raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    self.sd = sd
    self.is_sdxl = len(sd.text_encoders) > 1
    self.image_size = (height, width)
    self.devices = list(devices) if devices is not None else parallel.all_devices()
    self.sampler = schedulers.make_sampler(scheduler, sd.scheduler_config, num_inference_steps)
    self.settings = _GenSettings(
        unet=sd.unet, vae=sd.vae,
        guidance_scale=float(guidance_scale),
        latent_shape=(height // factor, width // factor, sd.unet.config.in_channels),
        scaling_factor=float(sd.vae.config.scaling_factor),
        shift_factor=float(sd.vae.config.shift_factor),
        guidance_rescale=float(guidance_rescale), **text_settings(sd, height, width))
    self._params = device_params(sd, self.devices, replicated_params)
    self._fn = _generate_program(self.settings, tuple(self.devices))

  def generate(self, prompts: Sequence[str], *, seed: int = 0, negative_prompt: str = "",
               learned: Sequence[tuple[np.ndarray, Sequence[int]]] = (),
               first_index: int = 0, tokenizers: Sequence | None = None) -> np.ndarray:
    """Images for `prompts`, uint8 `[N, H, W, 3]`.

    Args:
      prompts: one prompt per image.
      seed: image i starts from noise drawn with (seed, first_index + i).
      negative_prompt: the unconditional prompt of classifier-free guidance. SDXL
        with an empty one and the model's `force_zeros_for_empty_prompt` (SDXL
        base sets it) guides from zeros instead, as diffusers' pipeline does.
      learned: per text encoder, (vectors `[m, D_e]`, token ids `[m]`) of all learned
        concepts; empty: none.
      first_index: global index of the first image (for batches of a longer run).
      tokenizers: per text encoder, the tokenizer that holds the learned tokens
        (`concepts.tokenizers_with_concepts`), so one generator can serve several
        runs on the same base model; default: the model's own.

    Raises:
      ValueError: a learned token id a tokenizer does not have, or concepts without
        vectors for every text encoder.
    """
    texts = device_padded(prompts, self.devices)
    cond, uncond, extra = prompt_arrays(self.sd, texts, negative_prompt, learned=learned,
                                        tokenizers=tokenizers)
    extra["sampler"] = self.sampler
    arrays = self._arrays(parallel.replicate(extra, self.devices))
    return run_program(self._fn, arrays, (cond, uncond), self.devices, first_index,
                       len(prompts), seed)

  def lower(self, per_device_batch: int, num_learned: int = 1) -> jax.stages.Lowered:
    """The generation program lowered for the generator's devices, without running it.

    For ahead-of-time compilation and memory analysis (benchmarks/aot_compile.py
    lowers it for TPU topologies and GPUs it does not have). The program's arguments are
    those `generate` passes, as shapes: `per_device_batch` prompts of the text
    encoder's context length per device (both tokenizers' for SDXL) and
    `num_learned` learned vectors (per encoder). The generator's weights may be
    `jax.ShapeDtypeStruct`s.
    """
    sds = jax.ShapeDtypeStruct
    abstract = lambda tree: jax.tree_util.tree_map(lambda x: sds(np.shape(x), x.dtype), tree)
    n = len(self.devices)
    encoders = self.sd.text_encoders
    extra = {"learned": tuple(sds((num_learned, e.width), jnp.float32) for e in encoders),
             "placeholder_ids": tuple(sds((num_learned,), jnp.int32) for _ in encoders),
             "sampler": abstract(self.sampler)}
    length = encoders[0].module.config.max_position_embeddings
    ids = sds((n * per_device_batch, length), jnp.int32)
    if self.is_sdxl:
      extra["zero_uncond"] = sds((), jnp.bool_)
      ids = sds((n * per_device_batch, len(encoders), sdxl.MAX_LENGTH), jnp.int32)
    arrays = abstract(self._arrays(parallel.replicate(extra, self.devices)))
    cond, uncond, index = parallel.shard((ids, ids, sds((n * per_device_batch,), jnp.int32)), n)
    return self._fn.lower(arrays, cond, uncond, index, sds((n,), np.uint32))

  def _arrays(self, extra: dict) -> _GenArrays:
    """The program's arrays: the replicated weights and `extra` (replicated learned, ids, sampler)."""
    return _GenArrays(unet=self._params["unet"], vae=self._params["vae"],
                      text_encoders=tuple(self._params[e.role] for e in self.sd.text_encoders),
                      **extra)


# Per-device batch when sampling without a requested one. On CPU there is no device
# memory to size against (host RAM is far larger than a batch needs); the cap keeps
# one call's latency and host memory modest. It is a chosen value: batch 4 was
# measured at 1.54x diffusers' images/s (benchmarks/RESULTS.md), other batches
# were not compared (`benchmarks/sample.py --batch_size N` does).
CPU_AUTO_BATCH = 4
# On GPU/TPU, the share of the device memory left after the weights that generated
# images may take, and the most images per device per call.
_MEMORY_SHARE = 0.5
_MAX_AUTO_BATCH = 16


def image_bytes(sd, height: int, width: int) -> int:
  """A generous estimate of one image's activation memory in the generation program.

  The VAE decoder at full resolution dominates: its top blocks hold a few
  float32 `[H, W, C0]` tensors at once (C0 = its first width, 128 in SD). Eight
  of them bound the resnet/upsample working set; the UNet's latent-resolution
  activations (two rows per image with guidance) are far smaller.
  """
  top = int(sd.vae.config.block_out_channels[0])
  return 8 * height * width * top * 4


def auto_batch_size(generator: "ImageGenerator", num_images: int) -> int:
  """Images per device per call for `num_images` images when none is requested.

  Enough to cover `num_images` over all devices in one call, capped by device
  memory where the device reports it (`memory_stats()["bytes_limit"]`, minus
  the replicated weights, `_MEMORY_SHARE` of the rest over `image_bytes`) and
  by `CPU_AUTO_BATCH` on CPU. The result depends only on the device kind and
  the model, so every process of a multi-host run picks the same batch.
  """
  needed = -(-num_images // len(generator.devices))
  device = generator.devices[0]
  if device.platform == "cpu":
    return max(1, min(needed, CPU_AUTO_BATCH))
  try:
    limit = int((device.memory_stats() or {}).get("bytes_limit", 0))
  except Exception:  # pylint: disable=broad-except  # backends without memory stats
    limit = 0
  if not limit:
    return max(1, min(needed, CPU_AUTO_BATCH))
  weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(
      (generator.sd.unet_params, generator.sd.transformer_params, generator.sd.vae_params,
       [e.params for e in generator.sd.text_encoders])))
  h, w = generator.image_size
  fit = int(_MEMORY_SHARE * max(limit - weights, 0) // image_bytes(generator.sd, h, w))
  return max(1, min(needed, fit, _MAX_AUTO_BATCH))


def image_batches(generator: ImageGenerator, prompt: str, num_images: int, *,
                  batch_size: int = 0, seed: int = 0, negative_prompt: str = "",
                  learned=(), tokenizers=None) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (index of the first image, uint8 `[n, H, W, 3]`) per call, `batch_size` images
  per device per call (0: `auto_batch_size`). `learned` and `tokenizers` (one entry per
  text encoder) are `ImageGenerator.generate`'s.

  Image i starts from noise (seed, i), so the images do not depend on the
  batch size or device count; a caller can write each batch before the next
  one is generated, so nothing grows with `num_images`.
  """
  batch_size = batch_size or auto_batch_size(generator, num_images)
  chunk = batch_size * len(generator.devices)
  for start in range(0, num_images, chunk):
    count = min(chunk, num_images - start)
    # Always `chunk` prompts: one compiled program for every call, the last one included.
    yield start, generator.generate([prompt] * chunk, seed=seed, negative_prompt=negative_prompt,
                                    learned=learned, first_index=start,
                                    tokenizers=tokenizers)[:count]


def generate_images(generator: ImageGenerator, prompt: str, num_images: int, *,
                    batch_size: int = 0, seed: int = 0, negative_prompt: str = "",
                    learned=(), tokenizers=None, progress=None) -> np.ndarray:
  """`num_images` images `[N, H, W, 3]` uint8 of one prompt, `batch_size` per device per call
  (0: `auto_batch_size`).

  Image i starts from noise (seed, i), so the result does not depend on the
  batch size or device count. `progress(count)` is called after each call.
  """
  images = []
  for _, batch in image_batches(generator, prompt, num_images, batch_size=batch_size, seed=seed,
                                negative_prompt=negative_prompt, learned=learned,
                                tokenizers=tokenizers):
    images.append(batch)
    if progress:
      progress(len(batch))
  return np.concatenate(images)


def make_output_dir(out_dir: str, error: type) -> None:
  """Creates `out_dir` on process 0; if it cannot, every process raises `error` (none waits)."""
  failure = None
  if jax.process_index() == 0:
    try:
      fileio.makedirs(out_dir)
    except OSError as e:
      failure = error(f"cannot write to --output_dir {out_dir}: {e.strerror or e}")
  if parallel.any_process(failure is not None):
    raise failure or error("process 0 cannot write the output folder")


def image_text(*, prompt: str, negative_prompt: str, seed: int, index: int, steps: int,
               scheduler: str, guidance_scale: float, model: str, concepts,
               checkpoint_step, guidance_rescale: float = 0.0) -> dict[str, str]:
  """The PNG text chunk of a generated image: everything needed to make it again."""
  return {"prompt": prompt, "negative_prompt": negative_prompt, "seed": str(seed),
          "image_index": str(index), "steps": str(steps), "scheduler": scheduler,
          "guidance_scale": str(guidance_scale), "guidance_rescale": str(guidance_rescale),
          "model": model,
          "learned_tokens": ",".join(c.token for c in concepts),
          "checkpoint_step": str(checkpoint_step)}


def save_png(path: str, image: np.ndarray, text: dict[str, str] | None = None) -> None:
  """Writes a uint8 `[H, W, 3]` image as PNG with `text` in tEXt chunks."""
  info = PngImagePlugin.PngInfo()
  for k, v in (text or {}).items():
    info.add_text(k, str(v))
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
  fileio.write_bytes(path, buffer.getvalue())  # local or gs://


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
  """Tiles `[N, H, W, 3]` images into one `[rows*H, cols*W, 3]` image."""
  n, h, w, c = images.shape
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = -(-n // cols)
  grid = np.zeros((rows * h, cols * w, c), images.dtype)
  for i, image in enumerate(images):
    r, k = divmod(i, cols)
    grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = image
  return grid


def slug(text: str) -> str:
  """`text` as a file-name part: runs of other characters than [A-Za-z0-9] become "_", 60 at most."""
  return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "prompt"
