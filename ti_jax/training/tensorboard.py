"""TensorBoard event files of a run (`report_to="tensorboard"`): WORKDIR/tensorboard.

`open_writer` is called by the training loop beside metrics.jsonl; the loop
hands every metrics record to `Writer.scalars` and validation hands its grids
to `Writer.image`. The events are written with tensorboardX (no TensorFlow),
so `tensorboard --logdir WORKDIR/tensorboard` shows them.

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
import struct

import numpy as np

from ti_jax import errors
from ti_jax.runtime import fileio

REPORT_TO = ("", "tensorboard")  # config.report_to's choices ("" = metrics.jsonl only)
SUBDIR = "tensorboard"


class TensorBoardError(errors.UserError):
  """The TensorBoard writer cannot be used (its package is missing); one-line message."""


class Writer:
  """Scalars and images of one run's process 0 into a new event file in `logdir`."""

  def __init__(self, logdir: str, start: int):
    try:
      import tensorboardX  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise TensorBoardError("config.report_to='tensorboard' needs the tensorboardX package: "
                             "pip install tensorboardX") from None
    # purge_step: TensorBoard forgets the older files' events from start + 1 on. The
    # suffix keeps two writers of the same second and host in separate files.
    self._writer = tensorboardX.SummaryWriter(
        logdir, purge_step=start + 1 if start else None, flush_secs=30,
        filename_suffix=f".start{start}.{os.getpid()}")

  def scalars(self, step: int, record: dict) -> None:
    """Every number of a metrics.jsonl record but its step and wall time, as train/<key>."""
    for key, value in record.items():
      if key not in ("step", "time") and isinstance(value, (int, float)):
        self._writer.add_scalar(f"train/{key}", float(value), step)

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """One uint8 `[H, W, 3]` image under `tag`."""
    self._writer.add_image(tag, image, step, dataformats="HWC")

  def text(self, step: int, tag: str, text: str) -> None:
    self._writer.add_text(tag, text, step)

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def open_writer(report_to: str, workdir: str, start: int, enabled: bool) -> Writer | None:
  """The run's writer if `report_to` is "tensorboard" and `enabled` (process 0), else None."""
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
