"""Writing embedding files: the formats ti_jax exports (FORMATS), the files each makes,
the atomic local-or-gs:// write every embedding file goes through, and each format's
default export path.

  diffusers  `{token: [n, dim]}` .safetensors; for SDXL the pair
             `learned_embeds.safetensors` + `learned_embeds_2.safetensors`, one
             file per text encoder (`file_names.part_file`).
  a1111      `{"emb_params": [n, dim]}` .safetensors with name/step metadata;
             for SDXL `{"clip_l": ..., "clip_g": ...}`.
  a1111-pt   `.pt` with string_to_token/string_to_param/name/step (needs torch);
             for SDXL the clip_l/clip_g dict kohya writes for a .pt name.
  kohya      `{"emb_params": [n, dim]}` .safetensors; for SDXL as a1111.

`embedding_io` holds the `Concept` record these take and reads every file written
here back (its module docstring has the formats of every tool); `file_names` names
the files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ti_jax.embeddings import embedding_io, file_names
from ti_jax.embeddings.embedding_io import Concept, EmbeddingFileError
from ti_jax.runtime import fileio
from ti_jax.weights import safetensors_io

# The formats ti_jax writes (`--format` of ti_jax.export).
FORMATS = ("diffusers", "a1111", "a1111-pt", "kohya")
# The token id CLIP's tokenizer gives "*", which A1111 writes as string_to_token.
_A1111_STAR_TOKEN = 265


def output_files(path: str, concept: Concept, fmt: str) -> list[str]:
  """The files that writing `concept` in `fmt` to `path` makes: `path`, and for an
  SDXL concept in diffusers format one file per text encoder
  (`file_names.part_file(path, e)`: `path`, then `file_names.second_file(path)`)."""
  if fmt == "diffusers":
    return [file_names.part_file(path, e) for e in range(len(concept.vectors))]
  return [path]


_NO_TORCH_FOR_WRITING = ("writing A1111 .pt files needs torch; use --format=a1111 "
                         "(.safetensors) instead")


def _write_part(path: str, concept: Concept, fmt: str, part: int, step: int) -> None:
  """Writes file `part` of `output_files` for the checked `concept`."""
  if fmt not in FORMATS:
    raise EmbeddingFileError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
  if len(concept.vectors) > 1:  # SDXL
    if fmt == "diffusers":  # one file per text encoder, as diffusers' SDXL example saves them
      safetensors_io.save(path, {concept.token: concept.vectors[part]}, {"format": "pt"})
      return
    # {"clip_l": [n, 768], "clip_g": [n, 1280]}
    keys = embedding_io.PART_KEYS[embedding_io.model_kind(concept.vectors)]
    tables = dict(zip(keys, concept.vectors))
    if fmt == "a1111-pt":  # the dict kohya writes for a .pt name; A1111 and ComfyUI read it
      torch = embedding_io.import_torch(_NO_TORCH_FOR_WRITING)
      torch.save({k: torch.from_numpy(v.copy()) for k, v in tables.items()}, path)
    else:  # a1111 and kohya: the file A1111, ComfyUI and kohya all load for SDXL
      safetensors_io.save(path, tables, {"format": "pt"})
    return
  vectors, = concept.vectors  # [n, D]
  if fmt == "diffusers":
    safetensors_io.save(path, {concept.token: vectors}, {"format": "pt"})
  elif fmt == "kohya":
    safetensors_io.save(path, {"emb_params": vectors}, {"format": "pt"})
  elif fmt == "a1111":
    # emb_params, not "string_to_param.*": InvokeAI's probe reads the width of any other
    # single key from its first dimension, and A1111 takes a file of one tensor whatever
    # its key. The name and step go in the metadata, which no tool needs.
    safetensors_io.save(path, {"emb_params": vectors},
                        {"format": "pt", "name": concept.token, "step": str(step)})
  else:  # a1111-pt
    torch = embedding_io.import_torch(_NO_TORCH_FOR_WRITING)
    torch.save({"string_to_token": {"*": _A1111_STAR_TOKEN},
                "string_to_param": {"*": torch.from_numpy(vectors.copy())},
                "name": concept.token, "step": int(step)}, path)


def write_embedding_file(path: str, concept: Concept, fmt: str, *, step: int = 0) -> None:
  """Writes `concept` in format `fmt` (one of FORMATS) to the local `output_files(path, ...)`
  as it goes; refuses NaN/inf or zero vectors. `save_embedding` is the atomic,
  local-or-gs:// form."""
  concept = embedding_io.checked(concept)
  for part, out in enumerate(output_files(path, concept, fmt)):
    _write_part(out, concept, fmt, part, step)


def save_embedding(path: str, concept: Concept, fmt: str, *, step: int = 0) -> None:
  """Writes `concept` in `fmt` to `path` (local or gs://) whole or not at all.

  The one writer of embedding files: the training run's final
  `learned_embeds.safetensors` and every export go through it. A write that
  fails half way (full disk, a kill) leaves the previous file, or none. A
  diffusers SDXL pair is written in full to temporary files first, then moved
  into place second file first, so a reader that finds the new first file
  (the one it is named by) finds the new second file beside it.
  """
  finals = output_files(path, concept, fmt)
  if fileio.is_remote(path):  # an object store upload replaces the object whole
    concept = embedding_io.checked(concept)
    for part in reversed(range(len(finals))):
      fileio.write_via_local_file(finals[part], lambda local, p=part: _write_part(
          local, concept, fmt, p, step))
    return
  folder, name = os.path.split(os.path.abspath(path))
  # The temporary name keeps the extension: torch.save and safetensors write by it.
  tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}{os.path.splitext(name)[1]}")
  tmps = output_files(tmp, concept, fmt)
  try:
    write_embedding_file(tmp, concept, fmt, step=step)
    for t, final in reversed(list(zip(tmps, finals))):
      os.replace(t, final)
  finally:
    for t in tmps:
      if os.path.exists(t):
        os.remove(t)


def holds_embedding(path: str, token: str, vectors: Sequence[np.ndarray]) -> bool:
  """True if the diffusers file `path` exists and holds exactly `vectors[0]` under `token`,
  and each further text encoder's file (`file_names.part_file(path, e)`, an SDXL pair's second
  file) holds exactly `vectors[e]`."""
  for e, expected in enumerate(vectors):
    file = file_names.part_file(path, e)
    if not fileio.exists(file):
      return False
    try:
      saved = safetensors_io.load(file).get(token)
    except Exception:  # pylint: disable=broad-except  # unreadable: the caller rewrites it
      return False
    if saved is None or not np.array_equal(np.asarray(saved), expected):
      return False
  return True


# Each format gets its own folder: A1111 and kohya both want `<token>.safetensors`
# (the file name is the token), so one folder could hold only one of them.
_FORMAT_FILES = {"diffusers": ("diffusers", "learned_embeds", ".safetensors"),
                 "a1111": ("a1111", None, ".safetensors"), "a1111-pt": ("a1111-pt", None, ".pt"),
                 "kohya": ("kohya", None, ".safetensors")}


def default_filename(token: str, fmt: str) -> str:
  """The default export path of `token` in `fmt`, relative to the export folder.

  `diffusers/learned_embeds.safetensors`, `a1111/<stem>.safetensors`,
  `a1111-pt/<stem>.pt`, `kohya/<stem>.safetensors` (see `file_names.file_stem`).
  """
  if fmt not in _FORMAT_FILES:
    raise EmbeddingFileError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
  folder, name, ext = _FORMAT_FILES[fmt]
  return f"{folder}/{name or file_names.file_stem(token)}{ext}"
