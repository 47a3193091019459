"""FLUX.1 text-to-image generation: one jit-compiled, pmapped flow-matching program.

The image `FluxPipeline` makes, as one compiled program over the devices (the SD/SDXL
program is `generation`'s; this module reuses its helpers):

* the prompt through both text encoders: CLIP-L's `pooler_output` (its tokenizer's ids
  padded to its 77) and T5's last hidden state (its ids padded to `max_sequence_length`,
  512 for dev and 256 for schnell; no attention mask, as the pipeline passes none);
* the starting noise `[b, h, w, 16]` of (seed, image index), packed to `[b, h/2 * w/2, 64]`
  tokens with their `latent_image_ids`, the text's `text_ids` zeros;
* the Euler loop (`lax.fori_loop`) of `flow_match.FlowSampler` (dynamic shifting by the
  image sequence length where the scheduler config says so: dev; a static shift:
  schnell), the transformer fed `sampler.transformer_timestep` and, for a
  guidance-distilled model (dev, `guidance_embeds`), the guidance value (default 3.5). No
  classifier-free guidance: one transformer call per step, no negative prompt;
* unpacked, `denormalize_latents`, decoded by the 16-channel VAE, to [0, 1] and uint8 as
  diffusers' image processor does.

The frozen weights are arguments of the program (replicated once), never closed over. The
prompt encoding (`encode_flux_prompts`) splices learned vectors per text encoder as
`generation.encode_prompts` does; with none (ids -1) the token lookups are the models'
own, so learned Flux concepts need only their vectors and ids passed in.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ti_jax.data import captions
from ti_jax.embeddings.pseudo_words import embed_tokens, token_table
from ti_jax.models import flux
from ti_jax.runtime import parallel
from ti_jax.sampling import flow_match, generation

# FluxPipeline's `max_sequence_length` for T5: its default 512 (FLUX.1-dev's) and the 256
# that FLUX.1-schnell is used with (a model without the guidance embedding).
DEV_MAX_SEQUENCE_LENGTH = 512
SCHNELL_MAX_SEQUENCE_LENGTH = 256
# FluxPipeline's `default_sample_size`: the native image side is this times the VAE factor.
DEFAULT_SAMPLE_SIZE = 128
# The sampler's name in PNG text chunks (FLUX.1 has one sampler).
SAMPLER_NAME = "flow_euler"


@flax.struct.dataclass
class _FluxArrays:
  """Arrays the program reads (replicated over devices). `text_encoders`, `learned` and
  `placeholder_ids` hold one entry per text encoder (CLIP-L, then T5)."""
  transformer: Any
  text_encoders: tuple[Any, ...]  # each encoder's params
  vae: Any
  learned: tuple[jax.Array, ...]  # per encoder: [m, D_e] vectors of all learned tokens
  placeholder_ids: tuple[jax.Array, ...]  # per encoder: [m] their ids (-1: none)
  sampler: flow_match.FlowSampler


@dataclasses.dataclass(frozen=True)
class _FluxSettings:
  """The program's modules and scalars (hashable: it keys the memoized program)."""
  transformer: Any
  text_encoders: tuple[Any, ...]  # each encoder's module: CLIP-L, T5
  vae: Any
  latent_shape: tuple[int, int, int]  # (h, w, C) of the VAE latents, h and w even
  scaling_factor: float
  shift_factor: float
  guidance: float | None  # the guidance embedding's value (dev); None: schnell


def default_max_sequence_length(sd) -> int:
  """T5's padded length FluxPipeline is used with: 512 for a guidance-distilled model
  (dev), 256 without the guidance embedding (schnell)."""
  if sd.transformer.config.guidance_embeds:
    return DEV_MAX_SEQUENCE_LENGTH
  return SCHNELL_MAX_SEQUENCE_LENGTH


def vae_scale_factor(sd) -> int:
  """Pixels per latent: 2 ** (VAE levels - 1), FluxPipeline's `vae_scale_factor` (8)."""
  return 2 ** (len(sd.vae.config.block_out_channels) - 1)


def native_size(sd) -> int:
  """FluxPipeline's default image side: `default_sample_size` x the VAE factor (1024)."""
  return DEFAULT_SAMPLE_SIZE * vae_scale_factor(sd)


