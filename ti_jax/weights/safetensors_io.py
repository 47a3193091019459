"""Minimal safetensors reader/writer on numpy memmaps (handles bf16 via ml_dtypes).

`safetensors.numpy` cannot read bfloat16 tensors, which many SD checkpoints
hold, and loads eagerly. This reader maps the file and returns zero-copy views,
so converting a 3 GB UNet never holds two full copies in host memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class SafetensorsError(ValueError):
  """The file is not a readable safetensors file."""


def read_header(path: str) -> dict:
  """Returns the JSON header: name -> {dtype, shape, data_offsets} (plus `__metadata__`).

  The header is checked against the safetensors format before anything reads
  it: a JSON object whose `__metadata__` (optional) maps strings to strings and
  whose every other entry is a tensor with a known dtype, a shape of
  non-negative integers and data offsets that hold exactly that many bytes
  inside the file. Files written by another tool's bug or a bad download then
  fail here, in one line naming the file and what is wrong, instead of with a
  TypeError deep in whatever reads the header next.

  Raises:
    SafetensorsError: (a ValueError) a file that is not valid safetensors.
    OSError: the file cannot be read.
  """
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", raw)
    size = os.fstat(f.fileno()).st_size
    if n > _MAX_HEADER_BYTES or 8 + n > size:
      raise SafetensorsError(f"{path}: not a safetensors file (header length {n} in a file "
                             f"of {size} bytes)")
    blob = f.read(n)
  try:
    header = json.loads(blob)
  except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
    raise SafetensorsError(f"{path}: corrupt safetensors header ({_first_line(e)})") from None
  _check_header(path, header, size - 8 - n)
  return header


_MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check_header(path: str, header, data_bytes: int) -> None:
  """Raises SafetensorsError unless `header` is a valid safetensors header for `data_bytes`."""
  def bad(what: str) -> SafetensorsError:
    return SafetensorsError(f"{path}: corrupt safetensors header ({what})")

  if not isinstance(header, dict):
    raise bad(f"a JSON {type(header).__name__}, not an object")
  for name, info in header.items():
    if name == "__metadata__":
      if not isinstance(info, dict):
        raise bad(f"__metadata__ is a JSON {type(info).__name__}, not an object of strings")
      for key, value in info.items():
        if not isinstance(value, str):
          raise bad(f"__metadata__ {key!r} is a JSON {type(value).__name__}, not a string")
      continue
    if not isinstance(info, dict):
      raise bad(f"tensor {name!r} is a JSON {type(info).__name__}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
      raise bad(f"tensor {name!r} has no {', '.join(missing)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
      raise bad(f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
      raise bad(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(_is_int(o) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
      raise bad(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end] with "
                "0 <= begin <= end")
    nbytes = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
    if offsets[1] - offsets[0] != nbytes:
      raise bad(f"tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes} bytes, "
                f"its data_offsets span {offsets[1] - offsets[0]}")
    if offsets[1] > data_bytes:
      raise SafetensorsError(f"{path}: truncated file (tensor {name!r} runs past the end)")


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """Tensor name -> shape, reading only the header."""
  return {k: tuple(v["shape"]) for k, v in read_header(path).items() if k != "__metadata__"}


def load(path: str) -> dict[str, np.ndarray]:
  """Loads all tensors as read-only numpy views of a memory map (header checked first)."""
  header = read_header(path)
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
  data = np.memmap(path, dtype=np.uint8, mode="r")
  start = 8 + n
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    lo, hi = info["data_offsets"]
    out[name] = data[start + lo:start + hi].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def save(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
  """Writes numpy arrays in the safetensors format (readable by torch, diffusers, A1111)."""
  header: dict = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset = 0
  arrays = []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _NAMES:
      raise SafetensorsError(f"cannot store tensor {name!r} of dtype {a.dtype}")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # 8-byte alignment of the data section
  # Write beside the target and rename: an interrupted save never leaves a
  # half file, and arrays memory-mapped from the old file stay valid.
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for a in arrays:
        f.write(a.tobytes())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
