"""Malformed safetensors headers are refused in one line naming the file and the fault.

Single-file checkpoints and embedding files come from many tools and downloads; the
header parser is the one place that checks them, so every reader (single files,
model folders, embedding files) gets the same one-line refusal instead of a
TypeError from deep inside.
"""

import json
import random
import struct

import numpy as np
import pytest

from ti_jax.testing import single_file_models
from ti_jax.weights import safetensors_io
from ti_jax.weights.loading import ModelLoadError, load_stable_diffusion

GOOD = {
    "__metadata__": {"format": "pt", "modelspec.prediction_type": "epsilon"},
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
}
DATA = bytes(range(32))


def _write(path, header, data=DATA, length=None):
  blob = header if isinstance(header, bytes) else json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob) if length is None else length))
    f.write(blob)
    f.write(data)
  return str(path)


def _with(**changes):
  """GOOD with top-level entries replaced (None deletes one)."""
  out = json.loads(json.dumps(GOOD))
  for k, v in changes.items():
    if v is None:
      out.pop(k)
    else:
      out[k] = v
  return out


def _tensor(**changes):
  """GOOD with tensor 'a''s fields replaced (None deletes one)."""
  a = dict(GOOD["a"])
  for k, v in changes.items():
    if v is None:
      a.pop(k)
    else:
      a[k] = v
  return _with(a=a)


MALFORMED = {
    "header is a list": ([1, 2], "JSON list"),
    "header is a string": ("x", "JSON str"),
    "metadata is a list": (_with(__metadata__=["format", "pt"]), "__metadata__ is a JSON list"),
    "metadata is a string": (_with(__metadata__="pt"), "__metadata__ is a JSON str"),
    "prediction_type is an int": (
        _with(__metadata__={"modelspec.prediction_type": 1}), "'modelspec.prediction_type'"),
    "tensor entry is an int": (_with(a=7), "tensor 'a' is a JSON int"),
    "tensor entry is a list": (_with(a=["F32", [2, 3]]), "tensor 'a' is a JSON list"),
    "no dtype": (_tensor(dtype=None), "has no dtype"),
    "no shape": (_tensor(shape=None), "has no shape"),
    "no offsets": (_tensor(data_offsets=None), "has no data_offsets"),
    "dtype is an int": (_tensor(dtype=4), "unsupported dtype 4"),
    "unknown dtype": (_tensor(dtype="F8_E9"), "unsupported dtype 'F8_E9'"),
    "shape is a string": (_tensor(shape="2x3"), "shape '2x3'"),
    "negative dim": (_tensor(shape=[-2, -3]), "shape [-2, -3]"),
    "float dim": (_tensor(shape=[2.0, 3]), "shape [2.0, 3]"),
    "bool dim": (_tensor(shape=[True, 6]), "shape [True, 6]"),
    "offsets reversed": (_tensor(data_offsets=[24, 0]), "data_offsets [24, 0]"),
    "three offsets": (_tensor(data_offsets=[0, 12, 24]), "data_offsets [0, 12, 24]"),
    "offsets are strings": (_tensor(data_offsets=["0", "24"]), "data_offsets ['0', '24']"),
    "offsets too short for the shape": (_tensor(data_offsets=[0, 20]), "needs 24 bytes"),
    "offsets past the end": (_tensor(data_offsets=[24, 48]), "runs past the end"),
    "not JSON": (b"{not json", "corrupt safetensors header"),
    "not UTF-8": (b"\xff\xfe{}", "corrupt safetensors header"),
    "deeply nested": (b"[" * 100_000 + b"]" * 100_000, "corrupt safetensors header"),
}


def _assert_one_line(msg, path, needle):
  assert "\n" not in msg, msg
  assert path in msg, msg
  assert needle in msg, msg


