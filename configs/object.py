"""Learn an object (a toy, a pet, a statue) as a pseudo-word.

  python -m ti_jax.train --config configs/object.py --workdir runs/toy \
      --config.train_data_dir=path/to/images --config.placeholder_token='<my-toy>' \
      --config.initializer_token=toy

Variants: `:sd15` (default), `:sd21`, `:sdxl` (SDXL base, 1024 px), `:tiny` (offline
demo on examples/toy), `:tiny_sdxl` (the same on a tiny SDXL), `:world` (textual inversion
of the world's held-out shape, examples/world-cross, on the shipped trained tiny-world).
"""

from ti_jax.training import config


def get_config(variant: str = "sd15"):
  """Object config for `variant` (sd15, sd21, sdxl, tiny, tiny_sdxl or world)."""
  # Object templates ("a photo of a {}", ...); "sculpture" is a coarse word for
  # the object: prefer your own ("toy", "cat").
  return config.concept_config(
      variant, "object", "<concept>", "sculpture", "a photo of a {} on the beach",
      tiny={"train_data_dir": "examples/toy", "placeholder_token": "<toy>",
            "initializer_token": "toy"},
      world=dict(config.WORLD_OBJECT, placeholder_token="<S*>",
                 validation_prompts=("a photo of {} on a green background",)))
