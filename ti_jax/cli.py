"""Command-line plumbing shared by the entry points: flag parsing with one-line errors."""

from __future__ import annotations

import sys
from typing import Sequence



def flags_parser(argv: Sequence[str]) -> list[str]:
  """Parses absl flags; a bad flag or config override prints one `error:` line and exits 2.

  Pass as `app.run(main, flags_parser=flags_parser)`. Without it, an unknown
  `--config.field` surfaces as a Python traceback from ml_collections.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    return flags.FLAGS(list(argv))
  except (AttributeError, KeyError) as e:  # ml_collections: unknown config field
    field = str(e).strip("\"'")
    message = f"unknown config field {field} (the config file lists every field)"
  except (flags.Error, TypeError, ValueError) as e:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    # Config-file errors embed a traceback: its last line says what went wrong.
    message = lines[-1] if any(l.startswith("Traceback") for l in lines) else " ".join(lines[:1])
    message = message or type(e).__name__
  sys.stderr.write(f"error: {message}\nRun with --help for the flags.\n")
  sys.exit(2)


def config_or_exit(flag_values, name: str = "config"):
  """The parsed config of a `DEFINE_config_file` flag; a file that failed to load exits with one line.

  ml_collections defers config-file errors (missing file, exception in
  get_config) until the config is first used, and then raises with a
  traceback; this surfaces them as `error: ...` instead.
  """
  config = flag_values[name].value
  try:
    config.keys()  # the first access raises the deferred load error, if any
  except (OSError, AttributeError) as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = lines[-1] if lines else type(e).__name__
    sys.stderr.write(f"error: cannot load --{name} file: {detail}\n")
    sys.exit(2)
  return config


def start(argv: Sequence[str]):
  """Common start of an entry point's main(): no stray arguments, quiet library logs.

  Returns absl's FLAGS.
  """
  from absl import flags, logging  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f["verbosity"].present:  # Orbax and JAX log every save at INFO; keep the output readable
    logging.set_verbosity(logging.WARNING)
  return f


def log(msg: str) -> None:
  """A status line on stderr from process 0 only, without breaking an active progress bar."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:  # one voice for a multi-host run
    return
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  tqdm.write(msg, file=sys.stderr)
