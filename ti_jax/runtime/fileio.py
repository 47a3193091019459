"""Run-directory file access that works for local paths and gs:// (via etils.epath).

Cloud TPU pods share a run directory on GCS. Object stores cannot append or
rename in place, so appends rewrite the object and atomic writes go through a
local temporary file.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
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


def list_names(path: str) -> list[str]:
  """The names of the entries of folder `path` (local or remote), sorted."""
  return sorted(p.name for p in epath.Path(path).iterdir())


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


# The most bytes `read_small_file` reads: far above any real prompt list, caption or run
# record, so that /dev/zero or a mistaken multi-GB file is refused in one line instead of
# exhausting memory.
MAX_TEXT_BYTES = 16 * 2**20

# What a path that is not a regular file is, for the refusal.
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
          (stat.S_ISSOCK, "a socket"))


def _mib(size: int) -> str:
  return f"{size / 2**20:.3g} MiB"


def _regular_file_stat(path: str) -> os.stat_result:
  """os.stat of the local `path`; OSError if it is not a regular file (a folder, a device,
  a named pipe or a socket), saying which in `strerror`."""
  info = os.stat(path)  # follows links: /dev/stdin is a link to a device or pipe
  if not stat.S_ISREG(info.st_mode):
    kind = next((k for test, k in _KINDS if test(info.st_mode)), "a special file")
    raise OSError(errno.EINVAL, f"{kind}, not a regular file", path)
  return info


def read_small_file(path: str, limit: int = MAX_TEXT_BYTES) -> bytes:
  """The bytes of the regular file `path` (local or remote), refused above `limit` bytes.

  For text inputs read whole (prompt lists, templates, captions, JSON records).

  Raises:
    OSError: the file cannot be read, is not a regular file (a device such as
      /dev/zero never ends, a named pipe can block forever), or holds more than
      `limit` bytes; `strerror` says which, in words.
  """
  if not is_remote(path):
    info = _regular_file_stat(path)
    if info.st_size > limit:
      raise OSError(errno.EFBIG, f"{_mib(info.st_size)}, more than the {_mib(limit)} a text "
                    "input may hold", path)
  with epath.Path(path).open("rb") as f:
    data = f.read(limit + 1)  # a file that grew (or a remote one) is cut off here
  if len(data) > limit:
    raise OSError(errno.EFBIG, f"more than the {_mib(limit)} a text input may hold", path)
  return data


def write_text(path: str, text: str) -> None:
  epath.Path(path).write_text(text)


def write_bytes(path: str, data: bytes) -> None:
  epath.Path(path).write_bytes(data)


def rename(src: str, dst: str) -> None:
  """Moves a file or folder (local, or within one remote store)."""
  epath.Path(src).rename(dst)


def write_via_local_file(path: str, writer) -> None:
  """Calls `writer(local_path)` and moves the result to `path` (local or remote).

  Locally the file is written beside `path` and renamed over it, so a crash
  or full disk leaves the previous file (or none), never a truncated one.
  """
  if not is_remote(path):
    # Beside the target (same file system, so the rename is atomic); the writer
    # creates it, so it gets the usual permissions.
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
      writer(tmp)
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise
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
    self._failed: OSError | None = None  # the error of a failed write: the log is closed
    if not enabled:
      return
    if exists(path):
      if not is_remote(path):
        _regular_file_stat(path)  # read whole below: a pipe would block, /dev/zero never end
      lines = [line if line.endswith("\n") else line + "\n"
               for line in read_text(path).splitlines(keepends=True) if line.strip()]

      def keep_line(line):  # a line cut off by a crash is dropped, not fatal
        try:
          return keep is None or keep(line)
        except ValueError:
          return False
      self._lines = [line for line in lines if keep_line(line)]
      text = "".join(self._lines)
      if text != read_text(path):  # rewritten only when lines were dropped or completed
        # Atomically: a crash while dropping lines must not lose the others.
        write_via_local_file(path, lambda local: write_text(local, text))
    if not is_remote(path):
      self._lines = []
      self._file = open(path, "a")  # pylint: disable=consider-using-with

  def write(self, line: str) -> None:
    """Appends `line` (ending in a newline) and flushes it; raises OSError if it cannot.

    After a failed write the log is closed: the caller reports that error, and a
    later `close` does not try (and fail) to write the same buffered text again.
    """
    if not self.enabled:
      return
    if self._failed is not None:
      raise self._failed
    if self._file is not None:
      try:
        self._file.write(line)
        self._file.flush()
      except OSError as e:
        self._failed = e
        self._discard()
        raise
    else:
      self._lines.append(line)
      write_text(self.path, "".join(self._lines))

  def close(self) -> None:
    """Closes the file (a no-op after a failed write)."""
    if self._file is not None:
      file, self._file = self._file, None
      file.close()

  def _discard(self) -> None:
    """Closes the file, dropping text it could not write (the close's own error ignored:
    the buffer it would retry is what just failed)."""
    file, self._file = self._file, None
    try:
      file.close()
    except OSError:
      pass


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


LOCK_NAME = "ti_jax.lock"


class LockHeld(Exception):
  """The directory's lock is held by another live process; `holder` is its record (may be {})."""

  def __init__(self, path: str, holder: dict):
    super().__init__(path)
    self.path, self.holder = path, holder


