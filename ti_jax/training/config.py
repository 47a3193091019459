"""Every training config field in one place: its default and what it means, the
presets, its check, and whether it is part of the run's identity.

- Defaults (`get_config`): each field with the comment that says what it means, the
  base of configs/*.py. Field names follow diffusers' `textual_inversion.py` so its
  users can move over. Defaults are the paper's: base learning rate 5e-3 scaled by
  the global batch, 5000 steps, one vector, Stable Diffusion 1.5.
- Presets, as data: `VARIANTS` (the fields each variant changes), `WORLD_OBJECT` and
  `concept_config` (what a configs/*.py file sets).
- Checks (`validate_config`): the value ranges config_flags' type checks cannot see,
  with their limits (`MAX_*`); a bad value raises `ConfigError`, one line. Fields any
  value of their type suits are listed in `UNCHECKED`, so a new field needs a decision.
- Identity: the fields that say what a run learns, in run.json (`IDENTITY_FIELDS`) and
  in every checkpoint (`CHECKPOINT_IDENTITY`), with the values older runs were made
  with; `ti_jax.training.checkpointing` compares them when a run resumes. The other
  fields, free to change on resume, are listed in `NOT_IDENTITY`.

Variants (`--config configs/style.py:VARIANT`):
  sd15  Stable Diffusion 1.5 from the hub (the default).
  sd21  Stable Diffusion 2.1 (768 px, v-prediction) from the hub.
  sdxl  Stable Diffusion XL base 1.0 from the hub (1024 px, two text encoders:
        one vector set per encoder, 768 and 1280 wide).
  tiny  a tiny random-weight model written locally on first use, trained on
        the example images in examples/: runs offline in about two minutes on
        a 2-core CPU. Its outputs are noise by design; it exercises the tool.
  tiny_sdxl  the same for SDXL's code path (tiny-sdxl: both encoders, time ids).
  world  tiny-world, the small Stable Diffusion trained on ti_jax's procedural
        world and shipped in the package, offline (configs/object.py and
        paper.py only: the world's concept is a shape). What it reaches: the
        README's "The tiny world".
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections

from ti_jax import errors
from ti_jax.models import layers
from ti_jax.sampling import schedulers
from ti_jax.training import tensorboard, train_lib, validation

# ---------------------------------------------------------------------------
# Defaults: every field, with what it means.
# ---------------------------------------------------------------------------

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD21 = "stabilityai/stable-diffusion-2-1"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"



def get_config(variant: str = "sd15") -> ml_collections.ConfigDict:
  """Base config; `configs/object.py`, `style.py` and `paper.py` fill in the concept fields.

  Every field takes its default below, then the values `VARIANTS[variant]` gives it.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown config variant {variant!r} (known: {', '.join(VARIANTS)})")
  c = ml_collections.ConfigDict()

  # --- Model ---
  # Hub id or local diffusers folder. "tiny-sd15"/"tiny-sd21" name ti_jax's
  # offline random-weight models, written to `cache_dir` on first use. A .safetensors
  # file is a single-file checkpoint in the original (A1111/ComfyUI) layout.
  c.pretrained_model_name_or_path = SD15
  # Single-file checkpoints hold no tokenizer: a tokenizer folder or hub id
  # ("" = the model family's, e.g. openai/clip-vit-large-patch14 for SD 1.x).
  c.tokenizer_name_or_path = ""
  c.revision = ""  # hub revision ("" = default branch)
  c.variant = ""  # weight file variant, e.g. "fp16" ("" = full precision files)
  c.allow_pickle = False  # permit .bin pickles (they can run code) if no safetensors exist
  c.cache_dir = "~/.cache/ti_jax"  # where tiny models are written
  # JAX's persistent compilation cache: a restarted run skips compiling ("" = off).
  c.compilation_cache_dir = "~/.cache/ti_jax/xla"
  c.dtype = "bfloat16"  # compute/param dtype of the frozen UNet and text encoder
  c.vae_dtype = "float32"  # the VAE runs once per training image (latents are cached)
  # Attention: "" (chosen: the Pallas TPU kernel on TPUs, JAX's choice elsewhere), "xla",
  # "cudnn" (GPU flash attention), or "pallas_tpu" (the Pallas TPU flash-attention kernel
  # for the UNet; TPU only).
  c.attention_impl = ""
  # Recompute the UNet's resnets/transformers in the backward pass: less activation
  # memory (larger batches fit), about a third more compute. True, False, or "auto":
  # on TPUs only when the step would not fit the chip's memory without it (decided
  # from the compiled step's memory plan), elsewhere off.
  c.remat = ml_collections.FieldReference("auto", field_type=object)
  # Shard the frozen UNet and text encoders over the devices instead of a copy on each
  # (FSDP-style: each large weight split along one axis, gathered by XLA layer by layer), so
  # a model larger than one device trains; the step then runs on a device mesh (jax.jit)
  # instead of pmap, with the same results. True, False, or "auto": on TPUs only when the
  # step with replicated weights would not fit the chip (as remat="auto" decides).
  c.shard_weights = ml_collections.FieldReference(False, field_type=object)

  # --- Concept and data ---
  c.train_data_dir = ""  # folder with the 3-5 concept images
  # Many concepts in one run (one compiled step trains them all): a JSON-lines file, one
  # concept per line, {"placeholder_token", "train_data_dir"} required, "initializer_token",
  # "learnable_property", "caption_extension", "init_embedding", "learning_rate", "seed"
  # optional (default: these fields); every other field is the run's. Outputs go to
  # WORKDIR/<concept>/. "" = one concept, the fields above (see README "Many concepts").
  c.concepts_file = ""
  c.placeholder_token = "<concept>"  # the new pseudo-word S*
  c.initializer_token = ""  # word whose embedding starts S* (set by object.py/style.py)
  c.num_vectors = 1  # vectors per pseudo-word (the paper uses 1)
  # Start from an existing embedding (run dir, diffusers/A1111/kohya file) instead
  # of initializer_token; its vector count must equal num_vectors.
  c.init_embedding = ""
  c.learnable_property = "object"  # "object" or "style": which prompt templates to use
  # Caption files beside the images (e.g. ".txt": "a.png" -> "a.txt", first line): an
  # image's caption is its prompt, "{}" or the placeholder marking S*; images without
  # one use the templates ("" = no captions).
  c.caption_extension = ""
  # A text file of templates, one per line with "{}" (or the placeholder) for S*, used
  # instead of the object/style lists ("" = the paper's list for learnable_property).
  c.templates_file = ""
  c.resolution = 512  # training image size (pixels, square)
  c.center_crop = False  # crop the central square before resizing (else squash)
  c.flip_p = 0.5  # probability of a horizontal flip per example
  # Aspect-ratio bucketing (kohya's names): each image keeps its aspect ratio, scaled
  # to cover and center-cropped to the bucket (width x height, multiples of
  # bucket_reso_steps in [min_bucket_reso, max_bucket_reso], at most resolution^2
  # pixels) of nearest aspect ratio; center_crop is then unused. A step's batch comes
  # from one bucket (drawn by (seed, step), in proportion to its images); one compiled
  # step per bucket shape. bucket_reso_steps must be a multiple of the latent's
  # downsampling through the VAE and UNet (64 for SD 1.x/2.x). False = square images.
  c.enable_bucket = False
  c.min_bucket_reso = 256  # smallest bucket side (pixels)
  c.max_bucket_reso = 1024  # largest bucket side (pixels)
  c.bucket_reso_steps = 64  # bucket sides are multiples of this (pixels)

  # --- Optimisation ---
  c.train_batch_size = 4  # per device
  # If > 0, the global batch regardless of the device count (train_batch_size is
  # then global_batch_size / devices): reproduces a run on other hardware.
  c.global_batch_size = 0
  # Micro-batches of train_batch_size per device per optimizer step, run one after
  # another inside the compiled step with their gradients averaged: the global batch
  # (and scale_lr) is train_batch_size x devices x this, in a device's memory for one.
  c.gradient_accumulation_steps = 1
  c.max_train_steps = 5000
  c.learning_rate = 5e-3  # base rate; multiplied by the global batch if scale_lr
  # lr = learning_rate * global batch (train_batch_size x devices x
  # gradient_accumulation_steps), as in the paper.
  c.scale_lr = True
  # constant, constant_with_warmup, linear, cosine. The decays span max_train_steps, so
  # raising max_train_steps to extend a finished run restarts them from the new length.
  c.lr_scheduler = "constant"
  c.lr_warmup_steps = 0  # steps of linear warmup from 0 to the rate (any schedule)
  # adamw (the paper's), lion, prodigy, adafactor or sgd (optax's; only the learned
  # vectors have optimizer state). The adam_* fields below are AdamW's; adam_weight_decay
  # is also the (decoupled) weight decay of lion, prodigy and adafactor; sgd is plain SGD.
  # Lion wants a 3-10x lower learning_rate; prodigy estimates its own step size, which
  # learning_rate multiplies: use learning_rate=1.0 and scale_lr=False with it.
  c.optimizer = "adamw"
  c.adam_beta1 = 0.9  # AdamW's first-moment decay
  c.adam_beta2 = 0.999  # AdamW's second-moment decay
  c.adam_weight_decay = 1e-2  # decoupled weight decay (see optimizer)
  c.adam_epsilon = 1e-8  # AdamW's denominator epsilon
  # Min-SNR-gamma loss weighting (diffusers' snr_gamma; 5.0 is the paper's choice):
  # each example's error is weighted by min(SNR(t), gamma) / SNR(t) for epsilon
  # targets, / (SNR(t) + 1) for v-prediction. 0 = off (plain MSE).
  c.snr_gamma = 0.0
  # Std of a constant per example and latent channel added to the diffusion noise
  # (diffusers'/kohya's noise_offset, e.g. 0.05-0.1: darker/brighter images). 0 = off.
  c.noise_offset = 0.0
  c.seed = 0  # every random choice is a function of (seed, step, example index)
  # Paper ablation: add w * mean_i ||v_i - v_i(init)||^2 to the loss (0 = off).
  c.embedding_reg_weight = 0.0
  # Paper ablation (progressive extension): start with one vector and add the next
  # of num_vectors every N steps (0 = all vectors from the start).
  c.progressive_words = 0
  # Paper ablation (per-image tokens): learn one extra token S_i per training image;
  # with probability per_image_token_p a prompt reads "... S* with S_i" for the
  # example's image, so image-specific detail can go to S_i. Only S* is exported.
  c.per_image_tokens = False
  c.per_image_token_p = 0.25  # see per_image_tokens

  # --- Checkpoints, logging, validation ---
  c.checkpointing_steps = 500  # save an Orbax checkpoint every N steps (and at the end)
  c.checkpoints_total_limit = 3  # keep the last N checkpoints
  c.log_every_steps = 10  # metrics to metrics.jsonl and the progress bar
  # "tensorboard": also write the metrics and validation grids as TensorBoard events in
  # WORKDIR/tensorboard (tensorboardX, no TensorFlow); "" = metrics.jsonl only.
  c.report_to = ""
  c.validation_prompt = ""  # "{}" is replaced by the placeholder; "" = no validation
  # More validation prompts: a tuple of strings, or a string naming a UTF-8 file with one
  # prompt per line (blank lines skipped), read at start-up. "{}" as in validation_prompt
  # (a prompt without it is a control without S*). With any, each validation step writes
  # one grid of num_validation_images per prompt, validation/stepNNNNNN_p<k>.png, prompt
  # 0 being validation_prompt if set. () = validation_prompt alone.
  c.validation_prompts = ml_collections.FieldReference((), field_type=object)
  c.validation_steps = 500  # generate validation images every N steps
  c.num_validation_images = 4  # images per validation prompt, in one grid
  c.validation_scheduler = "dpm++2m"  # ddim, pndm, euler, dpm++2m
  c.validation_inference_steps = 25  # sampler steps per validation image
  c.validation_guidance_scale = 7.5  # classifier-free guidance of validation images
  # Validation images per device per compiled call; 0 = as many as
  # num_validation_images needs, capped by device memory (4 on CPU).
  c.validation_batch_size = 0

  for name, value in VARIANTS[variant].items():
    c[name] = value
  return c


