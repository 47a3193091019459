"""Learned-embedding files: diffusers, AUTOMATIC1111 and kohya formats, read and written.

Formats (all vectors are `[num_vectors, dim]` float32):
  diffusers  `learned_embeds.safetensors` (or legacy `.bin`): `{token: [n, dim]}`.
  a1111      `.pt`: {"string_to_token": {"*": 265}, "string_to_param": {"*": [n, dim]},
             "name": str, "step": int}; `.safetensors`: the tensor under
             "string_to_param.*" with name/step in the metadata.
  kohya      `.safetensors`: {"emb_params": [n, dim]}.

SDXL embeddings hold vectors for both of SDXL's text encoders (CLIP ViT-L,
768 wide, and OpenCLIP bigG, 1280 wide), the same count in each:
  kohya, A1111, ComfyUI  `.safetensors` (or `.pt`, as kohya's
             sdxl_train_textual_inversion writes for a .pt name):
             {"clip_l": [n, 768], "clip_g": [n, 1280]}. Formats "a1111" and
             "kohya" write it as .safetensors, "a1111-pt" as .pt.
  diffusers  a pair, as diffusers' textual_inversion_sdxl example saves it:
             `learned_embeds.safetensors` {token: [n, 768]} for the first
             encoder and `learned_embeds_2.safetensors` {token: [n, 1280]} for
             the second, beside it (`second_file`). Reading `X.safetensors`
             picks up `X_2.safetensors` beside it, so the pair is named by its
             first file or by the folder holding it; the second file alone is
             refused with that advice. Only two diffusers files holding the
             same tokens are a pair: any other `X_2` beside `X` (A1111's
             `style_2.pt` beside `style.pt`) is an embedding of its own.

Which token a file registers follows the tool that owns its format:
  * A1111 and kohya files (string_to_param / emb_params) register their FILE
    NAME without the extension, whatever `name` they hold inside: A1111's
    embedding database names each embedding after its file (the internal name
    is only read from embeddings stored in PNG images), kohya's sd-scripts
    take the token string from the file name, and ComfyUI finds an embedding
    by its file name (`embedding:NAME` in a prompt). A renamed file therefore
    registers its new name, as in those tools.
  * diffusers files register their key, as diffusers' `load_textual_inversion`
    does, unless a token is given (`PATH:TOKEN`).
  The SDXL files follow the same rules: a clip_l/clip_g file registers its file
  name (kohya, A1111 and ComfyUI all do), a diffusers pair its key.

A concept names its model family from its widths (`Concept.family`, `family`);
`check_fits` refuses one for a model of another family in one line that names both.

`.pt`/`.bin` files need torch and are loaded with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ti_jax import errors
from ti_jax.runtime import fileio
from ti_jax.weights import safetensors_io

FORMATS = ("diffusers", "a1111", "a1111-pt", "kohya")
# The token id CLIP's tokenizer gives "*", which A1111 writes as string_to_token.
_A1111_STAR_TOKEN = 265
# A CLIP prompt holds 77 tokens, two of them BOS/EOS: more vectors can never be used.
MAX_VECTORS = 75
# Real embedding files are kilobytes (75 vectors of width 1280 are 384 KB); anything
# this large is a model checkpoint or not an embedding, and is refused before reading.
MAX_FILE_BYTES = 64 * 2**20
# Keys of SDXL embeddings (one table per text encoder), as kohya and A1111 write them.
_SDXL_KEYS = ("clip_l", "clip_g")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class EmbeddingFileError(errors.UserError):
  """An embedding file cannot be read or written; one-line message."""


class ModelFamilyError(EmbeddingFileError):
  """An embedding was made for another model family than the model it is used with."""


# The text-encoder widths of each released model family (SDXL: CLIP ViT-L + OpenCLIP bigG).
_FAMILIES = {(768,): "SD 1.x", (1024,): "SD 2.x", (1280,): "LDM", (768, 1280): "SDXL"}


def family(widths: Sequence[int]) -> str:
  """The model family of text encoders of these widths, e.g. "SDXL (768 + 1280)".

  One width is a one-encoder model (SD 1.x/2.x, LDM), two are SDXL's pair;
  widths of no released model (the tests' tiny ones) still name the kind:
  "SD (32)", "SDXL (32 + 64)".
  """
  widths = tuple(int(w) for w in widths)
  name = _FAMILIES.get(widths) or ("SDXL" if len(widths) == 2 else "SD")
  return f"{name} ({' + '.join(map(str, widths))})"


@dataclasses.dataclass(frozen=True)
class Concept:
  """One learned pseudo-word: its token and vectors `[n, dim]`, and where it came from.

  `token_from` says how the token was chosen (the file name, the file's key,
  the run, or `PATH:TOKEN`), for the line that reports what a file registered.
  An SDXL concept also holds `vectors_2`, its vectors for SDXL's second text
  encoder (OpenCLIP bigG); `vectors` are always the first encoder's.
  """
  token: str
  vectors: np.ndarray  # [n, 768] (SD 1.x, SDXL's first encoder), [n, 1024] (SD 2.x), ...
  source: str
  base_model: str | None = None  # the model it was trained on, when known
  token_from: str = ""
  vectors_2: np.ndarray | None = None  # SDXL only: [n, 1280]

  @property
  def widths(self) -> tuple[int, ...]:
    """The text-encoder widths it fits: one for SD/LDM, two for SDXL."""
    if self.vectors_2 is None:
      return (int(self.vectors.shape[1]),)
    return int(self.vectors.shape[1]), int(self.vectors_2.shape[1])

  @property
  def family(self) -> str:
    """The model family it was made for, from its widths (`family`)."""
    return family(self.widths)


def check_fits(concept: Concept, widths: Sequence[int]) -> None:
  """Refuses `concept` for a model whose text encoders have `widths`.

  `widths` is one width for SD 1.x/2.x and LDM, two for SDXL. The one-line
  error names the file and both families: "x.safetensors is an SD 1.x (768)
  embedding; the model is SDXL (768 + 1280)".
  """
  if concept.widths != tuple(int(w) for w in widths):
    raise ModelFamilyError(f"{concept.source or concept.token} is an {concept.family} "
                           f"embedding; the model is {family(widths)}")


def check_vectors(vectors: Any, what: str) -> np.ndarray:
  """`vectors` as float32 `[n, dim]`; refuses bad dtypes, shapes, sizes, NaN/inf and zero rows.

  `what` names the source in the one-line error ("x.pt", "checkpoint 3 of runs/a").
  """
  dtype = getattr(vectors, "dtype", None)
  if dtype is not None and not (np.issubdtype(np.dtype(dtype), np.floating)
                                or str(dtype) == "bfloat16"):
    raise EmbeddingFileError(f"{what}: vectors have dtype {dtype}; an embedding holds "
                             "floating-point vectors")
  try:
    a = np.asarray(vectors, dtype=np.float32)
  except (TypeError, ValueError) as e:
    raise EmbeddingFileError(f"{what}: vectors are not numeric ({e})") from None
  if a.ndim == 1:
    a = a[None]
  if a.ndim != 2 or 0 in a.shape:
    raise EmbeddingFileError(f"{what}: expected an embedding of shape [num_vectors, dim], "
                             f"got {tuple(a.shape)}")
  if a.shape[0] > MAX_VECTORS:
    raise EmbeddingFileError(f"{what}: {a.shape[0]} vectors cannot fit a 77-token prompt "
                             f"(at most {MAX_VECTORS}); is it an embedding file?")
  bad = ~np.isfinite(a).all(axis=1)
  if bad.any():
    raise EmbeddingFileError(f"{what}: vector {int(np.argmax(bad))} holds NaN or inf (a "
                             "diverged training run?); it would give black images")
  zero = ~a.any(axis=1)
  if zero.any():
    raise EmbeddingFileError(f"{what}: vector {int(np.argmax(zero))} is all zeros (an empty "
                             "or untrained embedding?)")
  return a


def check_sdxl_vectors(vectors: Any, vectors_2: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
  """Both encoders' vectors of an SDXL embedding, each checked (`check_vectors`), same count."""
  a = check_vectors(vectors, f"{what} (first text encoder)")
  b = check_vectors(vectors_2, f"{what} (second text encoder)")
  if a.shape[0] != b.shape[0]:
    raise EmbeddingFileError(f"{what}: {a.shape[0]} vectors for the first text encoder but "
                             f"{b.shape[0]} for the second; an SDXL embedding has as many in each")
  return a, b


def _checked(concept: Concept) -> Concept:
  what = concept.source or concept.token
  if concept.vectors_2 is None:
    return dataclasses.replace(concept, vectors=check_vectors(concept.vectors, what))
  a, b = check_sdxl_vectors(concept.vectors, concept.vectors_2, what)
  return dataclasses.replace(concept, vectors=a, vectors_2=b)


def _torch_load(path: str) -> Any:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise EmbeddingFileError(f"{path}: reading .pt/.bin files needs torch installed "
                             "(or convert the file to .safetensors)") from None
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many unrelated types for bad pickles
    text = _ANSI.sub("", str(e))
    refused = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", text, re.S)
    if refused:
      # torch's advice spans several coloured lines and suggests weights_only=False,
      # which would run code from the file: give the cause alone.
      cause = " ".join(refused.group(1).split()).split(". Please")[0].rstrip(".")
      named = re.search(r"GLOBAL (\S+)", cause)
      if named:
        raise EmbeddingFileError(
            f"{path}: refused: the file holds Python objects besides tensors (it references "
            f"{named.group(1)}); .pt/.bin files are read only with torch's weights_only "
            "loader, which runs no code from the file") from None
      raise EmbeddingFileError(f"{path}: cannot read embedding file (not a torch file, or "
                               f"corrupt: {cause or 'unreadable pickle'})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(e).__name__
    raise EmbeddingFileError(f"{path}: cannot read embedding file ({first})") from None


def second_file(path: str) -> str:
  """The second file of a diffusers SDXL pair: `X_2.safetensors` beside `X.safetensors`."""
  root, ext = os.path.splitext(path)
  return f"{root}_2{ext}"


def _first_file(path: str) -> str | None:
  """`X.ext` for a path `X_2.ext` (the second file of a pair), else None."""
  root, ext = os.path.splitext(path)
  return f"{root[:-2]}{ext}" if root.endswith("_2") and len(os.path.basename(root)) > 2 else None


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _by_file_name(path: str, vectors: Any, tool: str) -> Concept:
  return Concept(_stem(path), check_vectors(vectors, path), path,
                 token_from=f"its file name, as {tool} do")


def _sdxl_by_file_name(path: str, tables: dict) -> Concept:
  """The concept of a kohya/A1111/ComfyUI SDXL file {"clip_l": ..., "clip_g": ...}."""
  missing = [k for k in _SDXL_KEYS if k not in tables]
  if missing:
    held = next(k for k in _SDXL_KEYS if k in tables)
    raise EmbeddingFileError(f"{path}: holds {held} but not {missing[0]}; an SDXL embedding "
                             "holds both (clip_l and clip_g, one per text encoder)")
  a, b = check_sdxl_vectors(_to_numpy(tables["clip_l"]), _to_numpy(tables["clip_g"]), path)
  return Concept(_stem(path), a, path, vectors_2=b,
                 token_from="its file name, as kohya, A1111 and ComfyUI do")


def _by_keys(path: str, tensors: dict) -> list[Concept]:
  return [Concept(str(k), check_vectors(v, f"{path} (key {k!r})"), path,
                  token_from="its key, as diffusers does")
          for k, v in sorted(tensors.items(), key=lambda kv: str(kv[0]))]


def _to_numpy(x: Any) -> Any:
  if hasattr(x, "detach"):  # a torch tensor; integer ones keep their dtype for the error
    x = x.detach().cpu()
    return x.float().numpy() if x.is_floating_point() else x.numpy()
  return x


def _check_size(path: str) -> None:
  if not os.path.isfile(path):
    raise EmbeddingFileError(f"embedding file not found: {path}")
  size = os.path.getsize(path)
  if size > MAX_FILE_BYTES:
    raise EmbeddingFileError(f"{path} is {size / 2**20:.0f} MB, far more than an embedding "
                             f"(limit {MAX_FILE_BYTES // 2**20} MB): a model checkpoint?")


def _read_one(path: str) -> tuple[list[Concept], bool]:
  """The concepts of one local file, and whether it is a diffusers (keyed) file."""
  _check_size(path)
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    try:
      header = safetensors_io.read_header(path)
      tensors = safetensors_io.load(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # any corrupt header
      raise EmbeddingFileError(f"{path}: cannot read embedding file ({e})") from None
    if not isinstance(header, dict):
      raise EmbeddingFileError(f"{path}: cannot read embedding file (corrupt header)")
    if "string_to_param.*" in tensors:
      return [_by_file_name(path, tensors["string_to_param.*"], "A1111 and ComfyUI")], False
    if "emb_params" in tensors:
      return [_by_file_name(path, tensors["emb_params"], "kohya, A1111 and ComfyUI")], False
    if any(k in tensors for k in _SDXL_KEYS):
      return [_sdxl_by_file_name(path, tensors)], False
    if not tensors:
      raise EmbeddingFileError(f"{path}: holds no tensors")
    return _by_keys(path, tensors), True
  if ext in (".pt", ".bin", ".pth"):
    obj = _torch_load(path)
    if not isinstance(obj, dict):
      raise EmbeddingFileError(f"{path}: not an embedding file (top level is {type(obj).__name__})")
    if "string_to_param" in obj:
      params = obj["string_to_param"]
      if not isinstance(params, dict) or not params:
        raise EmbeddingFileError(f"{path}: string_to_param is empty")
      if any(k in params for k in _SDXL_KEYS):
        return [_sdxl_by_file_name(path, params)], False
      if len(params) != 1:  # A1111 refuses these too ("multiple terms")
        raise EmbeddingFileError(f"{path}: string_to_param holds {len(params)} terms; an "
                                 "A1111 embedding holds one")
      return [_by_file_name(path, _to_numpy(next(iter(params.values()))),
                            "A1111 and ComfyUI")], False
    if "emb_params" in obj:
      return [_by_file_name(path, _to_numpy(obj["emb_params"]), "kohya, A1111 and ComfyUI")], False
    if any(k in obj for k in _SDXL_KEYS):
      return [_sdxl_by_file_name(path, obj)], False
    tensors = {k: _to_numpy(v) for k, v in obj.items() if hasattr(v, "shape")}
    if not tensors:
      raise EmbeddingFileError(f"{path}: no embedding tensors found")
    return _by_keys(path, tensors), True
  raise EmbeddingFileError(f"{path}: unknown embedding file type {ext!r} (.safetensors, .pt, .bin)")


def _is_pair(first: list[Concept], first_keyed: bool, second_path: str) -> list[Concept] | None:
  """The second file's concepts if it completes `first` as a diffusers SDXL pair, else None.

  A pair is two diffusers files holding the same tokens; any other file named
  `X_2` beside `X` (an A1111 `style_2.pt` beside `style.pt`) is an embedding of its own.
  """
  if not first_keyed or not os.path.isfile(second_path):
    return None
  second, keyed = _read_one(second_path)
  same = keyed and {c.token for c in second} == {c.token for c in first}
  return second if same else None


def read_embedding_file(path: str) -> list[Concept]:
  """Reads any supported embedding file (local or gs://); returns its concepts.

  The token of each concept follows the format's own tool (see the module
  docstring); every vector is checked (`check_vectors`). A diffusers file
  `X.safetensors` with a diffusers `X_2.safetensors` of the same tokens beside
  it is read as an SDXL pair; that second file alone is refused.
  """
  if fileio.is_remote(path):
    if not fileio.exists(path):
      raise EmbeddingFileError(f"embedding file not found: {path}")
    import tempfile  # pylint: disable=import-outside-toplevel
    with tempfile.TemporaryDirectory() as tmp:
      # The files a pair may need beside it, copied under the same names.
      local = os.path.join(tmp, os.path.basename(path))
      first = _first_file(path)
      for remote in (path, second_file(path), first):
        if remote and (remote == path or fileio.exists(remote)):
          with open(os.path.join(tmp, os.path.basename(remote)), "wb") as f:
            f.write(fileio.read_bytes(remote))
      concepts = read_embedding_file(local)
      return [dataclasses.replace(c, source=path, vectors=np.array(c.vectors),
                                  vectors_2=None if c.vectors_2 is None else np.array(c.vectors_2))
              for c in concepts]
  if os.path.isdir(path):
    raise EmbeddingFileError(f"{path} is a folder without learned_embeds.safetensors or "
                             "learned_embeds.bin; pass the embedding file itself")
  concepts, keyed = _read_one(path)
  first_path = _first_file(path)
  if keyed and first_path and os.path.isfile(first_path):
    first, first_keyed = _read_one(first_path)
    if _is_pair(first, first_keyed, path) is not None:
      raise EmbeddingFileError(
          f"{path} is the second file of the diffusers SDXL pair {os.path.basename(first_path)}"
          f" + {os.path.basename(path)}; pass {first_path} (it reads both) or their folder")
  second = _is_pair(concepts, keyed, second_file(path))
  if second is None:
    return concepts
  tables = {c.token: c.vectors for c in second}
  out = []
  for c in concepts:
    a, b = check_sdxl_vectors(c.vectors, tables[c.token],
                              f"{path} + {os.path.basename(second_file(path))} (key {c.token!r})")
    out.append(dataclasses.replace(c, vectors=a, vectors_2=b,
                                   token_from="its key, as diffusers does (an SDXL pair)"))
  return out


def output_files(path: str, concept: Concept, fmt: str) -> list[str]:
  """The files that writing `concept` in `fmt` to `path` makes: `path`, and for an
  SDXL concept in diffusers format also its second file (`second_file(path)`)."""
  if concept.vectors_2 is not None and fmt == "diffusers":
    return [path, second_file(path)]
  return [path]


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise EmbeddingFileError("writing A1111 .pt files needs torch; use --format=a1111 "
                             "(.safetensors) instead") from None
  return torch


def _write_part(path: str, concept: Concept, fmt: str, part: int, step: int) -> None:
  """Writes file `part` of `output_files` for the checked `concept`."""
  vectors, vectors_2 = concept.vectors, concept.vectors_2
  if fmt not in FORMATS:
    raise EmbeddingFileError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
  if vectors_2 is not None:  # SDXL
    if fmt == "diffusers":  # one file per text encoder, as diffusers' SDXL example saves them
      safetensors_io.save(path, {concept.token: (vectors, vectors_2)[part]}, {"format": "pt"})
      return
    tables = {"clip_l": vectors, "clip_g": vectors_2}
    if fmt == "a1111-pt":  # the dict kohya writes for a .pt name; A1111 and ComfyUI read it
      torch = _torch()
      torch.save({k: torch.from_numpy(v.copy()) for k, v in tables.items()}, path)
    else:  # a1111 and kohya: the file A1111, ComfyUI and kohya all load for SDXL
      safetensors_io.save(path, tables, {"format": "pt"})
    return
  if fmt == "diffusers":
    safetensors_io.save(path, {concept.token: vectors}, {"format": "pt"})
  elif fmt == "kohya":
    safetensors_io.save(path, {"emb_params": vectors}, {"format": "pt"})
  elif fmt == "a1111":
    safetensors_io.save(path, {"string_to_param.*": vectors}, {
        "format": "pt", "name": concept.token, "step": str(step),
        "string_to_token": json.dumps({"*": _A1111_STAR_TOKEN})})
  else:  # a1111-pt
    torch = _torch()
    torch.save({"string_to_token": {"*": _A1111_STAR_TOKEN},
                "string_to_param": {"*": torch.from_numpy(vectors.copy())},
                "name": concept.token, "step": int(step)}, path)


def write_embedding_file(path: str, concept: Concept, fmt: str, *, step: int = 0) -> None:
  """Writes `concept` in format `fmt` (one of FORMATS) to the local `output_files(path, ...)`
  as it goes; refuses NaN/inf or zero vectors. `save_embedding` is the atomic,
  local-or-gs:// form."""
  concept = _checked(concept)
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
    concept = _checked(concept)
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


def holds_embedding(path: str, token: str, vectors: np.ndarray,
                    vectors_2: np.ndarray | None = None) -> bool:
  """True if the diffusers file `path` exists and holds exactly `vectors` under `token`
  (and, given `vectors_2`, its SDXL second file holds exactly those)."""
  wanted = [(path, vectors)] + ([] if vectors_2 is None else [(second_file(path), vectors_2)])
  for file, expected in wanted:
    if not fileio.exists(file):
      return False
    try:
      saved = safetensors_io.load(file).get(token)
    except Exception:  # pylint: disable=broad-except  # unreadable: the caller rewrites it
      return False
    if saved is None or not np.array_equal(np.asarray(saved), expected):
      return False
  return True


# Characters no file name may hold: "/" and NUL everywhere, and on Windows also
# these and control characters (Windows also drops trailing dots and spaces).
_WINDOWS_FORBIDDEN = set('<>:"/\\|?*')


def file_stem(token: str, windows: bool | None = None) -> str:
  """The file name (without extension) that registers `token` in A1111, kohya and ComfyUI.

  Those tools take the token from the file name, so the token's own
  characters are kept wherever the file system allows them: `<toy>` is
  `<toy>.safetensors`, never `toy`, which is a word every prompt already uses.
  Where a character is not allowed (Windows forbids `<>:"/\\|?*`), it becomes
  `_`, so `<toy>` is `_toy_` there: still not a vocabulary word.
  """
  windows = os.name == "nt" if windows is None else windows
  out = []
  for c in token:
    bad = c in "/\0" or ord(c) < 32 or (windows and c in _WINDOWS_FORBIDDEN)
    out.append("_" if bad else c)
  stem = "".join(out)
  if windows:
    stem = stem.rstrip(". ")
  if stem.startswith("."):  # a hidden file; "." and ".." are not names at all
    stem = "_" + stem[1:]
  return stem or "embedding"


# Each format gets its own folder: A1111 and kohya both want `<token>.safetensors`
# (the file name is the token), so one folder could hold only one of them.
_FORMAT_FILES = {"diffusers": ("diffusers", "learned_embeds", ".safetensors"),
                 "a1111": ("a1111", None, ".safetensors"), "a1111-pt": ("a1111-pt", None, ".pt"),
                 "kohya": ("kohya", None, ".safetensors")}


def default_filename(token: str, fmt: str) -> str:
  """The default export path of `token` in `fmt`, relative to the export folder.

  `diffusers/learned_embeds.safetensors`, `a1111/<stem>.safetensors`,
  `a1111-pt/<stem>.pt`, `kohya/<stem>.safetensors` (see `file_stem`).
  """
  if fmt not in _FORMAT_FILES:
    raise EmbeddingFileError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
  folder, name, ext = _FORMAT_FILES[fmt]
  return f"{folder}/{name or file_stem(token)}{ext}"


def prompt_usage(path: str, token: str, fmt: str, *, sdxl: bool = False) -> str:
  """What a user types for the file at `path` in each tool that reads format `fmt`.

  `sdxl`: the file holds an SDXL concept (both text encoders' vectors).
  """
  stem = _stem(path)
  ours = f"ti_jax.sample --embeddings {path}: type {token if fmt == 'diffusers' else stem}"
  if fmt == "diffusers" and sdxl:
    second = second_file(path)
    return (f"diffusers: pipe.load_textual_inversion({path!r}, text_encoder=pipe.text_encoder, "
            f"tokenizer=pipe.tokenizer) and pipe.load_textual_inversion({second!r}, "
            "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2), then type "
            f"{token} in prompts; {ours}")
  if fmt == "diffusers":
    return (f"diffusers: pipe.load_textual_inversion({path!r}), then type {token} in "
            f"prompts; {ours}")
  tools = "A1111 (put it in embeddings/)" if fmt.startswith("a1111") else "kohya sd-scripts"
  usage = f"{tools}: type {stem} in prompts; ComfyUI: type embedding:{stem}; {ours}"
  if sdxl:
    usage += ("; diffusers: load the file's 'clip_l' and 'clip_g' tensors and pass each to "
              f"pipe.load_textual_inversion(..., token={stem!r}) with text_encoder/tokenizer "
              "and text_encoder_2/tokenizer_2")
  return usage


def load_concepts(spec: str, step: int | None = None) -> list[Concept]:
  """Concepts from `PATH[:TOKEN]`: a ti_jax run directory or an embedding file.

  A run directory gives its checkpoint's vectors (latest, or `step`) under
  its placeholder token and records the base model it was trained on; a
  folder that is not a run but holds `learned_embeds.safetensors` (or `.bin`,
  as diffusers' loader accepts) gives that file's concepts (with
  `learned_embeds_2` beside it, a diffusers SDXL pair's). An embedding file
  registers the token its format's tool would (the file name for A1111 and
  kohya files, SDXL clip_l/clip_g files included, the key for diffusers files
  and pairs; see the module docstring). `:TOKEN` renames a single-concept
  source, or picks one concept of a file that holds several.
  """
  from ti_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  path, token = spec, None
  if ":" in spec and not fileio.exists(spec) and not spec.rsplit(":", 1)[1].startswith("//"):
    path, token = spec.rsplit(":", 1)
    if not token.strip() or any(c.isspace() for c in token):
      raise EmbeddingFileError(f"{spec!r}: the token after ':' must be one word without spaces")
  if fileio.is_dir(path):
    diffusers_files = [fileio.join(path, f"learned_embeds{e}") for e in (".safetensors", ".bin")]
    has_run = fileio.exists(fileio.join(path, "run.json"))
    if not has_run and not any(map(fileio.exists, diffusers_files)):
      raise EmbeddingFileError(f"{path} is not a ti_jax run directory (no run.json) and holds "
                               "no learned_embeds.safetensors or .bin; pass an embedding "
                               "file or a run directory")
    if has_run:
      # An SDXL run's checkpoint holds both encoders' vectors: the concept gets both.
      vectors, vectors_2, meta = checkpointing.learned_pair_from_workdir(path, step)
      what = f"{path} (checkpoint {meta.get('step', '?')})"
      concepts = [Concept(meta["placeholder_token"], check_vectors(vectors, what), path,
                          base_model=meta.get("pretrained_model_name_or_path"),
                          token_from="its run's placeholder_token",
                          vectors_2=None if vectors_2 is None else check_vectors(vectors_2, what))]
    else:
      concepts = read_embedding_file(next(f for f in diffusers_files if fileio.exists(f)))
  else:
    concepts = read_embedding_file(path)
  if token:
    if len(concepts) == 1:
      concepts = [dataclasses.replace(concepts[0], token=token, token_from=f"{spec}")]
    else:
      chosen = [c for c in concepts if c.token == token]
      if not chosen:
        raise EmbeddingFileError(
            f"{path} holds {len(concepts)} tokens ({', '.join(c.token for c in concepts)}); "
            f"{token!r} is none of them: pick one as {path}:TOKEN")
      concepts = [dataclasses.replace(chosen[0], token_from=f"{spec} (one of the file's "
                                      f"{len(concepts)} keys)")]
  return concepts
