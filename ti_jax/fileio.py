"""Run-directory file access that works for local paths and gs:// (via etils.epath).

Cloud TPU pods share a run directory on GCS. Object stores cannot append or
rename in place, so appends rewrite the object and atomic writes go through a
local temporary file.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from etils import epath


def is_remote(path: str) -> bool:
  return "://" in str(path)


def resolve(path: str) -> str:
  """Absolute local path, or the remote URL unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(os.path.expanduser(str(path)))


def join(*parts: str) -> str:
  return str(epath.Path(parts[0]).joinpath(*parts[1:])) if is_remote(parts[0]) else os.path.join(*parts)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def is_dir(path: str) -> bool:
  return epath.Path(path).is_dir()


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def write_text(path: str, text: str) -> None:
  epath.Path(path).write_text(text)


def write_bytes(path: str, data: bytes) -> None:
  epath.Path(path).write_bytes(data)


def write_via_local_file(path: str, writer) -> None:
  """Calls `writer(local_path)` and moves the result to `path` (local or remote)."""
  if not is_remote(path):
    writer(path)
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, os.path.basename(path))
    writer(local)
    with open(local, "rb") as f:
      epath.Path(path).write_bytes(f.read())


class LineLog:
  """An append-only text log (metrics.jsonl): appends locally, rewrites remote objects."""

  def __init__(self, path: str, enabled: bool = True, keep=None):
    """`keep(line) -> bool` filters the lines already in the file (e.g. after a resume)."""
    self.path, self.enabled = path, enabled
    self._lines: list[str] = []
    self._file = None
    if not enabled:
      return
    if exists(path):
      lines = [line if line.endswith("\n") else line + "\n"
               for line in read_text(path).splitlines(keepends=True) if line.strip()]

      def keep_line(line):  # a line cut off by a crash is dropped, not fatal
        try:
          return keep is None or keep(line)
        except ValueError:
          return False
      self._lines = [line for line in lines if keep_line(line)]
      write_text(path, "".join(self._lines))
    if not is_remote(path):
      self._lines = []
      self._file = open(path, "a")  # pylint: disable=consider-using-with

  def write(self, line: str) -> None:
    if not self.enabled:
      return
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      write_text(self.path, "".join(self._lines))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


def copy_tree_to_local(src: str, dst: str) -> None:
  """Copies a (possibly remote) folder to a local path."""
  if not is_remote(src):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return
  for item in epath.Path(src).rglob("*"):
    if item.is_file():
      target = os.path.join(dst, os.path.relpath(str(item), src))
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with open(target, "wb") as f:
        f.write(item.read_bytes())
