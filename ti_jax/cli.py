"""Command-line plumbing shared by the entry points: flag parsing with one-line errors."""

from __future__ import annotations

import contextlib
import functools
import logging as _std_logging
import os
import re
import sys
import types
from typing import Sequence

from absl import flags, logging

from ti_jax import errors
from ti_jax.runtime import console

# absl's help flags exit with status 1; asking for help is not an error.
_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


class _NoTorchNotice(_std_logging.Filter):
  """Drops transformers' "PyTorch was not found" notice: ti_jax uses only its tokenizers."""

  def filter(self, record: _std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith("PyTorch was not found")


def quiet_transformers() -> None:
  """Keeps transformers' import-time torch notice off a CPU-only install's stderr.

  The notice is logged by the "transformers" logger itself when the package is
  first imported, so a filter on that logger (set before any import) drops it
  and leaves every other transformers warning alone.
  """
  logger = _std_logging.getLogger("transformers")
  if not any(isinstance(f, _NoTorchNotice) for f in logger.filters):
    logger.addFilter(_NoTorchNotice())


quiet_transformers()  # every entry point imports this module before transformers


class _ConfigFileError(Exception):
  """A `DEFINE_config_file` file that cannot be loaded (not a flag-value error)."""


def _describe_config_failure(path: str, e: BaseException) -> str:
  """What went wrong loading config file `path` (`FILE[:ARG]`), in one line."""
  file = path.split(":", 1)[0]
  if not file:
    return "--config is empty: give a config file such as configs/object.py"
  if not os.path.exists(file):
    return f"config file not found: {file}"
  if os.path.isdir(file):
    return f"config file {file} is a directory, not a .py file"
  if isinstance(e, SyntaxError):  # also null bytes and undecodable (non-UTF-8) source
    where = f", line {e.lineno}" if e.lineno else ""
    return f"config file {file} is not valid Python ({e.msg}{where})"
  if isinstance(e, AttributeError) and getattr(e, "name", None) == "get_config":
    return f"config file {file} defines no get_config() function"
  tb, in_get_config = e.__traceback__, False
  while tb is not None:  # the user's get_config raised, rather than the import
    in_get_config |= tb.tb_frame.f_code.co_name == "get_config"
    tb = tb.tb_next
  # ml_collections re-raises TypeError/ValueError with the traceback as the message.
  in_get_config |= "in get_config" in str(e)
  if in_get_config:
    return f"get_config() of config file {file} raised {console.one_line(e, last=True)}"
  return f"cannot load config file {file}: {console.one_line(e, last=True)}"


def _guard_config_file_flags(flag_values) -> None:
  """Makes every config-file flag raise `_ConfigFileError` when its file fails to load.

  ml_collections lets most load errors (a syntax error, a missing get_config,
  an exception inside it) escape flag parsing as tracebacks, turns some into
  absl flag errors holding a whole traceback, and defers others (a missing
  file) until the config is first used. Checking at parse time gives one line
  for all of them.
  """
  for name in list(flag_values):
    parser = flag_values[name].parser
    # Matched by class name: ml_collections does not export the class.
    if type(parser).__name__ != "ConfigFileFlagParser" or getattr(parser, "_ti_jax_guarded", False):
      continue
    original = parser.parse

    def parse(path, original=original):
      verbosity = logging.get_verbosity()
      logging.set_verbosity(logging.ERROR)  # its "returned None" warning: reported below instead
      try:
        config = original(path)
        if config is None:
          raise _ConfigFileError(f"get_config() of config file {path.split(':', 1)[0]} "
                                 "returned None (a missing return statement?)")
        config.keys()  # a deferred load error (missing file) raises here
      except _ConfigFileError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # any failure of user code
        raise _ConfigFileError(_describe_config_failure(path, e)) from None
      finally:
        logging.set_verbosity(verbosity)
      return config
    parser.parse = parse
    parser._ti_jax_guarded = True  # pylint: disable=protected-access


def _help_requested(argv: Sequence[str]) -> bool:
  for arg in argv[1:]:
    if arg == "--":
      break
    name = arg.lstrip("-").split("=", 1)[0]
    if arg.startswith("-") and name in _HELP_FLAGS and not arg.endswith(("=false", "=0")):
      return True
  return False


def _unknown_field_message(e: BaseException) -> str:
  """One line for ml_collections' unknown-field error (an AttributeError wrapping a KeyError)."""
  # str() of a KeyError is the repr of its message (quotes and \n escaped), so the
  # innermost message is used as it is.
  inner = e
  while isinstance(inner, BaseException) and inner.args:
    inner = inner.args[0]
  lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
  first = lines[0] if lines else type(e).__name__
  match = re.match(r'Key "([^"]+)" does not exist', first)
  field = match.group(1) if match else first.strip("\"'")
  hints = [l for l in lines[1:] if l.startswith("Did you mean")]
  hint = f" ({hints[0]})" if hints else ""
  return f"unknown config field {field}{hint}; the config file lists every field"


def flags_parser(argv: Sequence[str], flag_values=None) -> list[str]:
  """Parses absl flags; a bad flag, config file or override prints one `error:` line, exits 2.

  Pass as `app.run(main, flags_parser=flags_parser)`. Without it, an unknown
  `--config.field` surfaces as a Python traceback from ml_collections, and
  `--help` exits with status 1 (absl's default); here it exits 0.
  `flag_values` defaults to absl's FLAGS.
  """
  flag_values = flags.FLAGS if flag_values is None else flag_values
  _guard_config_file_flags(flag_values)
  try:
    return flag_values(list(argv))
  except SystemExit as e:
    # absl's help flags print the usage and exit 1 while parsing.
    if e.code == 1 and _help_requested(argv):
      sys.exit(0)
    raise
  except _ConfigFileError as e:
    message = str(e)
  except (AttributeError, KeyError) as e:  # ml_collections: unknown config field
    message = _unknown_field_message(e)
  except (flags.Error, TypeError, ValueError) as e:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    # Config-file errors embed a traceback: its last line says what went wrong.
    message = lines[-1] if any(l.startswith("Traceback") for l in lines) else " ".join(lines[:1])
    message = f"{message or type(e).__name__} (--help lists the flags)"
  sys.stderr.write(f"error: {message}\n")  # one line, as for every other bad input
  sys.exit(2)


def config_or_exit(flag_values, name: str = "config"):
  """The parsed config of a `DEFINE_config_file` flag; a file that failed to load exits with one line.

  ml_collections defers config-file errors (missing file, exception in
  get_config) until the config is first used, and then raises with a
  traceback; this surfaces them as `error: ...` instead (`flags_parser`
  already reports most of them while parsing).
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
  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f["verbosity"].present:  # Orbax and JAX log every save at INFO; keep the output readable
    logging.set_verbosity(logging.WARNING)
  return f


def exit_now(message: str, code: int) -> None:
  """Prints one line and ends the process at once.

  os._exit rather than SystemExit: after a failed write, a library thread
  (Orbax's, the distributed client's) may still be waiting for a signal that
  will never come, and a normal interpreter exit joins such threads forever.
  Every file this run writes is complete or absent by now.
  """
  sys.stdout.flush()
  sys.stderr.write(message + "\n")
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def define_generation_flags(flag_values=None) -> None:
  """The flags `ti_jax.sample` and `ti_jax.edit` share: concepts, base model and sampler.

  Each entry point adds its own (prompts, image and mask, sizes, outputs, batch)."""
  fv = flags.FLAGS if flag_values is None else flag_values
  # Filed under the entry point's own module, so its --help (not only --helpfull) lists them.
  defines = {name: functools.partial(getattr(flags, name), flag_values=fv, module_name=sys.argv[0])
             for name in ("DEFINE_string", "DEFINE_integer", "DEFINE_multi_string",
                          "DEFINE_float", "DEFINE_bool", "DEFINE_enum")}
  shared = types.SimpleNamespace(**defines)
  shared.DEFINE_string("workdir", None, "Training run whose concept to use (its newest "
                      "checkpoint).")
  shared.DEFINE_integer("step", None, "Use the checkpoint of this step instead of the newest.")
  shared.DEFINE_multi_string("embeddings", [], "More concepts: run directories or embedding "
                            "files (diffusers, A1111 .pt/.safetensors, kohya), as PATH or "
                            "PATH:TOKEN to choose the token. Repeatable.")
  shared.DEFINE_string("negative_prompt", "", "Prompt for classifier-free guidance's "
                      "unconditional half (what to steer away from).")
  shared.DEFINE_integer("num_inference_steps", None, "Denoising steps (default: 50; "
                        "FLUX.1-dev 28, FLUX.1-schnell 4, as FluxPipeline).")
  shared.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (1 = off; "
                      "default 7.5). FLUX.1-dev: the value its guidance embedding is given "
                      "(default 3.5; no classifier-free guidance).")
  shared.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale (Lin et al. 2023, "
                     "diffusers' name): 0 = off; 0.7 counters over-exposed guided images. "
                     "Every model family.")
  shared.DEFINE_string("scheduler", "ddim", "Sampler: ddim, pndm, euler or dpm++2m.",)
  shared.DEFINE_string("pretrained_model_name_or_path", "", "Base model to use instead of the "
                      "one recorded in the checkpoint.")
  shared.DEFINE_bool("allow_base_model_mismatch", False, "Use embeddings trained on another "
                    "base model of the same width.")
  shared.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "UNet/text encoder "
                    "dtype (auto: float32 on CPU, bfloat16 on GPU/TPU). The VAE runs in "
                    "float32.")
  shared.DEFINE_bool("allow_pickle", False, "Permit the base model's .bin pickles (they can "
                    "run code) when it has no safetensors.")
  shared.DEFINE_string("cache_dir", "", "Where tiny test models live (default: the run's).",)


@contextlib.contextmanager
def one_line_errors():
  """Turns a user error, or a path the file system refuses, into one `error:` line and exit 1."""
  try:
    yield
  except errors.UserError as e:
    raise SystemExit(f"error: {e}") from None
  except OSError as e:  # the file system refused: a path flag names something unusable
    raise SystemExit(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}") from None
