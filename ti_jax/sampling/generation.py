"""Text-to-image generation with learned pseudo-words: a jit-compiled, pmapped denoising loop.

Classifier-free guidance runs the conditional and unconditional halves in one
batched UNet call; the loop is a `lax.fori_loop`, so a whole image is one
compiled program. Each image's starting noise is a function of (seed, image
index) alone, so the images do not depend on how many devices share the work.
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
from ti_jax.runtime import fileio, parallel
from ti_jax.sampling import schedulers


@flax.struct.dataclass
class _GenArrays:
  """Arrays the generation program reads (replicated over devices)."""
  unet: Any
  text_encoder: Any
  vae: Any
  learned: jax.Array  # [m, D] vectors of all learned tokens
  placeholder_ids: jax.Array  # [m] their token ids
  sampler: schedulers.Sampler


@dataclasses.dataclass(frozen=True)
class _GenSettings:
  unet: Any
  text_encoder: Any
  vae: Any
  guidance_scale: float
  latent_shape: tuple[int, int, int]  # (h, w, C)
  scaling_factor: float
  shift_factor: float


# The three pieces of every guided denoising program (this sampler's and ti_jax.edit's).
# `settings` holds the modules and scalars, `arrays` the params and learned vectors; any pair
# with those fields works (`_GenSettings`/`_GenArrays` here, their editing counterparts).


def encode_prompts(settings, arrays, ids: jax.Array) -> jax.Array:
  """Text-encoder states `[b, T, D]` of token ids `[b, T]`, the learned vectors spliced in."""
  table = token_table(settings.text_encoder, arrays.text_encoder)  # [V, D]
  embeds = embed_tokens(table, arrays.learned, arrays.placeholder_ids, ids)
  return settings.text_encoder.apply({"params": arrays.text_encoder}, ids, inputs_embeds=embeds)


def guided_output(settings, arrays, sampler: schedulers.Sampler, x: jax.Array, i: jax.Array,
                  context: jax.Array) -> jax.Array:
  """The UNet's float32 output for latents `x` `[b, h, w, C]` at sampler step `i`.

  With classifier-free guidance (`settings.guidance_scale != 1`) `context` is `[2b, T, D]`,
  the unconditional half first; otherwise `[b, T, D]`.
  """
  guided = settings.guidance_scale != 1.0
  x_in = sampler.scale_model_input(x, i)
  if guided:
    x_in = jnp.concatenate([x_in, x_in])
  t = jnp.broadcast_to(sampler.timesteps[i], (x_in.shape[0],))
  out = settings.unet.apply({"params": arrays.unet}, x_in, t, context).astype(jnp.float32)
  if guided:
    uncond, cond = jnp.split(out, 2)
    out = uncond + settings.guidance_scale * (cond - uncond)
  return out


def decode_latents(settings, arrays, latents: jax.Array) -> jax.Array:
  """Images `[b, H, W, 3]` in [0, 1] from scaled latents `[b, h, w, C]`."""
  z = latents / settings.scaling_factor + settings.shift_factor
  images = settings.vae.apply({"params": arrays.vae}, z, method=settings.vae.decode)
  return jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def _generate_shard(arrays: _GenArrays, cond_ids: jax.Array, uncond_ids: jax.Array,
                    image_index: jax.Array, seed: jax.Array, *,
                    settings: _GenSettings) -> jax.Array:
  """Images `[b, H, W, 3]` in [0, 1] for this device's prompts (`[b, T]` token ids)."""
  sampler = arrays.sampler
  guided = settings.guidance_scale != 1.0
  context = encode_prompts(settings, arrays, cond_ids)  # [b, T, D]
  if guided:
    context = jnp.concatenate([encode_prompts(settings, arrays, uncond_ids), context])  # [2b, T, D]
  key = jax.random.key(seed)
  latents = jax.vmap(lambda g: jax.random.normal(jax.random.fold_in(key, g),
                                                 settings.latent_shape))(image_index)
  latents = latents * sampler.init_noise_sigma  # [b, h, w, C]

  def body(i, carry):
    x, state = carry
    return sampler.step(state, guided_output(settings, arrays, sampler, x, i, context), i, x)

  latents, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (latents, sampler.init_state(latents)))
  return decode_latents(settings, arrays, latents)