def test_a_well_formed_file_loads(tmp_path):
  path = _write(tmp_path / "good.safetensors", GOOD)
  tensors = safetensors_io.load(path)
  assert tensors["a"].shape == (2, 3) and tensors["a"].dtype == np.float32
  assert tensors["b"].shape == (4,) and tensors["b"].dtype == np.float16
  assert safetensors_io.read_header(path)["__metadata__"]["format"] == "pt"


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_is_one_line_naming_file_and_fault(tmp_path, case):
  header, needle = MALFORMED[case]
  path = _write(tmp_path / "bad.safetensors", header)
  for read in (safetensors_io.read_header, safetensors_io.load, safetensors_io.read_shapes):
    with pytest.raises(safetensors_io.SafetensorsError) as err:
      read(path)
    _assert_one_line(str(err.value), path, needle)


@pytest.mark.parametrize("length,data", [(10**12, DATA), (2**64 - 1, DATA), (4096, b"")])
def test_header_length_beyond_the_file_is_refused(tmp_path, length, data):
  path = _write(tmp_path / "len.safetensors", GOOD, data=data, length=length)
  with pytest.raises(safetensors_io.SafetensorsError) as err:
    safetensors_io.load(path)
  _assert_one_line(str(err.value), path, "not a safetensors file")


def _mutations(rng):
  """Values a broken writer might put anywhere in a header."""
  return [None, 0, -1, 1.5, True, "", "F32", [], [0], [-1, 2], {}, {"x": 1}, [[1]], 2**70]


def _mutate(value, rng):
  """`value` (a JSON tree) with one node replaced by a random bad value."""
  if isinstance(value, dict) and value and rng.random() < 0.8:
    key = rng.choice(sorted(value))
    if rng.random() < 0.15:
      return {k: v for k, v in value.items() if k != key}
    return {**value, key: _mutate(value[key], rng)}
  if isinstance(value, list) and value and rng.random() < 0.8:
    i = rng.randrange(len(value))
    return value[:i] + [_mutate(value[i], rng)] + value[i + 1:]
  return rng.choice(_mutations(rng))


def test_fuzzed_headers_load_or_fail_in_one_line(tmp_path):
  rng = random.Random(0)
  refused = 0
  for i in range(400):
    header = GOOD
    for _ in range(rng.randint(1, 3)):
      header = _mutate(header, rng)
    path = _write(tmp_path / f"fuzz{i}.safetensors", header)
    try:
      tensors = safetensors_io.load(path)
    except safetensors_io.SafetensorsError as e:
      _assert_one_line(str(e), path, "")
      refused += 1
      continue
    # What loads is what the header says.
    for name, array in tensors.items():
      assert list(array.shape) == header[name]["shape"]
  assert refused > 300  # nearly every mutation breaks the header


@pytest.fixture(scope="module")
def sd1_file(tiny_sd15, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("hdr") / "sd1.safetensors")
  return tiny_sd15, single_file_models.write_single_file(tiny_sd15, path, "sd1")


def _rewrite_header(src, dst, edit):
  """A copy of the safetensors file `src` at `dst` with `edit(header)` applied."""
  with open(src, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
  return _write(dst, edit(header), data=data)


@pytest.mark.parametrize("case", ["metadata list", "metadata string", "prediction_type int",
                                  "tensor int", "no dtype", "header list"])
def test_single_file_with_malformed_header_is_a_one_line_load_error(sd1_file, tmp_path, case):
  folder, src = sd1_file
  first = None

  def edit(header):
    nonlocal first
    first = next(k for k in header if k != "__metadata__")
    return {
        "metadata list": lambda: {**header, "__metadata__": ["a"]},
        "metadata string": lambda: {**header, "__metadata__": "a"},
        "prediction_type int": lambda: {**header, "__metadata__": {"modelspec.prediction_type": 2}},
        "tensor int": lambda: {**header, first: 3},
        "no dtype": lambda: {**header, first: {k: v for k, v in header[first].items()
                                              if k != "dtype"}},
        "header list": lambda: list(header),
    }[case]()

  path = _rewrite_header(src, tmp_path / "broken.safetensors", edit)
  with pytest.raises(ModelLoadError) as err:
    load_stable_diffusion(path, tokenizer=folder)
  _assert_one_line(str(err.value), path, "corrupt safetensors header")
