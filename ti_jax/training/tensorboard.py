"""TensorBoard event files of a run (`report_to="tensorboard"`): WORKDIR/tensorboard.

`open_writer` is called at start-up (`trainer.open_tensorboard`: a folder that
cannot take the event file is refused in one line); the training loop hands
every metrics record to `Writer.scalars` beside metrics.jsonl and validation
hands its grids to `Writer.image`. The events are written with tensorboardX's
record format and summaries (no TensorFlow), synchronously, so
`tensorboard --logdir WORKDIR/tensorboard` shows them. A write that fails later
(a full disk) turns the writer off with one warning line; training goes on.

Resuming: each run of a workdir writes a new event file that starts with a
"purge" marker at the resumed step + 1. TensorBoard drops every event of the
older files at or after that step (a killed run may have logged steps that the
resumed run redoes), so each step is shown once. `read_events` applies the same
rule, and is how tests (and users without TensorBoard) read the files back.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import struct
import time

import numpy as np

from ti_jax import errors
from ti_jax.runtime import console, fileio

REPORT_TO = ("", "tensorboard")  # config.report_to's choices ("" = metrics.jsonl only)
SUBDIR = "tensorboard"


class TensorBoardError(errors.UserError):
  """The TensorBoard writer cannot start (its package is missing, its folder is unusable);
  one-line message."""


# Seconds between flushes of the event file (each flush also fsyncs it).
FLUSH_SECS = 30


class Writer:
  """Scalars and images of one run's process 0 into a new event file in `logdir`.

  The events are written synchronously, in the caller's thread. tensorboardX's
  SummaryWriter writes from a thread of its own, which dies at the first failed
  write (a full disk, a folder made read-only); the next calls then block forever
  on its full queue and the run hangs. Here a failure after start-up prints one
  warning line and turns the writer off: TensorBoard is a side channel, and
  training, checkpoints and metrics.jsonl go on without it. No call ever raises.
  """

  def __init__(self, logdir: str, start: int):
    """Opens the event file; raises TensorBoardError (one line) if it cannot be written."""
    try:
      # Imported here: tensorboardX imports torch when installed (about a second), which
      # runs without TensorBoard should not pay.
      import tensorboardX  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise TensorBoardError("config.report_to='tensorboard' needs the tensorboardX package: "
                             "pip install tensorboardX") from None
    self._summary = tensorboardX.summary
    self._event = tensorboardX.proto.event_pb2.Event
    session_log = tensorboardX.proto.event_pb2.SessionLog
    self.logdir = logdir
    # tensorboardX's file name; the suffix keeps two writers of the same second and host
    # in separate files (and tells `read_events` the step each resumed at).
    self.path = fileio.join(logdir, f"events.out.tfevents.{int(time.time())}."
                                    f"{socket.gethostname()}.start{start}.{os.getpid()}")
    self._records = None  # tensorboardX's RecordWriter (TFRecord framing); None once off
    try:
      tensorboardX.record_writer.directory_check(logdir)  # creates a local folder
      self._records = tensorboardX.record_writer.RecordWriter(self.path)
      self._put(self._event(wall_time=time.time(), file_version="brain.Event:2"))
      if start:
        # TensorBoard forgets the older files' events from start + 1 on (what
        # SummaryWriter's purge_step writes).
        self._put(self._event(wall_time=time.time(), step=start + 1,
                              file_version="brain.Event:2"))
        self._put(self._event(wall_time=time.time(), step=start + 1,
                              session_log=session_log(status=session_log.START)))
      self._flush()  # a folder that cannot take the file fails here, at start-up
    except Exception as e:  # pylint: disable=broad-except  # OSError; a gs:// client's own errors
      self._discard()
      raise TensorBoardError(
          f"cannot write TensorBoard events to {logdir}: {console.one_line(e, limit=300)}; "
          "make it a "
          "writable folder or set config.report_to='' (metrics.jsonl keeps every logged "
          "step)") from None

  @property
  def active(self) -> bool:
    """False once a write has failed (the writer is then off)."""
    return self._records is not None

  def scalars(self, step: int, record: dict, prefix: str = "train/") -> None:
    """Every number of a metrics.jsonl record but its step and wall time, as <prefix><key>
    (train/<key>; a run of many concepts: <concept>/train/<key>)."""
    for key, value in record.items():
      if key not in ("step", "time") and isinstance(value, (int, float)):
        self._write(step, lambda k=key, v=value: self._summary.scalar(f"{prefix}{k}", float(v)))

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """One uint8 `[H, W, 3]` image under `tag`."""
    self._write(step, lambda: self._summary.image(tag, image, dataformats="HWC"))

  def text(self, step: int, tag: str, text: str) -> None:
    """One text under `tag` (shown as `tag/text_summary`)."""
    self._write(step, lambda: self._summary.text(tag, text))

  def flush(self) -> None:
    """Writes the buffered events to the file (and fsyncs it)."""
    self._guarded(None, self._flush)

  def close(self) -> None:
    """Flushes and closes the event file; a no-op once off."""
    if self._guarded(None, self._flush):
      self._discard()

  def _write(self, step: int, summary) -> None:
    """Appends the event of `summary()` at `step`; flushes every FLUSH_SECS."""
    def write():
      self._put(self._event(summary=summary(), wall_time=time.time(), step=int(step)))
      if time.monotonic() >= self._next_flush:
        self._flush()
    self._guarded(step, write)

  def _put(self, event) -> None:
    self._records.write(event.SerializeToString())

  def _flush(self) -> None:
    self._records.flush()
    self._next_flush = time.monotonic() + FLUSH_SECS

  def _guarded(self, step: int | None, action) -> bool:
    """Runs `action` unless off; on its first failure warns in one line and turns off.
    Returns whether it ran and succeeded."""
    if self._records is None:
      return False
    try:
      action()
    except Exception as e:  # pylint: disable=broad-except  # a side channel never stops training
      self._discard()
      at = f" at step {step}" if step is not None else ""
      console.log(f"warning: TensorBoard is off from here on: cannot write its events{at} to "
              f"{self.logdir}: {console.one_line(e, limit=300)}; training goes on (metrics.jsonl "
              "keeps every logged step)")
      return False
    return True

  def _discard(self) -> None:
    """Closes the event file, dropping what it could not write (errors ignored)."""
    records, self._records = self._records, None
    if records is None:
      return
    try:
      # The file's buffer would be written again (and fail again, printing a traceback)
      # when it is garbage collected; closing it here, errors ignored, ends that.
      records.close()
    except Exception:  # pylint: disable=broad-except
      pass


def open_writer(report_to: str, workdir: str, start: int, enabled: bool) -> Writer | None:
  """The run's writer if `report_to` is "tensorboard" and `enabled` (process 0), else None.

  Raises TensorBoardError (one line) if WORKDIR/tensorboard cannot take an event file.
  """
  if report_to != "tensorboard" or not enabled:
    return None
  return Writer(fileio.join(workdir, SUBDIR), start)


# ---------------------------------------------------------------------------
# Reading events back.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Events:
  """What a TensorBoard log directory shows, each list in step order."""
  scalars: dict[str, list[tuple[int, float]]]  # tag -> [(step, value)]
  images: dict[str, list[tuple[int, bytes]]]  # tag -> [(step, encoded PNG)]
  texts: dict[str, list[tuple[int, str]]]  # tag -> [(step, text)]


def _records(path: str):
  """The payloads of a TFRecord file (length, length crc, payload, payload crc)."""
  data = fileio.read_bytes(path)
  pos = 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    if pos + 12 + length + 4 > len(data):  # a record cut short by a kill: the file ends here
      return
    yield data[pos + 12:pos + 12 + length]
    pos += 12 + length + 4


def _written_order(name: str) -> tuple[int, int, str]:
  """Sort key of an event file name: its creation second, then the step its run resumed at."""
  created = re.search(r"\.tfevents\.(\d+)", name)
  start = re.search(r"\.start(\d+)\.", name)
  return (int(created.group(1)) if created else 0, int(start.group(1)) if start else 0, name)


def read_events(logdir: str) -> Events:
  """The scalars, images and texts in the event files of the local folder `logdir`, files read
  in the order written; a purge marker drops earlier events at or after its step (as
  TensorBoard does)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  names = sorted((n for n in os.listdir(logdir) if ".tfevents." in n), key=_written_order)
  seen: list[tuple[int, str, str, object]] = []  # (step, kind, tag, value) in written order
  for name in names:
    for payload in _records(os.path.join(logdir, name)):
      event = event_pb2.Event.FromString(payload)
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        seen = [e for e in seen if e[0] < event.step]
      for v in event.summary.value:
        if v.HasField("simple_value"):
          seen.append((event.step, "scalars", v.tag, float(v.simple_value)))
        elif v.HasField("image"):
          seen.append((event.step, "images", v.tag, bytes(v.image.encoded_image_string)))
        elif v.metadata.plugin_data.plugin_name == "text":
          seen.append((event.step, "texts", v.tag.removesuffix("/text_summary"),
                       v.tensor.string_val[0].decode("utf-8")))
  out = Events(scalars={}, images={}, texts={})
  for step, kind, tag, value in sorted(seen, key=lambda e: e[0]):
    getattr(out, kind).setdefault(tag, []).append((step, value))
  return out