def encode_flux_prompts(settings: _FluxSettings, arrays: _FluxArrays, clip_ids: jax.Array,
                        t5_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """What the transformer reads for the prompts' ids: (T5 states `[b, L, D_t5]`, CLIP-L's
  pooled output `[b, D_clip]`).

  Each encoder's learned vectors (`arrays.learned[e]` at `arrays.placeholder_ids[e]`) are
  spliced into its token embeddings, as `generation.encode_prompts` does for SD. CLIP-L is
  pooled where transformers pools it (its config's `eos_token_id` rule), as FluxPipeline
  reads `pooler_output`; T5 gets no attention mask.
  """
  per_encoder = (clip_ids, t5_ids)
  embeds = tuple(  # [b, T_e, D_e] per encoder, the learned vectors spliced in
      embed_tokens(token_table(module, params), learned, placeholder_ids, ids)
      for module, params, learned, placeholder_ids, ids in zip(
          settings.text_encoders, arrays.text_encoders, arrays.learned, arrays.placeholder_ids,
          per_encoder))
  (clip, t5), (clip_params, t5_params) = settings.text_encoders, arrays.text_encoders
  pooled = clip.apply({"params": clip_params}, clip_ids, inputs_embeds=embeds[0],
                      all_outputs=True)["pooler_output"]
  states = t5.apply({"params": t5_params}, t5_ids, inputs_embeds=embeds[1])
  return states, pooled


def starting_noise(seed: jax.Array | int, image_index: jax.Array,
                   latent_shape: tuple[int, int, int]) -> jax.Array:
  """Float32 noise `[b, h, w, C]`: image g's is drawn with (seed, g) alone, as in
  `generation`, so images do not depend on the batch layout or device count."""
  key = jax.random.key(seed)
  return jax.vmap(lambda g: jax.random.normal(jax.random.fold_in(key, g), latent_shape))(
      image_index)


def _flux_shard(arrays: _FluxArrays, clip_ids: jax.Array, t5_ids: jax.Array,
                image_index: jax.Array, seed: jax.Array, *,
                settings: _FluxSettings) -> jax.Array:
  """Images `[b, H, W, 3]` in [0, 1] for this device's prompts (ids `[b, 77]`, `[b, L]`)."""
  sampler = arrays.sampler
  states, pooled = encode_flux_prompts(settings, arrays, clip_ids, t5_ids)
  h, w, _ = settings.latent_shape
  dtype = settings.transformer.dtype  # FluxPipeline keeps the latents in the model's dtype
  noise = starting_noise(seed, image_index, settings.latent_shape)
  x = flux.pack_latents(noise).astype(dtype)  # [b, h/2 * w/2, 4C]
  img_ids = flux.latent_image_ids(h // 2, w // 2)
  txt_ids = flux.text_ids(t5_ids.shape[1])
  guidance = (None if settings.guidance is None
              else jnp.full((x.shape[0],), settings.guidance, jnp.float32))

  def body(i, x):
    v = settings.transformer.apply(
        {"params": arrays.transformer}, x, states, pooled, sampler.transformer_timestep(i, dtype),
        img_ids, txt_ids, guidance)
    return sampler.step({}, v, i, x)[0]

  x = jax.lax.fori_loop(0, sampler.num_steps, body, x)
  latents = flux.unpack_latents(x, h, w).astype(jnp.float32)  # [b, h, w, C]
  # generation.decode_latents: latents / scaling + shift (flow_match.denormalize_latents),
  # the VAE decode, then (x + 1) / 2 clipped to [0, 1].
  return generation.decode_latents(settings, arrays, latents)


@functools.lru_cache(maxsize=8)
def _flux_program(settings: _FluxSettings, devices: tuple):
  """The pmapped program of `settings` (the sampler travels in its arrays), memoized as
  `generation._generate_program` is."""
  return parallel.pmapped(functools.partial(_flux_shard, settings=settings), devices)


def flux_prompt_arrays(sd, prompts: Sequence[str], max_sequence_length: int, *, learned=(),
                       tokenizers=None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """Host arrays of the program's text side: (CLIP ids `[B, 77]`, T5 ids `[B, L]`, learned).

  Each tokenizer pads and truncates as FluxPipeline's `encode_prompt` does (CLIP to its
  `model_max_length`, T5 to `max_sequence_length`). `learned` and `tokenizers` are per
  text encoder as in `generation.prompt_arrays`; the dict holds `learned` and
  `placeholder_ids` (a tuple, one entry per encoder).
  """
  encoders = sd.text_encoders
  tokenizers = tuple(tokenizers or (e.tokenizer for e in encoders))
  if learned and len(learned) != len(encoders):
    raise ValueError(f"learned vectors for {len(learned)} text encoder(s); the model has "
                     f"{len(encoders)} (each concept needs vectors for every encoder)")
  arrays = [generation.learned_arrays(learned[e] if learned else None, encoders[e].width,
                                      tokenizers[e]) for e in range(len(encoders))]
  extra = {"learned": tuple(v for v, _ in arrays), "placeholder_ids": tuple(i for _, i in arrays)}
  return (captions.tokenize(tokenizers[0], prompts),
          captions.tokenize(tokenizers[1], prompts, max_sequence_length), extra)


class FluxImageGenerator:
  """Generates FLUX.1 images for prompts over several devices; the interface of
  `generation.ImageGenerator` (so `generation.image_batches` drives it), less classifier-free
  guidance: `negative_prompt` must be empty."""

  def __init__(self, sd, *, num_inference_steps: int = 28,
               guidance_scale: float = flow_match.DEFAULT_GUIDANCE_SCALE, height: int = 1024,
               width: int = 1024, devices: Sequence | None = None,
               replicated_params: dict | None = None, max_sequence_length: int | None = None):
    """`guidance_scale`: the guidance embedding's value (dev; ignored by a model without
    one, schnell). `max_sequence_length`: T5's padded length (None: 512 for dev, 256 for
    schnell). `replicated_params`: already replicated params keyed by component role, as
    for `ImageGenerator`.

    Raises:
      ValueError: a size that is not a multiple of 16 px (2x2 packed latents), a bad
        step count or a scheduler config value `flow_match` does not implement.
    """
    if not sd.is_flux:
      raise ValueError("FluxImageGenerator needs a FLUX.1 model (generation.ImageGenerator "
                       "samples the others)")
    factor = vae_scale_factor(sd)
    if height % (2 * factor) or width % (2 * factor):
      raise ValueError(f"height and width must be multiples of {2 * factor}, got {height}x{width}")
    self.sd = sd
    self.image_size = (height, width)
    self.devices = list(devices) if devices is not None else parallel.all_devices()
    self.max_sequence_length = int(max_sequence_length or default_max_sequence_length(sd))
    self.sampler = flow_match.make_flow_sampler(
        sd.scheduler_config, num_inference_steps,
        flow_match.image_seq_len(height, width, factor))
    guided = sd.transformer.config.guidance_embeds
    self.settings = _FluxSettings(
        transformer=sd.transformer, text_encoders=tuple(e.module for e in sd.text_encoders),
        vae=sd.vae,
        latent_shape=(height // factor, width // factor, sd.vae.config.latent_channels),
        scaling_factor=float(sd.vae.config.scaling_factor),
        shift_factor=float(sd.vae.config.shift_factor),
        guidance=float(guidance_scale) if guided else None)
    self._params = generation.device_params(sd, self.devices, replicated_params)
    self._fn = _flux_program(self.settings, tuple(self.devices))

  def generate(self, prompts: Sequence[str], *, seed: int = 0, negative_prompt: str = "",
               learned: Sequence[tuple[np.ndarray, Sequence[int]]] = (),
               first_index: int = 0, tokenizers: Sequence | None = None) -> np.ndarray:
    """Images for `prompts`, uint8 `[N, H, W, 3]`; arguments as `ImageGenerator.generate`'s.

    Raises:
      ValueError: a negative prompt (FLUX.1 samples without classifier-free guidance), a
        learned token id a tokenizer does not have, or concepts without vectors for both
        text encoders.
    """
    if negative_prompt:
      raise ValueError("FLUX.1 samples without classifier-free guidance: no negative prompt")
    texts = generation.device_padded(prompts, self.devices)
    clip_ids, t5_ids, extra = flux_prompt_arrays(self.sd, texts, self.max_sequence_length,
                                                 learned=learned, tokenizers=tokenizers)
    extra["sampler"] = self.sampler
    arrays = self._arrays(parallel.replicate(extra, self.devices))
    return generation.run_program(self._fn, arrays, (clip_ids, t5_ids), self.devices,
                                  first_index, len(prompts), seed)

  def lower(self, per_device_batch: int, num_learned: int = 1) -> jax.stages.Lowered:
    """The program lowered for the generator's devices without running it, as
    `ImageGenerator.lower` (ahead-of-time compilation, memory analysis): `per_device_batch`
    prompts per device (CLIP ids of its 77, T5 ids of `max_sequence_length`) and
    `num_learned` learned vectors per encoder. The weights may be `jax.ShapeDtypeStruct`s.
    """
    sds = jax.ShapeDtypeStruct
    abstract = lambda tree: jax.tree_util.tree_map(lambda x: sds(np.shape(x), x.dtype), tree)
    n = len(self.devices)
    encoders = self.sd.text_encoders
    extra = {"learned": tuple(sds((num_learned, e.width), jnp.float32) for e in encoders),
             "placeholder_ids": tuple(sds((num_learned,), jnp.int32) for _ in encoders),
             "sampler": abstract(self.sampler)}
    arrays = abstract(self._arrays(parallel.replicate(extra, self.devices)))
    rows = n * per_device_batch
    clip_length = encoders[0].module.config.max_position_embeddings
    inputs = parallel.shard((sds((rows, clip_length), jnp.int32),
                             sds((rows, self.max_sequence_length), jnp.int32),
                             sds((rows,), jnp.int32)), n)
    return self._fn.lower(arrays, *inputs, sds((n,), np.uint32))

  def _arrays(self, extra: dict) -> _FluxArrays:
    """The program's arrays: the replicated weights and `extra` (learned, ids, sampler)."""
    return _FluxArrays(transformer=self._params["transformer"], vae=self._params["vae"],
                       text_encoders=tuple(self._params[e.role] for e in self.sd.text_encoders),
                       **extra)
