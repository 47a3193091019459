"""The paper's experiment (Gal et al. 2022) and its ablations, on LDM-1.4B or SD 1.5.

  python -m ti_jax.train --config configs/paper.py:ldm,object --workdir runs/paper/cat \
      --config.train_data_dir=path/to/cat_statue --config.initializer_token=sculpture

The argument after ":" is a comma-separated list of up to three words:
  model     ldm (default): the paper's LDM-1.4B, "CompVis/ldm-text2im-large-256", 256 px.
            sd15: Stable Diffusion 1.5 at 512 px with the same hyper-parameters.
            tiny: ti_jax's offline random-weight LDM ("tiny-ldm") on examples/, 64 px.
            world: the trained offline tiny-world on its held-out shape (examples/world-cross),
                   32 px, 400 steps; score it with `ti_jax.evaluate` (the world's checker).
                   Object only: the world's captions never name a style.
  property  object (default) or style: the training prompt templates.
  ablation  one of the paper's variants (default: none, the paper's main setup):
            two_words, three_words  S* is 2 or 3 vectors (the "extended latent space").
            progressive  starts with one vector and adds one every 2,000 steps, up to 3.
            per_image    a token S_i per training image, in a quarter of the prompts.
            regularized  pulls S* toward its initializer word: embedding_reg_weight 0.01
                         (the paper gives no weight; 0.01 is ti_jax's choice).
            lr_high, lr_low  base learning rate 2e-2 or 1e-4 instead of 5e-3.

The paper trains for 5,000 steps with a batch of 4 on each of 2 GPUs and a base
learning rate of 5e-3 scaled by that global batch of 8 (0.04). The global batch
is fixed here (`global_batch_size`), so any device count reproduces it when it
divides 8 (1, 2, 4 or 8 devices); on others set `--config.global_batch_size`.
"""

from ti_jax.training import config

LDM = "CompVis/ldm-text2im-large-256"
MODELS = ("ldm", "sd15", "tiny", "world")
PROPERTIES = ("object", "style")
ABLATIONS = ("none", "two_words", "three_words", "progressive", "per_image", "regularized",
             "lr_high", "lr_low")


def _parse(arg: str) -> tuple[str, str, str]:
  chosen = {}
  kinds = {"model": MODELS, "property": PROPERTIES, "ablation": ABLATIONS}
  for word in filter(None, (w.strip() for w in (arg or "").split(","))):
    kind = next((k for k, words in kinds.items() if word in words), None)
    if kind is None:
      raise ValueError(f"unknown word {word!r} in configs/paper.py:{arg} (models: "
                       f"{', '.join(MODELS)}; properties: {', '.join(PROPERTIES)}; "
                       f"ablations: {', '.join(ABLATIONS)})")
    if kind in chosen:
      raise ValueError(f"configs/paper.py:{arg} names two {kind}s ({chosen[kind]!r} and "
                       f"{word!r}); give one (ablations are run one at a time)")
    chosen[kind] = word
  return chosen.get("model", "ldm"), chosen.get("property", "object"), chosen.get("ablation", "none")


def get_config(arg: str = "ldm,object"):
  """The paper's setup for `arg` = "model,property,ablation" (each optional, any order)."""
  model, prop, ablation = _parse(arg)
  if model == "world" and prop == "style":
    raise ValueError(f"configs/paper.py:{arg}: the world model learns objects only (its "
                     "captions never name a style)")
  # The paper's initializers: a coarse descriptor of the object, "painting" for styles.
  c = config.concept_config(
      model if model in ("tiny", "world") else "sd15", prop, "<S*>",
      "painting" if prop == "style" else "sculpture",
      "a painting of a fox in the style of {}" if prop == "style" else "a photo of {} on the beach",
      world=config.WORLD_OBJECT)

  # --- The paper's hyper-parameters ---
  c.global_batch_size = 8  # 4 per GPU on 2 GPUs
  c.learning_rate = 5e-3  # base rate, scaled by the global batch: 0.04
  c.scale_lr = True
  c.lr_scheduler = "constant"
  c.max_train_steps = 5000
  c.num_vectors = 1
  c.flip_p = 0.5
  c.adam_weight_decay = 1e-2  # torch.optim.AdamW's default, which the paper's code uses
  c.checkpointing_steps = 500
  c.validation_steps = 1000
  c.validation_scheduler = "ddim"  # the paper samples with 50 DDIM steps
  c.validation_inference_steps = 50
  c.validation_guidance_scale = 5.0

  if model == "ldm":
    c.pretrained_model_name_or_path = LDM
    c.resolution = 256
  elif model == "sd15":
    c.resolution = 512
  elif model == "world":  # the paper's batch and rate; the world variant's length, flips, sampler
    world = config.get_config("world")
    for key in ("flip_p", "max_train_steps", "checkpointing_steps", "validation_steps",
                "validation_inference_steps", "validation_guidance_scale"):
      c[key] = world[key]
  else:  # tiny: the offline exercise of the same code path
    c.pretrained_model_name_or_path = "tiny-ldm"
    c.train_data_dir = "examples/style" if prop == "style" else "examples/toy"
    c.initializer_token = "painting" if prop == "style" else "toy"
    c.resolution = 64
    c.max_train_steps = 400
    c.checkpointing_steps = 200
    c.validation_steps = 400
    c.validation_inference_steps = 10

  if ablation == "two_words":
    c.num_vectors = 2
  elif ablation == "three_words":
    c.num_vectors = 3
  elif ablation == "progressive":
    c.num_vectors = 3
    c.progressive_words = 2000 if model not in ("tiny", "world") else 100
  elif ablation == "per_image":
    c.per_image_tokens = True
    c.per_image_token_p = 0.25
  elif ablation == "regularized":
    c.embedding_reg_weight = 0.01
  elif ablation == "lr_high":
    c.learning_rate = 2e-2
  elif ablation == "lr_low":
    c.learning_rate = 1e-4
  return c