def _lock_record() -> dict:
  import socket  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "token": os.urandom(8).hex()}


def _parse_record(text: str) -> dict:
  import json  # pylint: disable=import-outside-toplevel
  try:
    record = json.loads(text)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def pid_alive(pid) -> bool:
  """True if a process with this id exists on this host."""
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  except (TypeError, ValueError, OverflowError):
    return False
  return True


def gcs_create_if_absent(path: str, data: bytes) -> bool:
  """Creates the gs:// object `path` only if no object has that name; False if one does.

  One request with the generation precondition `ifGenerationMatch=0`, so two
  processes racing for the same name cannot both succeed.
  """
  if not str(path).startswith("gs://"):
    raise OSError(f"cannot lock {path}: exclusive creation is only supported on local "
                  "paths and gs://")
  try:
    from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
    from google.cloud import storage  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise OSError(f"locking {path} needs the google-cloud-storage package "
                  "(pip install google-cloud-storage)") from None
  bucket, _, name = str(path)[len("gs://"):].partition("/")
  blob = storage.Client().bucket(bucket).blob(name)
  try:
    blob.upload_from_string(data, if_generation_match=0)
  except exceptions.PreconditionFailed:
    return False
  return True


class DirLock:
  """An exclusive lock on a directory, held until `release()` or until the process ends.

  Local paths use `fcntl.flock` on `<dir>/ti_jax.lock`: the kernel drops the
  lock when its holder dies, so a stale lock is taken over without any
  clean-up. The file also holds a JSON record (pid, host, start time) for the
  refusal message. On gs:// the lock is an object created with a generation
  precondition (only one creator can win); a record left by a dead process of
  this host is taken over, one of another host has to be deleted by hand.
  """

  def __init__(self, directory: str):
    self.path = join(directory, LOCK_NAME)
    self._fd = None
    self._token = None

  def acquire(self) -> None:
    """Takes the lock; raises LockHeld if another process holds it, OSError if it cannot."""
    record = _lock_record()
    import json  # pylint: disable=import-outside-toplevel
    data = json.dumps(record).encode()
    if not is_remote(self.path):
      import fcntl  # pylint: disable=import-outside-toplevel
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = _parse_record(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        os.close(fd)
        raise LockHeld(self.path, holder) from None
      except OSError:
        os.close(fd)
        raise
      os.ftruncate(fd, 0)
      os.pwrite(fd, data, 0)
      self._fd = fd
      return
    for _ in range(2):  # a second try after taking over a dead process's record
      if gcs_create_if_absent(self.path, data):
        self._token = record["token"]
        return
      try:
        holder = _parse_record(read_text(self.path))
      except FileNotFoundError:  # released between the two calls: try again
        continue
      if holder.get("host") != record["host"] or pid_alive(holder.get("pid")):
        raise LockHeld(self.path, holder)
      epath.Path(self.path).unlink(missing_ok=True)  # a dead process of this host held it
    raise LockHeld(self.path, {})

  def release(self) -> None:
    """Releases the lock (a no-op if it is not held)."""
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor drops the flock
      self._fd = None
    if self._token is not None:
      try:  # remove the object only while it is still this process's record
        if _parse_record(read_text(self.path)).get("token") == self._token:
          epath.Path(self.path).unlink(missing_ok=True)
      except FileNotFoundError:
        pass
      self._token = None


def read_text_lines(path: str, flag: str) -> list[str]:
  """The non-blank lines of a UTF-8 text file given by `flag`, stripped.

  Raises:
    ValueError: one line naming the flag for a missing file, a folder, a
      device or pipe, a file over `MAX_TEXT_BYTES`, a binary or
      non-UTF-8 file, or a read error.
  """
  if not path:
    raise ValueError(f"{flag} is empty: give a text file with one prompt per line")
  try:
    if not exists(path):
      raise ValueError(f"{flag} {path} does not exist")
    if is_dir(path):
      raise ValueError(f"{flag} {path} is a folder, not a text file")
    data = read_small_file(path)
  except OSError as e:
    raise ValueError(f"cannot read {flag} {path}: {e.strerror or e}") from None
  if b"\0" in data:  # text never holds NUL bytes; images, archives and weights do
    raise ValueError(f"{flag} {path} is a binary file, not text with one prompt per line")
  try:
    text = data.decode("utf-8-sig")  # tolerate the byte-order mark some editors write
  except UnicodeDecodeError as e:
    raise ValueError(f"{flag} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                     f"{e.start}); save it as UTF-8") from None
  return [line.strip() for line in text.splitlines() if line.strip()]