# ---------------------------------------------------------------------------
# Presets: the variants, and the concepts configs/*.py set.
# ---------------------------------------------------------------------------

# The fields each variant (`--config FILE:VARIANT`) sets over the defaults.
_TINY = {  # the tiny random-weight models: offline, on a CPU
    "dtype": "float32",
    "resolution": 64,
    "train_batch_size": 2,
    "max_train_steps": 1000,
    "learning_rate": 5e-3,
    "checkpointing_steps": 250,
    "log_every_steps": 25,
    "validation_steps": 500,
    "num_validation_images": 2,
    "validation_inference_steps": 10,
}
VARIANTS = {
    "sd15": {},
    "sd21": {"pretrained_model_name_or_path": SD21, "resolution": 768},
    "sdxl": {
        "pretrained_model_name_or_path": SDXL,
        "resolution": 1024,
        # diffusers' textual_inversion example's settings: lr 5e-4 scaled by the global
        # batch of 1 per device x 4 accumulation steps, 3000 steps. The paper's 5e-3 x batch
        # was tuned for LDM/SD 1.x at 512 px; SDXL's two encoders move further per step.
        "train_batch_size": 1,
        "gradient_accumulation_steps": 4,
        "learning_rate": 5e-4,
        "max_train_steps": 3000,
    },
    "tiny": {"pretrained_model_name_or_path": "tiny-sd15", **_TINY},
    "tiny_sdxl": {"pretrained_model_name_or_path": "tiny-sdxl", **_TINY},
    "world": {
        "pretrained_model_name_or_path": "tiny-world",
        "dtype": "float32",
        "resolution": 32,  # the world's image size
        "flip_p": 0.0,  # the world has left and right: a flip would change the position
        # The world's caption openings ("a photo of a ..."): the paper's templates use
        # words its tokenizer has never seen.
        "templates_file": "examples/world_templates.txt",
        # Any device count gives the same run. 32 rather than the paper's 8: the step is
        # cheap here and the larger batch (with the rate it scales) drew the cross in 0.91
        # of samples against 0.81 at 8 (captioned, guidance 7) (README, "The tiny world").
        "global_batch_size": 32,
        "max_train_steps": 400,
        # x global batch: 1.28e-3. The world's word rows are 64 wide with norms 0.16-0.4; the
        # paper's 5e-3 x 8 (0.04 a step) pushed S* to norm 5 and drew a cross in 0.38 of
        # samples, 4e-5 x 8 in 0.53 (uncaptioned; README, "The tiny world").
        "learning_rate": 4e-5,
        "checkpointing_steps": 200,
        "log_every_steps": 25,
        "validation_steps": 400,
        "num_validation_images": 8,
        "validation_scheduler": "ddim",
        "validation_inference_steps": 25,
        "validation_guidance_scale": 7.0,  # the world's evaluation protocol (README)
    },
}


