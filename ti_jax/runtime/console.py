"""What a run says on stderr: status lines (`log`) and exceptions shortened to one line.

The one home of both, in the bottom layer, so that library code at every level
reports the same way without importing the entry points' flag plumbing (`ti_jax.cli`).
"""

from __future__ import annotations

import re
import sys

import jax
from tqdm.auto import tqdm


def log(msg: str) -> None:
  """A status line on stderr from process 0 only, without breaking an active progress bar."""
  if jax.process_index() != 0:  # one voice for a multi-host run
    return
  tqdm.write(msg, file=sys.stderr)


def one_line(e: BaseException, *, last: bool = False, limit: int | None = None) -> str:
  """An exception as one line: `Type: message line`, or just `Type` for an empty message.

  By default the message's first non-blank line is kept (a wrapped library
  error's headline). `last=True` keeps its last non-blank line instead, for
  messages that embed a traceback, whose last line says what went wrong (and
  already names the type, which is then not repeated). `limit` cuts the result
  to at most that many characters, ending in "...".
  """
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  name = type(e).__name__
  if not lines:
    return name
  if last:
    text = lines[-1] if lines[-1].startswith(f"{name}:") else f"{name}: {lines[-1]}"
  else:
    text = f"{name}: {lines[0]}"
  return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def flatten(text: str) -> str:
  """Text on one line: line breaks (e.g. from a path or a library error) collapse into spaces."""
  return re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip()
