"""TRANSITION (issue 29, branch `split`): what the training rooms raise and check of the config.

The config branch moves `trainer.py`'s config checks here (`validate_config`,
`ConfigError`, the `MAX_*` limits, with `defaults.py` and the identity tables of
`checkpointing.py`). Until that lands, this file holds only what `inputs`,
`concept` and `loop` need without importing `trainer` (which imports them), and
`trainer.ConfigError` is bound to this class. At the merge: take the config
branch's file (it defines the same three names) and drop trainer's binding line.
"""

from __future__ import annotations

from ti_jax import errors


class ConfigError(errors.UserError):
  """A config value is out of range; one-line message."""


# Examples per optimizer step (per-device batch x devices x accumulation steps). The host
# draws every example's view and template each step (about a second for this many) and
# builds its token ids; nothing trains usefully at more.
MAX_EXAMPLES_PER_STEP = 2**16

# A learned vector whose L2 norm exceeds this many times the largest norm of the
# model's token table (or of the initial vectors) has diverged: the text encoder
# has never seen inputs of that size. Normal runs stay within about 10x.
MAX_NORM_FACTOR = 1000.0