# The concept of the `world` variant (configs/object.py and paper.py): the world's
# held-out shape, which its captions only ever call "object". Its images carry
# captions (NN.txt, `scenes.concept_caption`) that name everything but the shape, so
# S* learns the shape alone: reconstruction 0.72 against 0.53 uncaptioned (batch 8,
# guidance 4).
WORLD_OBJECT = {"train_data_dir": "examples/world-cross", "initializer_token": "object",
                "caption_extension": ".txt",
                "validation_prompt": "a photo of {}"}


def concept_config(variant: str, learnable_property: str, placeholder_token: str,
                   initializer_token: str, validation_prompt: str,
                   tiny: dict | None = None,
                   world: dict | None = None) -> ml_collections.ConfigDict:
  """`get_config(variant)` ("" = sd15) with the concept fields a configs/*.py file sets.

  `tiny` holds the fields that differ under the `tiny` and `tiny_sdxl` variants
  (their example images, a token that suits them); `world` those of the `world` variant.
  """
  c = get_config(variant or "sd15")
  c.learnable_property = learnable_property  # picks the templates: "object" or "style"
  c.placeholder_token = placeholder_token
  c.initializer_token = initializer_token
  c.validation_prompt = validation_prompt
  if variant in ("tiny", "tiny_sdxl"):
    c.update(tiny or {})
  if variant == "world":
    if world is None:  # a concept file that has no world concept (styles: no caption names one)
      raise ValueError(f"no world variant for {learnable_property} concepts (the world's "
                       "example is an object: configs/object.py:world)")
    c.update(world)
  return c


