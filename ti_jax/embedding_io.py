"""Learned-embedding files: diffusers, AUTOMATIC1111 and kohya formats, read and written.

Formats (all vectors are `[num_vectors, dim]` float32):
  diffusers  `learned_embeds.safetensors` (or legacy `.bin`): `{token: [n, dim]}`.
  a1111      `.pt`: {"string_to_token": {"*": 265}, "string_to_param": {"*": [n, dim]},
             "name": str, "step": int}; `.safetensors`: the tensor under
             "string_to_param.*" with name/step in the metadata.
  kohya      `.safetensors`: {"emb_params": [n, dim]} (the token is the file name).

`.pt`/`.bin` files need torch and are loaded with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from ti_jax import fileio, safetensors_io

FORMATS = ("diffusers", "a1111", "a1111-pt", "kohya")
# The token id CLIP's tokenizer gives "*", which A1111 writes as string_to_token.
_A1111_STAR_TOKEN = 265


class EmbeddingFileError(ValueError):
  """An embedding file cannot be read or written; one-line message."""


@dataclasses.dataclass(frozen=True)
class Concept:
  """One learned pseudo-word: its token and vectors `[n, dim]`, and where it came from."""
  token: str
  vectors: np.ndarray
  source: str
  base_model: str | None = None  # the model it was trained on, when known


def _as_matrix(x: Any, path: str) -> np.ndarray:
  a = np.asarray(x, dtype=np.float32)
  if a.ndim == 1:
    a = a[None]
  if a.ndim != 2:
    raise EmbeddingFileError(f"{path}: expected an embedding of shape [n, dim], got {a.shape}")
  return a


def _torch_load(path: str) -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise EmbeddingFileError(f"{path}: reading .pt/.bin files needs torch installed") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many unrelated types for bad pickles
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise EmbeddingFileError(f"{path}: cannot read embedding file ({first})") from None


def _to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor
    return x.detach().float().cpu().numpy()
  return np.asarray(x)


def read_embedding_file(path: str) -> list[Concept]:
  """Reads any supported embedding file (local or gs://); returns its concepts."""
  if fileio.is_remote(path):
    if not fileio.exists(path):
      raise EmbeddingFileError(f"embedding file not found: {path}")
    import tempfile  # pylint: disable=import-outside-toplevel
    with tempfile.TemporaryDirectory() as tmp:
      local = os.path.join(tmp, os.path.basename(path))
      with open(local, "wb") as f:
        f.write(fileio.read_bytes(path))
      return [dataclasses.replace(c, source=path, vectors=np.array(c.vectors))
              for c in read_embedding_file(local)]
  if not os.path.isfile(path):
    raise EmbeddingFileError(f"embedding file not found: {path}")
  stem = os.path.splitext(os.path.basename(path))[0]
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    try:
      header = safetensors_io.read_header(path)
      tensors = safetensors_io.load(path)
    except (OSError, ValueError) as e:
      raise EmbeddingFileError(f"{path}: cannot read embedding file ({e})") from None
    meta = header.get("__metadata__", {}) or {}
    if "string_to_param.*" in tensors:
      return [Concept(meta.get("name") or stem, _as_matrix(tensors["string_to_param.*"], path), path)]
    if "emb_params" in tensors:
      return [Concept(stem, _as_matrix(tensors["emb_params"], path), path)]
    if not tensors:
      raise EmbeddingFileError(f"{path}: holds no tensors")
    return [Concept(k, _as_matrix(v, path), path) for k, v in sorted(tensors.items())]
  if ext in (".pt", ".bin", ".pth"):
    obj = _torch_load(path)
    if not isinstance(obj, dict):
      raise EmbeddingFileError(f"{path}: not an embedding file (top level is {type(obj).__name__})")
    if "string_to_param" in obj:
      params = obj["string_to_param"]
      if not isinstance(params, dict) or not params:
        raise EmbeddingFileError(f"{path}: string_to_param is empty")
      name = obj.get("name") or stem
      return [Concept(str(name), _as_matrix(_to_numpy(next(iter(params.values()))), path), path)]
    if "emb_params" in obj:
      return [Concept(stem, _as_matrix(_to_numpy(obj["emb_params"]), path), path)]
    tensors = {k: v for k, v in obj.items() if hasattr(v, "shape")}
    if not tensors:
      raise EmbeddingFileError(f"{path}: no embedding tensors found")
    return [Concept(str(k), _as_matrix(_to_numpy(v), path), path) for k, v in sorted(tensors.items())]
  raise EmbeddingFileError(f"{path}: unknown embedding file type {ext!r} (.safetensors, .pt, .bin)")


def write_embedding_file(path: str, concept: Concept, fmt: str, *, step: int = 0) -> None:
  """Writes `concept` in format `fmt` (one of FORMATS)."""
  vectors = np.asarray(concept.vectors, np.float32)
  if fmt == "diffusers":
    safetensors_io.save(path, {concept.token: vectors}, {"format": "pt"})
  elif fmt == "kohya":
    safetensors_io.save(path, {"emb_params": vectors}, {"format": "pt"})
  elif fmt == "a1111":
    safetensors_io.save(path, {"string_to_param.*": vectors}, {
        "format": "pt", "name": concept.token, "step": str(step),
        "string_to_token": json.dumps({"*": _A1111_STAR_TOKEN})})
  elif fmt == "a1111-pt":
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise EmbeddingFileError("writing A1111 .pt files needs torch; use --format=a1111 "
                               "(.safetensors) instead") from None
    torch.save({"string_to_token": {"*": _A1111_STAR_TOKEN},
                "string_to_param": {"*": torch.from_numpy(vectors.copy())},
                "name": concept.token, "step": int(step)}, path)
  else:
    raise EmbeddingFileError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


def default_filename(token: str, fmt: str) -> str:
  """A file name for `token` in `fmt` (A1111 and kohya take the token from the file name)."""
  safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in token.strip("<>")) or "embedding"
  return {"diffusers": "learned_embeds.safetensors", "a1111": f"{safe}.safetensors",
          "a1111-pt": f"{safe}.pt", "kohya": f"{safe}.safetensors"}[fmt]


def load_concepts(spec: str, step: int | None = None) -> list[Concept]:
  """Concepts from `PATH[:TOKEN]`: a ti_jax run directory or an embedding file.

  A run directory gives its checkpoint's vectors (latest, or `step`) under
  its placeholder token and records the base model it was trained on. `:TOKEN`
  renames a single-concept source (A1111 and kohya files are named after
  their file otherwise).
  """
  from ti_jax import checkpointing  # pylint: disable=import-outside-toplevel
  path, token = spec, None
  if ":" in spec and not fileio.exists(spec) and not spec.rsplit(":", 1)[1].startswith("//"):
    path, token = spec.rsplit(":", 1)
  if fileio.is_dir(path):
    vectors, meta = checkpointing.learned_from_workdir(path, step)
    concepts = [Concept(meta["placeholder_token"], vectors, path,
                        base_model=meta.get("pretrained_model_name_or_path"))]
  else:
    concepts = read_embedding_file(path)
  if token:
    if len(concepts) != 1:
      raise EmbeddingFileError(f"{path} holds {len(concepts)} tokens; cannot rename them all to {token!r}")
    concepts = [dataclasses.replace(concepts[0], token=token)]
  return concepts
