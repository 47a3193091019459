"""The run's inputs: images, base model, prompts, the latent cache, and each step's batch.

`trainer.run` calls `build` once (on every process) and gets a `RunInputs`: the
training images (`ti_jax.data.image_loader`, with `enable_bucket` each at its
aspect-ratio bucket), the base model with its training noise schedule, the
prompts (templates or captions, tokenized once), the placeholder per text encoder
(`concept`), every view's cached VAE posterior (one array pair per bucket,
`ti_jax.data.latent_cache`), the batch sizes, optimizer and step-0 state. Each
input is loaded and checked in the order a failure is cheapest to report.
`prepare` is `build` without the latent cache, optimizer and state: what a dry
run (`dry_run`) checks and describes, reading the workdir but never writing it.

During the loop, `batch_for` gives a step's batch (its bucket from `step_bucket`,
its frozen arrays from `frozen_for`), a pure function of (seed, step).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import numpy as np

from ti_jax.data import buckets, captions, choices, image_loader, latent_cache
from ti_jax.embeddings import pseudo_words
from ti_jax.runtime import console, parallel
from ti_jax.sampling import noise_schedule
from ti_jax.training import checkpointing, concept, train_lib, validation
from ti_jax.training.config import DTYPES, MAX_EXAMPLES_PER_STEP, ConfigError
from ti_jax.weights.loading import ModelLoadError, load_stable_diffusion
from ti_jax.weights.pipeline import require_unet

_log = console.log


@dataclasses.dataclass(frozen=True)
class Prompts:
  """The training prompts, the same for every text encoder (each encoder's token ids of
  them are its `concept.EncoderConcept`'s)."""
  tokens: list[str]  # the num_vectors tokens of S*: "<tok>", "<tok>_1", ...
  image_tokens: list[str]  # per-image-token ablation: S_i of each image, else []
  num_templates: int
  # The templates, captions (config.caption_extension) and where they came from.
  texts: captions.PromptTexts
  captioned: np.ndarray | None = None  # [N] bool: the image has a caption; None without any


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
  """Every input of a run that is checked before anything is computed (`prepare`)."""
  sd: Any  # weights.pipeline.StableDiffusion: modules, frozen params, tokenizers
  images: image_loader.TrainingImages
  schedule: noise_schedule.NoiseSchedule
  prompts: Prompts
  # The placeholder in each text encoder (its token ids, token table, initial vectors and
  # prompt ids), in sd.text_encoders' order: one for SD 1.x/2.x and LDM, two for SDXL.
  concepts: tuple[concept.EncoderConcept, ...]
  per_device_batch: int  # examples per device per micro-batch
  global_batch: int  # examples per optimizer step: per device x devices x accumulation
  local_devices: int  # devices of this process
  has_run_json: bool  # the workdir already holds this run


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunInputs(Setup):
  """Everything a run builds before its first step (the same on every process)."""
  # Cached VAE posteriors of each bucket's views (latent_cache): one (mean, std) pair of
  # [V_b, h_b, w_b, C] per bucket of images.buckets; without buckets one pair [V, h, w, C].
  latents: list[tuple[np.ndarray, np.ndarray]]
  base_lr: float
  lr: Any  # optax schedule
  optimizer: Any  # optax.GradientTransformation
  # schedule -> the run's optimizer at that learning-rate schedule (`optimizer` is
  # make_optimizer(lr); the mesh step builds one per concept rate)
  make_optimizer: Any
  state: train_lib.TrainState  # step 0, on the host
  # SDXL only (None otherwise): each bucket's per-view time ids [V_b, 6] (one array per
  # entry of `latents`).
  time_ids: list[np.ndarray] | None = None


def prepare(config, workdir: str, devices: Sequence, model: tuple | None = None,
            has_run_json: bool | None = None) -> Setup:
  """Loads and checks every input of the run but the latent cache, in the order a failure is
  cheapest to report. Reads the workdir's run.json (if any), writes nothing.

  A run of many concepts (`concepts_run`) prepares each concept with the model it loaded
  once (`model`: `load_model`'s pair, its tokenizers then holding every concept's
  placeholder) and the outcome of its own run.json check (`has_run_json`).
  """
  if has_run_json is None:
    has_run_json = checkpointing.check_identity(workdir, checkpointing.run_identity(config))
  images = load_images(config)
  texts = captions.prompt_texts(config.learnable_property, config.templates_file,
                                config.placeholder_token, images.captions, images.num_images)
  sd, schedule = model if model is not None else load_model(config)
  if validation.enabled(config):  # before caching, resume and compiling, not many steps in
    validation.check_scheduler(config, sd)
  prompts = make_prompts(config, texts, images.num_images)
  concepts = concept.concepts(config, sd, texts, prompts.tokens, prompts.image_tokens)
  per_device_batch, global_batch = batch_sizes(config, len(devices))
  return Setup(sd=sd, images=images, schedule=schedule, prompts=prompts, concepts=concepts,
               per_device_batch=per_device_batch, global_batch=global_batch,
               local_devices=len(parallel.addressable(devices)), has_run_json=has_run_json)


def build(config, workdir: str, devices: Sequence, model: tuple | None = None,
          has_run_json: bool | None = None) -> RunInputs:
  """`prepare` (`model`, `has_run_json`: see there), then every view VAE-encoded once, the
  optimizer and the step-0 state."""
  setup = prepare(config, workdir, devices, model, has_run_json)
  latents = _cache_latents(config, setup.sd, setup.images)
  base_lr = config.learning_rate * (setup.global_batch if config.scale_lr else 1)
  lr = train_lib.learning_rate_schedule(base_lr, config.lr_scheduler, config.lr_warmup_steps,
                                        config.max_train_steps)
  make_optimizer = functools.partial(train_lib.make_optimizer, b1=config.adam_beta1,
                                     b2=config.adam_beta2, eps=config.adam_epsilon,
                                     weight_decay=config.adam_weight_decay, name=config.optimizer)
  optimizer = make_optimizer(lr)
  initial = {}
  for c in setup.concepts:
    initial[c.key] = c.init.vectors
    if c.image_token_ids:  # per-image vectors start where S* starts (its first vector)
      initial[c.image_key] = np.repeat(c.init.vectors[:1], len(c.image_token_ids), axis=0)
  state = train_lib.init_state(initial, optimizer)
  return RunInputs(
      **{f.name: getattr(setup, f.name) for f in dataclasses.fields(Setup)},
      latents=latents, base_lr=base_lr, lr=lr, optimizer=optimizer,
      make_optimizer=make_optimizer, state=state,
      time_ids=view_time_ids(setup.images, config.flip_p > 0) if setup.sd.is_sdxl else None)


def load_images(config) -> image_loader.TrainingImages:
  """The concept images at the training resolution (with buckets, each at its bucket); their
  warnings go to stderr."""
  shapes = (buckets.bucket_shapes(config.resolution, config.min_bucket_reso,
                                  config.max_bucket_reso, config.bucket_reso_steps)
            if config.enable_bucket else None)
  try:
    images = image_loader.load_images(config.train_data_dir, config.resolution, config.center_crop,
                                      caption_extension=config.caption_extension,
                                      bucket_shapes=shapes)
  except MemoryError:
    raise ConfigError(f"config.resolution {config.resolution}: not enough host memory to "
                      "hold the training images at that size") from None
  for warning in images.warnings:
    _log(f"warning: {warning}")
  return images


def load_model(config):
  """(the frozen Stable Diffusion, its training noise schedule), checked against the config."""
  dtype = DTYPES[config.dtype]
  sd = load_stable_diffusion(
      config.pretrained_model_name_or_path, dtype=dtype, param_dtype=dtype,
      vae_dtype=DTYPES[config.vae_dtype], variant=config.variant or None,
      revision=config.revision or None, allow_pickle=config.allow_pickle,
      attention_impl=config.attention_impl or None, cache_dir=config.cache_dir,
      remat=config.remat is True, tokenizer=config.tokenizer_name_or_path or None)
  require_unet(sd, "train")
  try:
    schedule = noise_schedule.noise_schedule_from_config(sd.scheduler_config)
  except ValueError as e:
    raise ModelLoadError(f"{sd.path}: scheduler config: {e}") from None
  vae_factor = 2 ** (len(sd.vae.config.block_out_channels) - 1)
  unet_factor = 2 ** (len(sd.unet.config.block_out_channels) - 1)
  latent_size = config.resolution // vae_factor
  if latent_size % unet_factor:
    raise ConfigError(f"config.resolution {config.resolution} gives {latent_size}px latents, "
                      "which the UNet cannot downsample evenly")
  if config.enable_bucket and config.bucket_reso_steps % (vae_factor * unet_factor):
    raise ConfigError(
        f"config.bucket_reso_steps {config.bucket_reso_steps} must be a multiple of "
        f"{vae_factor * unet_factor} for this model (the VAE downsamples {vae_factor}x and the "
        f"UNet {unet_factor}x more), or bucket latents would not pass through the UNet")
  return sd, schedule


def make_prompts(config, texts: captions.PromptTexts, num_images: int) -> Prompts:
  """The placeholder's tokens (with per_image_tokens, also each image's) and the prompts'
  texts; `concept.concepts` tokenizes them with each text encoder's tokenizer."""
  captioned = np.array([c is not None for c in texts.captions], bool)  # [N]
  return Prompts(
      tokens=pseudo_words.placeholder_tokens(config.placeholder_token, config.num_vectors),
      # Paper ablation: a token per training image, mixed into some prompts.
      image_tokens=(pseudo_words.per_image_tokens(config.placeholder_token, num_images)
                    if config.per_image_tokens else []),
      num_templates=len(texts.templates), texts=texts,
      captioned=captioned if captioned.any() else None)


def _cache_latents(config, sd, images) -> list[tuple[np.ndarray, np.ndarray]]:
  """The VAE posteriors of every distinct training view, encoded once (`latent_cache`): one
  (mean, std) pair, or with buckets one per bucket (its images' views, in file order)."""
  flip = config.flip_p > 0
  try:
    if not config.enable_bucket:
      views = image_loader.view_pixels(images.pixels, flip)  # [V, R, R, 3]
      _log(f"encoding {len(views)} training view(s) of {images.num_images} image(s) with the "
           "VAE once")
      return [latent_cache.encode_views(sd.vae, sd.vae_params, views)]
    _log(f"encoding the training views of {images.num_images} image(s) in "
         f"{len(images.buckets)} bucket(s) with the VAE once")
    return [latent_cache.encode_views(sd.vae, sd.vae_params,
                                      image_loader.view_pixels(images.bucket_pixels(b), flip))
            for b in range(len(images.buckets))]  # each [V_b, h_b, w_b, C]
  except MemoryError:
    raise ConfigError(f"config.resolution {config.resolution}: not enough memory to encode "
                      "the training images at that size") from None


def batch_sizes(config, num_devices: int) -> tuple[int, int]:
  """(examples per device per micro-batch, examples per step over every device, process and
  micro-batch of gradient accumulation)."""
  accumulation = config.gradient_accumulation_steps
  if config.global_batch_size:
    if config.global_batch_size % (num_devices * accumulation):
      raise ConfigError(f"config.global_batch_size {config.global_batch_size} is not divisible "
                        f"by the {num_devices} devices x {accumulation} accumulation steps")
    per_device_batch = config.global_batch_size // (num_devices * accumulation)
  else:
    per_device_batch = config.train_batch_size
  global_batch = per_device_batch * num_devices * accumulation
  if global_batch > MAX_EXAMPLES_PER_STEP:
    raise ConfigError(
        f"config.train_batch_size {per_device_batch} x {num_devices} devices x "
        f"{accumulation} accumulation steps = {global_batch} examples per step, above the "
        f"limit of {MAX_EXAMPLES_PER_STEP} (set config.global_batch_size to fix the total)")
  return per_device_batch, global_batch


def view_time_ids(images: image_loader.TrainingImages, flip: bool) -> list[np.ndarray]:
  """SDXL's micro-conditioning of every training view, in the latent cache's order.

  One float32 `[V_b, 6]` array per entry of `_cache_latents` (per bucket, or one):
  (original h, w, crop top, left, target h, w), as diffusers' SDXL scripts build
  `add_time_ids`: the file's size before resizing, the crop's top-left in the
  scaled image (`image_loader`), the size trained at. A mirrored view keeps its
  image's values, as diffusers' textual_inversion_sdxl.py does (it flips after
  cropping): our crops are centred, so the mirror's crop offset is the same (up
  to a pixel of rounding).
  """
  def rows(members):
    out = []
    for i in members:
      w, h = images.sizes[i]
      pixels = images.pixels[i]  # [h_t, w_t, 3]
      out.append((h, w, *images.crop_top_left[i], pixels.shape[0], pixels.shape[1]))
    ids = np.asarray(out, np.float32)  # [N_b, 6]
    return np.concatenate([ids, ids]) if flip else ids  # views i + N_b mirror images i
  if not images.buckets:
    return [rows(range(images.num_images))]
  return [rows(images.bucket_members(b)) for b in range(len(images.buckets))]


def bucket_sizes(images: image_loader.TrainingImages) -> list[int]:
  """Images per bucket in use (images.buckets' order)."""
  return np.bincount(images.bucket_index, minlength=len(images.buckets)).tolist()


def step_bucket(config, inputs: RunInputs, step: int) -> tuple[int, int] | None:
  """With buckets, (bucket of `step`, its position in that bucket's stream)
  (`choices.bucket_choice`); None without."""
  if not config.enable_bucket:
    return None
  return choices.bucket_choice(config.seed, step, bucket_sizes(inputs.images))


def batch_for(config, inputs: RunInputs, step: int) -> dict:
  """This process's share of the global batch of `step` (all of it on one host), sharded
  over its devices: {"input_ids": [d, A * b, T], "view_index": [d, A * b], "example_index":
  [d, A * b]}, and "input_ids" + suffix for each further text encoder (SDXL: "input_ids_2")
  (A: gradient_accumulation_steps; the step cuts each device's row into A micro-batches of b)."""
  local = inputs.per_device_batch * inputs.local_devices * config.gradient_accumulation_steps
  example_index = jax.process_index() * local + np.arange(local)  # [local], global positions
  return parallel.shard(examples(config, inputs, step, example_index), inputs.local_devices)


def global_batch_for(config, inputs: RunInputs, step: int) -> dict:
  """The whole global batch of `step`, every process's examples `[B, ...]` (B = global_batch),
  unsharded: `batch_for`'s rows in device order, one after another. A run of many concepts
  places it on its mesh (`parallel.put`), where the concept axis may span hosts."""
  return examples(config, inputs, step, np.arange(inputs.global_batch))


def examples(config, inputs: RunInputs, step: int, example_index: np.ndarray) -> dict:
  """The examples `example_index` (`[b]`, positions in the step's global batch) of `step`:
  {"input_ids" (+ suffix per further encoder): [b, T], "view_index": [b], "example_index":
  [b]}, each a pure function of (seed, step, position)."""
  drawn = step_bucket(config, inputs, step)
  if drawn is None:
    view_index, template_index = choices.example_choices(
        config.seed, step, example_index, global_batch_size=inputs.global_batch,
        num_images=inputs.images.num_images, flip_p=config.flip_p,
        num_templates=inputs.prompts.num_templates)
    prompt_view = view_index  # [local]
  else:
    # The whole step (every micro-batch) from one bucket; view_index indexes its latents.
    members = inputs.images.bucket_members(drawn[0])  # [N_b] image of each bucket position
    view_index, template_index = choices.example_choices(
        config.seed, step, example_index, global_batch_size=inputs.global_batch,
        num_images=len(members), flip_p=config.flip_p,
        num_templates=inputs.prompts.num_templates, bucket=drawn[0], stream_step=drawn[1])
    # The same view in the images' numbering (image i, or i + N mirrored), for the prompts.
    prompt_view = (members[view_index % len(members)]
                   + inputs.images.num_images * (view_index >= len(members)))
  active = train_lib.active_vectors(step, config.num_vectors, config.progressive_words)
  mixed = (choices.per_image_choices(config.seed, step, example_index, config.per_image_token_p)
           if inputs.prompts.image_tokens else None)
  batch = {"view_index": view_index, "example_index": example_index.astype(np.int32)}
  for c in inputs.concepts:  # the same prompts in each text encoder's ids
    batch["input_ids" + c.suffix] = captions.batch_input_ids(
        c.template_ids, c.image_template_ids, active, template_index, prompt_view, mixed,
        inputs.prompts.captioned, c.caption_ids, c.image_caption_ids)
  return batch


def bucket_frozen(inputs: RunInputs, frozen: train_lib.Frozen,
                  devices: Sequence) -> list[train_lib.Frozen]:
  """One replicated `Frozen` per bucket (`frozen`, from `trainer.step_inputs`, is the first): the
  same device copies of the weights, each bucket's latents replicated once here, never
  per step. The step compiles one program per bucket shape on first use."""
  out = [frozen]
  for b, (mean, std) in enumerate(inputs.latents[1:], start=1):
    mean, std = parallel.replicate((mean, std), devices)
    bucket = frozen.replace(latent_mean=mean, latent_std=std)
    if inputs.time_ids is not None:  # SDXL: the bucket's views' micro-conditioning
      bucket = bucket.replace(time_ids=parallel.replicate(inputs.time_ids[b], devices))
    out.append(bucket)
  return out


def frozen_for(config, inputs: RunInputs, frozen: list[train_lib.Frozen],
               step: int) -> train_lib.Frozen:
  """The replicated frozen arrays of `step`'s bucket (`bucket_frozen`'s list)."""
  drawn = step_bucket(config, inputs, step)
  return frozen[0 if drawn is None else drawn[0]]