# ---------------------------------------------------------------------------
# Checks: the ranges config_flags' type checks cannot see.
# ---------------------------------------------------------------------------


class ConfigError(errors.UserError):
  """A config value is out of range; one-line message."""


# The dtypes `dtype` and `vae_dtype` may name.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Largest training resolution: Stable Diffusion models are trained at 512-1024 px,
# and the VAE encoder's first layers hold 128 x R x R float32 activations per
# image (2 GiB at 2048 px), beside R x R x 3 pixels per training view on the host.
MAX_RESOLUTION = 2048

# The step counter, and every step count the compiled step computes with (the learning-rate
# schedule's warmup and decay, progressive_words), are 32-bit integers on the device.
MAX_STEPS = 2**31 - 1

# JAX's random keys take 32-bit seeds: a larger seed would repeat a smaller one's draws.
MAX_SEED = 2**32 - 1

# Examples per optimizer step (per-device batch x devices x accumulation steps). The host
# draws every example's view and template each step (about a second for this many) and
# builds its token ids; nothing trains usefully at more.
MAX_EXAMPLES_PER_STEP = 2**16

# Validation images per prompt, and per device per sampling call. Each prompt's images and
# their grid are held on the host (64 images at 2048 px take 1.5 GB); for more images,
# sample the checkpoint with ti_jax.sample.
MAX_VALIDATION_IMAGES = 64

