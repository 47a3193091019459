"""Minimal safetensors reader/writer on numpy memmaps (handles bf16 via ml_dtypes).

`safetensors.numpy` cannot read bfloat16 tensors, which many SD checkpoints
hold, and loads eagerly. This reader maps the file and returns zero-copy views,
so converting a 3 GB UNet never holds two full copies in host memory.
"""

from __future__ import annotations

import json
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
  """Returns the JSON header: name -> {dtype, shape, data_offsets} (plus `__metadata__`)."""
  try:
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise SafetensorsError(f"{path}: not a safetensors file (shorter than 8 bytes)")
      (n,) = struct.unpack("<Q", raw)
      if n > 100_000_000:
        raise SafetensorsError(f"{path}: not a safetensors file (header length {n})")
      return json.loads(f.read(n))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """Tensor name -> shape, reading only the header."""
  return {k: tuple(v["shape"]) for k, v in read_header(path).items() if k != "__metadata__"}


def load(path: str) -> dict[str, np.ndarray]:
  """Loads all tensors as read-only numpy views of a memory map."""
  header = read_header(path)
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
  data = np.memmap(path, dtype=np.uint8, mode="r")
  start = 8 + n
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    lo, hi = info["data_offsets"]
    if start + hi > data.shape[0]:
      raise SafetensorsError(f"{path}: truncated file (tensor {name!r} runs past the end)")
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
