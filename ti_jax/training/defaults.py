"""Every training config field, with its default: the base of configs/*.py.

Field names follow diffusers' `textual_inversion.py` so its users can move
over. Defaults are the paper's: base learning rate 5e-3 scaled by the global
batch, 5000 steps, one vector, Stable Diffusion 1.5.

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

import ml_collections

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD21 = "stabilityai/stable-diffusion-2-1"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"


def get_config(variant: str = "sd15") -> ml_collections.ConfigDict:
  """Base config; `configs/object.py`, `style.py` and `paper.py` fill in the concept fields."""
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

  # --- Concept and data ---
  c.train_data_dir = ""  # folder with the 3-5 concept images
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
  c.lr_warmup_steps = 0
  # adamw (the paper's), lion, prodigy, adafactor or sgd (optax's; only the learned
  # vectors have optimizer state). The adam_* fields below are AdamW's; adam_weight_decay
  # is also the (decoupled) weight decay of lion, prodigy and adafactor; sgd is plain SGD.
  # Lion wants a 3-10x lower learning_rate; prodigy estimates its own step size, which
  # learning_rate multiplies: use learning_rate=1.0 and scale_lr=False with it.
  c.optimizer = "adamw"
  c.adam_beta1 = 0.9
  c.adam_beta2 = 0.999
  c.adam_weight_decay = 1e-2
  c.adam_epsilon = 1e-8
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
  c.per_image_token_p = 0.25

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
  c.num_validation_images = 4
  c.validation_scheduler = "dpm++2m"  # ddim, pndm, euler, dpm++2m
  c.validation_inference_steps = 25
  c.validation_guidance_scale = 7.5
  # Validation images per device per compiled call; 0 = as many as
  # num_validation_images needs, capped by device memory (4 on CPU).
  c.validation_batch_size = 0

  if variant == "sd15":
    pass
  elif variant == "sd21":
    c.pretrained_model_name_or_path = SD21
    c.resolution = 768
  elif variant == "sdxl":
    c.pretrained_model_name_or_path = SDXL
    c.resolution = 1024
    # diffusers' textual_inversion example's settings: lr 5e-4 scaled by the global
    # batch of 1 per device x 4 accumulation steps, 3000 steps. The paper's 5e-3 x batch
    # was tuned for LDM/SD 1.x at 512 px; SDXL's two encoders move further per step.
    c.train_batch_size = 1
    c.gradient_accumulation_steps = 4
    c.learning_rate = 5e-4
    c.max_train_steps = 3000
  elif variant in ("tiny", "tiny_sdxl"):
    c.pretrained_model_name_or_path = "tiny-sd15" if variant == "tiny" else "tiny-sdxl"
    c.dtype = "float32"
    c.resolution = 64
    c.train_batch_size = 2
    c.max_train_steps = 1000
    c.learning_rate = 5e-3
    c.checkpointing_steps = 250
    c.log_every_steps = 25
    c.validation_steps = 500
    c.num_validation_images = 2
    c.validation_inference_steps = 10
  elif variant == "world":
    c.pretrained_model_name_or_path = "tiny-world"
    c.dtype = "float32"
    c.resolution = 32  # the world's image size
    c.flip_p = 0.0  # the world has left and right: a flip would change the position
    # The world's caption openings ("a photo of a ..."): the paper's templates use
    # words its tokenizer has never seen.
    c.templates_file = "examples/world_templates.txt"
    # Any device count gives the same run. 32 rather than the paper's 8: the step is
    # cheap here and the larger batch (with the rate it scales) drew the cross in 0.91
    # of samples against 0.81 at 8 (captioned, guidance 7) (README, "The tiny world").
    c.global_batch_size = 32
    c.max_train_steps = 400
    # x global batch: 1.28e-3. The world's word rows are 64 wide with norms 0.16-0.4; the
    # paper's 5e-3 x 8 (0.04 a step) pushed S* to norm 5 and drew a cross in 0.38 of
    # samples, 4e-5 x 8 in 0.53 (uncaptioned; README, "The tiny world").
    c.learning_rate = 4e-5
    c.checkpointing_steps = 200
    c.log_every_steps = 25
    c.validation_steps = 400
    c.num_validation_images = 8
    c.validation_scheduler = "ddim"
    c.validation_inference_steps = 25
    c.validation_guidance_scale = 7.0  # the world's evaluation protocol (README)
  else:
    raise ValueError(f"unknown config variant {variant!r} (known: sd15, sd21, sdxl, tiny, "
                     "tiny_sdxl, world)")
  return c


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