# Fields any value of their type suits (config_flags checks the type): `validate_config`
# checks every other field.
UNCHECKED = ("pretrained_model_name_or_path", "tokenizer_name_or_path", "revision", "variant",
             "allow_pickle", "cache_dir", "compilation_cache_dir", "placeholder_token",
             "init_embedding", "templates_file", "center_crop", "scale_lr",
             "validation_prompt")


def validate_config(c) -> None:
  """Checks value ranges that config_flags' type checks cannot.

  Raises ConfigError for the first bad value. The checks run in a fixed order, so a
  config with several bad values always names the same one.
  """
  def need(ok, msg):
    if not ok:
      raise ConfigError(msg)
  many = bool(c.get("concepts_file", ""))
  need(c.train_data_dir or many,
       "config.train_data_dir is empty: point it at a folder of 3-5 images")
  need(not (many and c.enable_bucket),
       "config.enable_bucket is not supported with config.concepts_file yet (every concept of "
       "the one compiled step shares one image shape); set it to False")
  need(not (many and c.per_image_tokens),
       "config.per_image_tokens (the paper's ablation) is not supported with "
       "config.concepts_file; set it to False")
  need(c.learnable_property in ("object", "style"),
       f"config.learnable_property must be 'object' or 'style', got {c.learnable_property!r}")
  need(not c.caption_extension or (c.caption_extension.startswith(".") and
                                   len(c.caption_extension) > 1),
       f"config.caption_extension must be '' or start with a dot, e.g. '.txt', got "
       f"{c.caption_extension!r}")
  need(c.initializer_token.strip(), "config.initializer_token is empty: give a coarse word, e.g. 'toy'")
  need(c.num_vectors >= 1, f"config.num_vectors must be >= 1, got {c.num_vectors}")
  # Each vector takes one of the text encoder's 77 tokens, 2 of which are start
  # and end (the exact limit, which depends on the templates, is checked later).
  need(c.num_vectors <= 75, f"config.num_vectors {c.num_vectors} cannot fit the text "
       "encoder's 77-token prompts (each vector takes a token; at most 75 fit)")
  need(c.resolution >= 8 and c.resolution % 8 == 0,
       f"config.resolution must be a positive multiple of 8, got {c.resolution}")
  if c.enable_bucket:
    step = c.bucket_reso_steps
    need(step >= 8 and step % 8 == 0,
         f"config.bucket_reso_steps must be a positive multiple of 8, got {step}")
    for name in ("min_bucket_reso", "max_bucket_reso"):
      need(c[name] >= step and c[name] % step == 0,
           f"config.{name} must be a positive multiple of bucket_reso_steps {step}, got {c[name]}")
    need(c.min_bucket_reso <= c.resolution <= c.max_bucket_reso,
         f"config.resolution {c.resolution} must lie in [min_bucket_reso, max_bucket_reso] = "
         f"[{c.min_bucket_reso}, {c.max_bucket_reso}] with enable_bucket")
    need(c.max_bucket_reso <= MAX_RESOLUTION,
         f"config.max_bucket_reso {c.max_bucket_reso} is above the limit of {MAX_RESOLUTION} px")
  need(c.resolution <= MAX_RESOLUTION,
       f"config.resolution {c.resolution} is above the limit of {MAX_RESOLUTION} px: Stable "
       "Diffusion is trained at 512-1024 px, and encoding larger images needs tens of GB")
  # nan compares False with everything, so each range check below also refuses it.
  for name in ("learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "adam_weight_decay",
               "embedding_reg_weight", "flip_p", "per_image_token_p", "snr_gamma", "noise_offset",
               "validation_guidance_scale"):
    need(math.isfinite(float(c[name])), f"config.{name} must be a finite number, got {c[name]}")
  need(c.train_batch_size >= 1, f"config.train_batch_size must be >= 1, got {c.train_batch_size}")
  for name in ("train_batch_size", "global_batch_size", "gradient_accumulation_steps"):
    need(c[name] <= MAX_EXAMPLES_PER_STEP,
         f"config.{name} {c[name]} is above the limit of {MAX_EXAMPLES_PER_STEP} examples per "
         "step (the host draws and tokenizes every example of every step)")
  need(c.remat in (True, False, "auto"), f"config.remat must be True, False or auto, got {c.remat!r}")
  need(c.shard_weights in (True, False, "auto"),
       f"config.shard_weights must be True, False or auto, got {c.shard_weights!r}")
  need(c.global_batch_size >= 0, f"config.global_batch_size must be >= 0, got {c.global_batch_size}")
  for name in ("snr_gamma", "noise_offset"):
    need(c[name] >= 0, f"config.{name} must be >= 0 (0 = off), got {c[name]}")
  need(c.gradient_accumulation_steps >= 1,
       f"config.gradient_accumulation_steps must be >= 1, got {c.gradient_accumulation_steps}")
  need(0.0 <= c.per_image_token_p <= 1.0,
       f"config.per_image_token_p must be in [0, 1], got {c.per_image_token_p}")
  need(c.max_train_steps >= 1, f"config.max_train_steps must be >= 1, got {c.max_train_steps}")
  for name in ("max_train_steps", "lr_warmup_steps", "progressive_words"):
    need(c[name] <= MAX_STEPS, f"config.{name} {c[name]} is above {MAX_STEPS}: the training "
         "step counts steps in 32-bit integers")
  need(c.learning_rate > 0, f"config.learning_rate must be > 0, got {c.learning_rate}")
  for name in ("adam_beta1", "adam_beta2"):
    need(0.0 <= c[name] < 1.0, f"config.{name} must be in [0, 1), got {c[name]}")
  need(c.adam_epsilon > 0, f"config.adam_epsilon must be > 0, got {c.adam_epsilon}")
  need(c.adam_weight_decay >= 0,
       f"config.adam_weight_decay must be >= 0, got {c.adam_weight_decay}")
  need(c.optimizer in train_lib.OPTIMIZERS,
       f"config.optimizer must be one of {', '.join(train_lib.OPTIMIZERS)}, got {c.optimizer!r}")
  need(c.lr_scheduler in train_lib.LR_SCHEDULES,
       f"config.lr_scheduler must be one of {', '.join(train_lib.LR_SCHEDULES)}, got {c.lr_scheduler!r}")
  need(0.0 <= c.flip_p <= 1.0, f"config.flip_p must be in [0, 1], got {c.flip_p}")
  for name in ("dtype", "vae_dtype"):
    need(c[name] in DTYPES, f"config.{name} must be one of {', '.join(DTYPES)}, got {c[name]!r}")
  need(c.checkpointing_steps >= 1, f"config.checkpointing_steps must be >= 1, got {c.checkpointing_steps}")
  need(c.log_every_steps >= 1, f"config.log_every_steps must be >= 1, got {c.log_every_steps}")
  need(c.validation_steps >= 1, f"config.validation_steps must be >= 1, got {c.validation_steps}")
  need(c.checkpoints_total_limit >= 1,
       f"config.checkpoints_total_limit must be >= 1 (the newest is always kept), "
       f"got {c.checkpoints_total_limit}")
  need(0 <= c.seed <= MAX_SEED, f"config.seed must be >= 0 and < 2**32 (JAX's random keys take "
       f"32-bit seeds), got {c.seed}")
  need(c.progressive_words >= 0,
       f"config.progressive_words must be >= 0, got {c.progressive_words}")
  need(c.embedding_reg_weight >= 0,
       f"config.embedding_reg_weight must be >= 0, got {c.embedding_reg_weight}")
  need(c.lr_warmup_steps >= 0, f"config.lr_warmup_steps must be >= 0, got {c.lr_warmup_steps}")
  need(c.attention_impl in layers.ATTENTION_IMPLS,
       f"config.attention_impl must be one of {layers.ATTENTION_IMPLS}, got {c.attention_impl!r}")
  need(c.report_to in tensorboard.REPORT_TO,
       f"config.report_to must be '' (off) or 'tensorboard', got {c.report_to!r}")
  if validation.enabled(c):
    validation.validation_prompts(c)  # a prompts file is read (and checked) at start-up
    need(c.num_validation_images >= 1,
         f"config.num_validation_images must be >= 1, got {c.num_validation_images}")
    for name in ("num_validation_images", "validation_batch_size"):
      need(c[name] <= MAX_VALIDATION_IMAGES,
           f"config.{name} {c[name]} is above the limit of {MAX_VALIDATION_IMAGES} validation "
           "images (for more, sample a checkpoint with python -m ti_jax.sample)")
    need(c.validation_inference_steps >= 1,
         f"config.validation_inference_steps must be >= 1, got {c.validation_inference_steps}")
    need(c.validation_batch_size >= 0,
         f"config.validation_batch_size must be >= 0, got {c.validation_batch_size}")
    # The name only: the sampler itself is built from the model's scheduler config once it
    # is loaded (validation.check_scheduler); an empty config here would take PNDM's PRK
    # defaults and refuse pndm below 4 steps for every model.
    try:
      schedulers.check_sampler_name(c.validation_scheduler)
    except ValueError as e:
      raise ConfigError(f"config.validation_scheduler: {e}") from None


