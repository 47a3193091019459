"""Learn a style (an artist's look) as a pseudo-word.

  python -m ti_jax.train --config configs/style.py --workdir runs/style \
      --config.train_data_dir=path/to/paintings --config.placeholder_token='<my-style>'

Variants: `:sd15` (default), `:sd21`, `:tiny` (offline demo on examples/style).
"""

from ti_jax.training import defaults


def get_config(variant: str = "sd15"):
  c = defaults.get_config(variant or "sd15")
  c.learnable_property = "style"  # style templates: "a painting in the style of {}", ...
  c.placeholder_token = "<style>"
  c.initializer_token = "painting"  # the paper's initializer for styles
  c.validation_prompt = "a painting of a fox in the style of {}"
  if variant == "tiny":
    c.train_data_dir = "examples/style"
  return c
