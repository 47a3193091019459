"""Learn a style (an artist's look) as a pseudo-word.

  python -m ti_jax.train --config configs/style.py --workdir runs/style \
      --config.train_data_dir=path/to/paintings --config.placeholder_token='<my-style>'

Variants: `:sd15` (default), `:sd21`, `:sdxl` (SDXL base, 1024 px), `:tiny` (offline
demo on examples/style), `:tiny_sdxl` (the same on a tiny SDXL).
"""

from ti_jax.training import config


def get_config(variant: str = "sd15"):
  """Style config for `variant` (sd15, sd21, sdxl, tiny or tiny_sdxl)."""
  # Style templates ("a painting in the style of {}", ...); "painting" is the
  # paper's initializer for styles.
  return config.concept_config(variant, "style", "<style>", "painting",
                               "a painting of a fox in the style of {}",
                               tiny={"train_data_dir": "examples/style"})