# ---------------------------------------------------------------------------
# Identity: the fields that say what a run learns.
# ---------------------------------------------------------------------------

# Fields of run.json that define what a run learns: resuming with any of them
# changed would silently mix two concepts, so it is refused.
IDENTITY_FIELDS = ("placeholder_token", "num_vectors", "initializer_token",
                   "pretrained_model_name_or_path", "learnable_property", "train_data_dir",
                   "resolution", "per_image_tokens", "caption_extension", "templates_file",
                   "buckets")
# Values of identity fields added after runs were first written.
IDENTITY_DEFAULTS = {"per_image_tokens": False, "caption_extension": "", "templates_file": "",
                     "buckets": None}


# Fields of a checkpoint's metadata that say what it learned. A run resumes a
# checkpoint only if all of them match (run.json may be missing or rewritten).
CHECKPOINT_IDENTITY = ("placeholder_token", "initializer_token", "pretrained_model_name_or_path",
                       "num_vectors", "learnable_property", "resolution", "image_files", "seed",
                       "per_image_tokens", "snr_gamma", "noise_offset", "optimizer",
                       "caption_extension", "templates_file", "prompt_texts_sha256", "buckets")
# Values of checkpoint identity fields added later: a checkpoint without the field
# was made with this value (so it resumes only with it).
CHECKPOINT_DEFAULTS = {"snr_gamma": 0.0, "noise_offset": 0.0, "optimizer": "adamw",
                       "caption_extension": "", "templates_file": "", "prompt_texts_sha256": "",
                       "buckets": None}