class ImageGenerator:
  """Generates images for prompts that may use learned pseudo-words, over several devices."""

  def __init__(self, sd, *, scheduler: str = "ddim", num_inference_steps: int = 50,
               guidance_scale: float = 7.5, height: int = 512, width: int = 512,
               devices: Sequence | None = None, replicated_params: dict | None = None):
    """`replicated_params`: already replicated {"unet", "text_encoder"} params to share
    (e.g. the training step's), instead of placing another copy on every device."""
    factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(sd.unet.config.block_out_channels) - 1)
    if height % (factor * unet_factor) or width % (factor * unet_factor):
      raise ValueError(f"height and width must be multiples of {factor * unet_factor}, "
                       f"got {height}x{width}")
    self.sd = sd
    self.image_size = (height, width)
    self.devices = list(devices) if devices is not None else parallel.all_devices()
    self.sampler = schedulers.make_sampler(scheduler, sd.scheduler_config, num_inference_steps)
    self.settings = _GenSettings(
        unet=sd.unet, text_encoder=sd.text_encoder, vae=sd.vae,
        guidance_scale=float(guidance_scale),
        latent_shape=(height // factor, width // factor, sd.unet.config.in_channels),
        scaling_factor=float(sd.vae.config.scaling_factor),
        shift_factor=float(sd.vae.config.shift_factor))
    if replicated_params is None:
      replicated_params = parallel.replicate(
          {"unet": sd.unet_params, "text_encoder": sd.text_encoder_params}, self.devices)
    self._params = dict(replicated_params,
                        vae=parallel.replicate(sd.vae_params, self.devices))
    self._fn = parallel.pmapped(functools.partial(_generate_shard, settings=self.settings),
                                self.devices)

  def generate(self, prompts: Sequence[str], *, seed: int = 0, negative_prompt: str = "",
               learned: Sequence[tuple[np.ndarray, Sequence[int]]] = (),
               first_index: int = 0, tokenizer=None) -> np.ndarray:
    """Images for `prompts`, uint8 `[N, H, W, 3]`.

    Args:
      prompts: one prompt per image.
      seed: image i starts from noise drawn with (seed, first_index + i).
      negative_prompt: the unconditional prompt of classifier-free guidance.
      learned: (vectors `[n, D]`, token ids `[n]`) of each learned concept.
      first_index: global index of the first image (for batches of a longer run).
      tokenizer: the tokenizer that holds the learned tokens
        (`concepts.tokenizer_with_concepts`), so one generator can serve several
        runs on the same base model; default: the model's own.

    Raises:
      ValueError: a learned token id the tokenizer does not have.
    """
    n = len(prompts)
    d = len(self.devices)
    padded = -(-n // d) * d
    tokenizer = tokenizer or self.sd.tokenizer
    vectors, ids = self._learned_arrays(learned)
    if ids.max() >= len(tokenizer):  # the ids were added to another tokenizer
      raise ValueError(f"learned token id {int(ids.max())} is not in the tokenizer "
                       f"({len(tokenizer)} tokens): pass the tokenizer that "
                       "concepts.tokenizer_with_concepts returned with these ids")
    cond = captions.tokenize(tokenizer, list(prompts) + [prompts[-1]] * (padded - n))
    uncond = captions.tokenize(tokenizer, [negative_prompt] * padded)
    index = np.arange(first_index, first_index + padded, dtype=np.int32)
    arrays = self._arrays(parallel.replicate(
        {"learned": vectors, "placeholder_ids": ids, "sampler": self.sampler}, self.devices))
    # Each process feeds its own devices' rows (all rows with one process).
    local = len(parallel.addressable(self.devices))
    rows = slice(jax.process_index() * local * (padded // d),
                 (jax.process_index() + 1) * local * (padded // d))
    seeds = np.full((local,), seed, np.uint32)
    images = self._fn(arrays, *parallel.shard((cond[rows], uncond[rows], index[rows]), local),
                      seeds)
    images = parallel.allgather(parallel.unshard(images))[:n]
    return np.round(images * 255.0).astype(np.uint8)

  def lower(self, per_device_batch: int, num_learned: int = 1) -> jax.stages.Lowered:
    """The generation program lowered for the generator's devices, without running it.

    For ahead-of-time compilation and memory analysis (benchmarks/tpu_compile.py
    lowers it for TPU topologies it does not have). The program's arguments are
    those `generate` passes, as shapes: `per_device_batch` prompts of the text
    encoder's context length per device and `num_learned` learned vectors.
    The generator's weights may be `jax.ShapeDtypeStruct`s.
    """
    sds = jax.ShapeDtypeStruct
    abstract = lambda tree: jax.tree_util.tree_map(lambda x: sds(np.shape(x), x.dtype), tree)
    n = len(self.devices)
    config = self.sd.text_encoder.config
    extra = parallel.replicate({"learned": sds((num_learned, config.hidden_size), jnp.float32),
                                "placeholder_ids": sds((num_learned,), jnp.int32),
                                "sampler": abstract(self.sampler)}, self.devices)
    arrays = abstract(self._arrays(extra))
    ids = sds((n * per_device_batch, config.max_position_embeddings), jnp.int32)
    cond, uncond, index = parallel.shard((ids, ids, sds((n * per_device_batch,), jnp.int32)), n)
    return self._fn.lower(arrays, cond, uncond, index, sds((n,), np.uint32))

  def _learned_arrays(self, learned) -> tuple[np.ndarray, np.ndarray]:
    """All concepts' vectors `[m, D]` and their token ids `[m]`, as the program reads them."""
    dim = self.sd.text_encoder.config.hidden_size
    if not learned:  # an id that never occurs, so nothing is spliced
      return np.zeros((1, dim), np.float32), np.full((1,), -1, np.int32)
    vectors = np.concatenate([np.asarray(v, np.float32).reshape(-1, dim) for v, _ in learned])
    ids = np.concatenate([np.asarray(i, np.int32).reshape(-1) for _, i in learned])
    return vectors, ids

  def _arrays(self, extra: dict) -> _GenArrays:
    """The program's arrays: the replicated weights and `extra` (replicated learned, ids, sampler)."""
    return _GenArrays(unet=self._params["unet"], text_encoder=self._params["text_encoder"],
                      vae=self._params["vae"], **extra)


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
      (generator.sd.unet_params, generator.sd.text_encoder_params, generator.sd.vae_params)))
  h, w = generator.image_size
  fit = int(_MEMORY_SHARE * max(limit - weights, 0) // image_bytes(generator.sd, h, w))
  return max(1, min(needed, fit, _MAX_AUTO_BATCH))


def image_batches(generator: ImageGenerator, prompt: str, num_images: int, *,
                  batch_size: int = 0, seed: int = 0, negative_prompt: str = "",
                  learned=(), tokenizer=None) -> Iterator[tuple[int, np.ndarray]]:
  """Yields (index of the first image, uint8 `[n, H, W, 3]`) per call, `batch_size` images
  per device per call (0: `auto_batch_size`).

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
                                    tokenizer=tokenizer)[:count]


def generate_images(generator: ImageGenerator, prompt: str, num_images: int, *,
                    batch_size: int = 0, seed: int = 0, negative_prompt: str = "",
                    learned=(), tokenizer=None, progress=None) -> np.ndarray:
  """`num_images` images `[N, H, W, 3]` uint8 of one prompt, `batch_size` per device per call
  (0: `auto_batch_size`).

  Image i starts from noise (seed, i), so the result does not depend on the
  batch size or device count. `progress(count)` is called after each call.
  """
  images = []
  for _, batch in image_batches(generator, prompt, num_images, batch_size=batch_size, seed=seed,
                                negative_prompt=negative_prompt, learned=learned,
                                tokenizer=tokenizer):
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
               checkpoint_step) -> dict[str, str]:
  """The PNG text chunk of a generated image: everything needed to make it again."""
  return {"prompt": prompt, "negative_prompt": negative_prompt, "seed": str(seed),
          "image_index": str(index), "steps": str(steps), "scheduler": scheduler,
          "guidance_scale": str(guidance_scale), "model": model,
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