# Identity entries that are no config field, and the fields each is computed from:
# "buckets" from the bucket fields (`bucket_identity`), the image files' names from the
# images found in train_data_dir, the digest of the caption files' and templates file's
# texts from the files those fields name.
COMPUTED_IDENTITY = {
    "buckets": ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"),
    "image_files": ("train_data_dir",),
    "prompt_texts_sha256": ("caption_extension", "templates_file"),
}

# Fields outside both identities: a run may resume with them changed (a changed global
# batch is warned about). With the identity tables and COMPUTED_IDENTITY they name every
# field, so a new field needs a decision (tests/training/test_config.py).
NOT_IDENTITY = (
    # Model: its files and how it is computed.
    "tokenizer_name_or_path", "revision", "variant", "allow_pickle", "cache_dir",
    "compilation_cache_dir", "dtype", "vae_dtype", "attention_impl", "remat", "shard_weights",
    # Concept and data (a concepts file's concepts are the identity, not its path).
    "concepts_file", "init_embedding", "center_crop", "flip_p", "per_image_token_p",
    # Optimisation.
    "train_batch_size", "global_batch_size", "gradient_accumulation_steps", "max_train_steps",
    "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2",
    "adam_weight_decay", "adam_epsilon", "embedding_reg_weight", "progressive_words",
    # Checkpoints, logging, validation.
    "checkpointing_steps", "checkpoints_total_limit", "log_every_steps", "report_to",
    "validation_prompt", "validation_prompts", "validation_steps", "num_validation_images",
    "validation_scheduler", "validation_inference_steps", "validation_guidance_scale",
    "validation_batch_size",
)


def bucket_identity(config) -> list[int] | None:
  """What aspect-ratio bucketing changes of a run: [min_bucket_reso, max_bucket_reso,
  bucket_reso_steps] with enable_bucket, None without (the reso fields are then unused)."""
  if not config.enable_bucket:
    return None
  return [int(config.min_bucket_reso), int(config.max_bucket_reso),
          int(config.bucket_reso_steps)]
