"""Learned-embedding files read: the `Concept` record, its checks and errors, and the
diffusers, AUTOMATIC1111, kohya and OneTrainer formats and the paper's own `.pt` read;
`embedding_writer` writes the first three, `file_names` names the files.

Formats (all vectors are `[num_vectors, dim]` float32):
  diffusers  `learned_embeds.safetensors` (or legacy `.bin`): `{token: [n, dim]}`.
  a1111      `.pt`: {"string_to_token": {"*": 265}, "string_to_param": {"*": [n, dim]},
             "name": str, "step": int}; `.safetensors`: {"emb_params": [n, dim]} with
             name/step in the metadata, the one key A1111 (a file of one tensor),
             ComfyUI, kohya and InvokeAI all read (files of ti_jax before it, with
             the tensor under "string_to_param.*", still read).
  kohya      `.safetensors`: {"emb_params": [n, dim]}.
  OneTrainer `.safetensors`: {"emp_params": [n, dim]}, with "emp_params_out" beside it
             for an output embedding (see below); read only.
  paper      the original textual_inversion code's `.pt` (rinongal/textual_inversion):
             {"string_to_token": {"*": tensor}, "string_to_param": nn.ParameterDict};
             read only, through `_torch_load`'s one allow-listed stand-in class.

SDXL embeddings hold vectors for both of SDXL's text encoders (CLIP ViT-L,
768 wide, and OpenCLIP bigG, 1280 wide), the same count in each:
  kohya, A1111, ComfyUI  `.safetensors` (or `.pt`, as kohya's
             sdxl_train_textual_inversion writes for a .pt name):
             {"clip_l": [n, 768], "clip_g": [n, 1280]}. Formats "a1111" and
             "kohya" write it as .safetensors, "a1111-pt" as .pt.
  diffusers  a pair, as diffusers' textual_inversion_sdxl example saves it:
             `learned_embeds.safetensors` {token: [n, 768]} for the first
             encoder and `learned_embeds_2.safetensors` {token: [n, 1280]} for
             the second, beside it (`file_names.second_file`). Reading
             `X.safetensors` picks up `X_2.safetensors` beside it, so the pair
             is named by its first file or by the folder holding it; the second
             file alone is refused with that advice. Only two diffusers files holding the
             same tokens are a pair: any other `X_2` beside `X` (A1111's
             `style_2.pt` beside `style.pt`) is an embedding of its own. The
             intermediate saves of that script are paired the same way:
             `learned_embeds-steps-N.safetensors` with
             `learned_embeds_2-steps-N.safetensors` ("_2" goes before the step
             suffix), and a folder holding only those reads its newest pair. A
             diffusers file named `learned_embeds_2...` is never read alone.
  OneTrainer {"clip_l", "clip_g"} as above, with "clip_l_out"/"clip_g_out" for an
             output embedding.

OneTrainer's output embeddings (`*_out` keys) hold vectors that replace the text
encoder's OUTPUT at the token's positions; ti_jax, like A1111 and ComfyUI, applies
input vectors only. A file with input vectors beside them is read for its input
vectors and its concept carries a note saying the `*_out` vectors were ignored
(`load_concepts` logs it); a file whose input vectors are zeros (what OneTrainer
writes for an output embedding) or absent is refused.

Which token a file registers follows the tool that owns its format:
  * A1111, kohya and OneTrainer files (string_to_param / emb_params /
    emp_params) register their FILE NAME without the extension, whatever
    `name` they hold inside: A1111's embedding database names each embedding
    after its file (the internal name is only read from embeddings stored in
    PNG images; a file of one tensor is named so whatever its key), kohya's
    sd-scripts take the token string from the file name, and ComfyUI finds an
    embedding by its file name (`embedding:NAME` in a prompt). A renamed file
    therefore registers its new name, as in those tools. The paper's `.pt`
    files (`embeddings_gs-N.pt`) register their file name too, as in A1111.
  * diffusers files register their key, as diffusers' `load_textual_inversion`
    does, unless a token is given (`PATH:TOKEN`).
  The SDXL files follow the same rules: a clip_l/clip_g file registers its file
  name (kohya, A1111 and ComfyUI all do), a diffusers pair its key.

A concept names its model family from its widths (`Concept.family`, `family`);
`check_fits` refuses one for a model of another family in one line that names both.

`.pt`/`.bin` files need torch and are loaded with `weights_only=True`; the one class
added to what that loader builds is a stand-in for the paper's nn.ParameterDict that keeps
its pickled state and runs nothing (`_torch_load`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ti_jax import errors
from ti_jax.embeddings import file_names
from ti_jax.runtime import console, fileio, run_dir
from ti_jax.weights import safetensors_io

# A CLIP prompt holds 77 tokens, two of them BOS/EOS: more vectors can never be used.
MAX_VECTORS = 75
# Real embedding files are kilobytes (75 vectors of width 1280 are 384 KB); anything
# this large is a model checkpoint or not an embedding, and is refused before reading.
MAX_FILE_BYTES = 64 * 2**20
# Per model kind (`model_kind`) with more than one text encoder: the key of each encoder's
# table in its single-file embeddings (kohya, A1111, ComfyUI, OneTrainer), in the encoders'
# order; the writer writes the same keys.
PART_KEYS = {"SDXL": ("clip_l", "clip_g")}
_SDXL_KEYS = PART_KEYS["SDXL"]
# How the text encoders are named in messages, in the pipeline's order.
_ORDINALS = ("first", "second", "third", "fourth")
# Keys under which a one-encoder embedding's vectors are stored without naming a token
# (the file name does), and the tools that name such a file after itself.
_UNNAMED_KEYS = {
    "string_to_param.*": "A1111 and ComfyUI",  # ti_jax's earlier a1111 .safetensors
    "emb_params": "kohya, A1111 and ComfyUI",
    "emp_params": "A1111 and ComfyUI",  # OneTrainer's SD 1.x/2.x key (spelled so)
}
# OneTrainer saves an output embedding's vectors under its input key plus this suffix.
_OUTPUT_SUFFIX = "_out"
# How diffusers' textual_inversion_sdxl.py names a pair's second file (and its saves).
_DIFFUSERS_SECOND = re.compile(r"learned_embeds_2(-steps-\d+)?")
# How the original textual_inversion code's string_to_param class is named in its pickles.
_PARAMETER_DICT = "torch.nn.modules.container.ParameterDict"
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
  name = _FAMILIES.get(widths) or model_kind(widths)
  return f"{name} ({' + '.join(map(str, widths))})"


def model_kind(per_encoder: Sequence) -> str:
  """The kind of model with one entry of `per_encoder` (widths, vectors) per text encoder,
  whatever the widths: "SDXL" for two, "SD" for one."""
  return "SDXL" if len(per_encoder) == 2 else "SD"


@dataclasses.dataclass(frozen=True)
class Concept:
  """One learned pseudo-word: its token and vectors, and where it came from.

  `vectors` holds one `[n, D_e]` array per text encoder, in the pipeline's
  order (`StableDiffusion.text_encoders`): one for SD/LDM, two for SDXL (CLIP
  ViT-L, then OpenCLIP bigG), the same count `n` in each; a single array given
  is a one-encoder concept's. `token_from` says how the token was chosen (the
  file name, the file's key, the run, or `PATH:TOKEN`), for the line that
  reports what a file registered. `notes` are lines about how the file was
  read (vectors it held that were ignored, the file picked in a folder), which
  `load_concepts` logs.
  """
  token: str
  # per encoder: [n, 768] (SD 1.x), [n, 1024] (SD 2.x), ([n, 768], [n, 1280]) (SDXL), ...
  vectors: tuple[np.ndarray, ...]
  source: str
  base_model: str | None = None  # the model it was trained on, when known
  token_from: str = ""
  notes: tuple[str, ...] = ()

  def __post_init__(self):
    if hasattr(self.vectors, "shape"):  # one array: a one-encoder concept
      object.__setattr__(self, "vectors", (self.vectors,))
    else:
      object.__setattr__(self, "vectors", tuple(self.vectors))

  @property
  def num_vectors(self) -> int:
    """How many vectors the token stands for (the same in every encoder)."""
    return int(self.vectors[0].shape[0])

  @property
  def widths(self) -> tuple[int, ...]:
    """The text-encoder widths it fits: one for SD/LDM, two for SDXL."""
    return tuple(int(v.shape[1]) for v in self.vectors)

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


def check_encoder_vectors(vectors: Sequence[Any], what: str) -> tuple[np.ndarray, ...]:
  """Every encoder's vectors of a multi-encoder (SDXL) embedding, each checked
  (`check_vectors`), the same count in each."""
  out = tuple(check_vectors(v, f"{what} ({_ORDINALS[e]} text encoder)")
              for e, v in enumerate(vectors))
  for e, v in enumerate(out[1:], 1):
    if v.shape[0] != out[0].shape[0]:
      raise EmbeddingFileError(
          f"{what}: {out[0].shape[0]} vectors for the first text encoder but {v.shape[0]} "
          f"for the {_ORDINALS[e]}; an {model_kind(out)} embedding has as many in each")
  return out


def checked(concept: Concept) -> Concept:
  """`concept` with every encoder's vectors checked (`check_vectors`,
  `check_encoder_vectors`): what the writers write."""
  what = concept.source or concept.token
  if len(concept.vectors) == 1:
    return dataclasses.replace(concept, vectors=(check_vectors(concept.vectors[0], what),))
  return dataclasses.replace(concept, vectors=check_encoder_vectors(concept.vectors, what))


class _PickledModuleState:
  """Stands in for torch.nn.ParameterDict while a `.pt` file is unpickled.

  The original textual_inversion code saves string_to_param as an
  nn.ParameterDict, which torch's weights_only loader refuses. Mapped to this
  class (`_torch_load`), the pickled module becomes an object that only keeps
  the state it was given: no torch module is built and nothing from the file
  runs. Its tensors are still rebuilt by the weights_only loader itself.
  """

  def __setstate__(self, state: Any) -> None:
    self.state = state

  def parameters(self, path: str) -> dict:
    """The module's `_parameters` table (name -> tensor), as every torch version pickles it."""
    state = getattr(self, "state", None)
    params = state.get("_parameters") if isinstance(state, dict) else None
    if not isinstance(params, dict):
      raise EmbeddingFileError(f"{path}: string_to_param is a ParameterDict without parameters")
    return params


def import_torch(missing: str):
  """torch (optional: only .pt/.bin files need it), or EmbeddingFileError(`missing`)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise EmbeddingFileError(missing) from None
  return torch


def _paper_classes(torch) -> contextlib.AbstractContextManager:
  """Lets torch's weights_only loader read the paper's ParameterDict as `_PickledModuleState`.

  torch 2.6 and newer take a (class, pickled name) pair; older versions read
  no ParameterDict (the refusal then names the torch version to install).
  """
  if torch.__version__ < "2.6" or not hasattr(torch.serialization, "safe_globals"):
    return contextlib.nullcontext()
  return torch.serialization.safe_globals([(_PickledModuleState, _PARAMETER_DICT)])


def _unpickling_refusal(path: str, text: str, torch) -> EmbeddingFileError | None:
  """The one-line error for torch's weights_only refusal in `text`, or None if it is none."""
  named = re.search(r"GLOBAL (\S+)", text)
  if named and named.group(1) == _PARAMETER_DICT:
    return EmbeddingFileError(
        f"{path}: the original textual_inversion code's string_to_param (an nn.ParameterDict) "
        f"is read without running code from the file by torch 2.6 or newer; this is torch "
        f"{torch.__version__}")
  if named:
    return EmbeddingFileError(
        f"{path}: refused: the file holds Python objects besides tensors (it references "
        f"{named.group(1)}); .pt/.bin files are read only with torch's weights_only "
        "loader, which runs no code from the file")
  if "WeightsUnpickler error" not in text and "Weights only load failed" not in text:
    return None
  # torch's message spans paragraphs around the cause, and suggests weights_only=False,
  # which would run code from the file: give the cause alone.
  paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
  causes = [p for p in paragraphs if not p.startswith(("Weights only load failed",
                                                        "Check the documentation"))]
  cause = " ".join(causes).replace("WeightsUnpickler error:", "").strip()
  cause = cause.split(". Please")[0].rstrip(".")
  return EmbeddingFileError(f"{path}: cannot read embedding file (not a torch file, or "
                            f"corrupt: {cause or 'unreadable pickle'})")


def _torch_load(path: str) -> Any:
  torch = import_torch(f"{path}: reading .pt/.bin files needs torch installed (or convert the "
                       "file to .safetensors)")
  try:
    with _paper_classes(torch):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many unrelated types for bad pickles
    text = _ANSI.sub("", str(e))
    refusal = _unpickling_refusal(path, text, torch)
    if refusal is not None:
      raise refusal from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(e).__name__
    raise EmbeddingFileError(f"{path}: cannot read embedding file ({first})") from None


def _by_file_name(path: str, vectors: Any, tool: str, notes: tuple[str, ...] = ()) -> Concept:
  return Concept(file_names.stem_of(path), check_vectors(vectors, path), path,
                 token_from=f"its file name, as {tool} do", notes=notes)


def _sdxl_by_file_name(path: str, tables: dict, notes: tuple[str, ...] = ()) -> Concept:
  """The concept of a kohya/A1111/ComfyUI/OneTrainer SDXL file {"clip_l": ..., "clip_g": ...}."""
  missing = [k for k in _SDXL_KEYS if k not in tables]
  if missing:
    held = next(k for k in _SDXL_KEYS if k in tables)
    raise EmbeddingFileError(f"{path}: holds {held} but not {missing[0]}; an SDXL embedding "
                             "holds both (clip_l and clip_g, one per text encoder)")
  vectors = check_encoder_vectors([_to_numpy(tables[k]) for k in _SDXL_KEYS], path)
  return Concept(file_names.stem_of(path), vectors, path, notes=notes,
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


def _all_zeros(x: Any) -> bool:
  try:
    return not np.asarray(x, dtype=np.float32).any()
  except (TypeError, ValueError):  # not numeric: check_vectors says so
    return False


def _output_vectors_note(path: str, tables: dict, inputs: Sequence[str]) -> tuple[str, ...]:
  """The note for OneTrainer output-embedding vectors (`*_out`) beside the input vectors
  `inputs`, which are read alone; refuses an output embedding (input vectors zeros or absent)."""
  outputs = [f"{k}{_OUTPUT_SUFFIX}" for k in inputs if f"{k}{_OUTPUT_SUFFIX}" in tables]
  if not outputs:
    return ()
  unusable = [k for k in inputs if k not in tables or _all_zeros(tables[k])]
  if unusable:
    state = "all zeros" if all(k in tables for k in unusable) else "absent"
    raise EmbeddingFileError(
        f"{path}: a OneTrainer output embedding: its learned vectors ({', '.join(outputs)}) "
        "replace the text encoder's output, which ti_jax (like A1111 and ComfyUI) cannot "
        f"apply, and its input vectors ({', '.join(unusable)}) are {state}")
  return (f"{path}: ignored {' and '.join(outputs)} (OneTrainer's output-embedding vectors, "
          f"which act on the text encoder's output); read its input vectors "
          f"{' and '.join(inputs)}",)


def _concepts_of(path: str, tables: dict) -> tuple[list[Concept], bool]:
  """The concepts of a file's top-level tensors (name -> array), and whether it is a
  diffusers (keyed) file: the keys of the other tools' layouts first, then one concept per key."""
  names = {str(k) for k in tables}
  if any(k in names or f"{k}{_OUTPUT_SUFFIX}" in names for k in _SDXL_KEYS):
    notes = _output_vectors_note(path, tables, _SDXL_KEYS)
    return [_sdxl_by_file_name(path, tables, notes)], False
  for key, tools in _UNNAMED_KEYS.items():
    if key in names or f"{key}{_OUTPUT_SUFFIX}" in names:
      notes = _output_vectors_note(path, tables, (key,))
      return [_by_file_name(path, _to_numpy(tables[key]), tools, notes)], False
  return _by_keys(path, tables), True


def _string_to_param(path: str, params: Any) -> tuple[list[Concept], bool]:
  """The concept of an A1111 or paper `.pt` file from its string_to_param table."""
  if isinstance(params, _PickledModuleState):  # the paper's nn.ParameterDict
    params = params.parameters(path)
  if not isinstance(params, dict) or not params:
    raise EmbeddingFileError(f"{path}: string_to_param is empty")
  if any(k in params for k in _SDXL_KEYS):
    return [_sdxl_by_file_name(path, params)], False
  if len(params) != 1:  # A1111 refuses these too ("multiple terms"); the paper's per-image tokens
    raise EmbeddingFileError(f"{path}: string_to_param holds {len(params)} terms; an "
                             "A1111 embedding holds one")
  return [_by_file_name(path, _to_numpy(next(iter(params.values()))), "A1111 and ComfyUI")], False


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
    if not tensors:
      raise EmbeddingFileError(f"{path}: holds no tensors")
    return _concepts_of(path, tensors)
  if ext in (".pt", ".bin", ".pth"):
    obj = _torch_load(path)
    if not isinstance(obj, dict):
      raise EmbeddingFileError(f"{path}: not an embedding file (top level is {type(obj).__name__})")
    if "string_to_param" in obj:
      return _string_to_param(path, obj["string_to_param"])
    tensors = {k: _to_numpy(v) for k, v in obj.items() if hasattr(v, "shape")}
    if not tensors:
      raise EmbeddingFileError(f"{path}: no embedding tensors found")
    return _concepts_of(path, tensors)
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


def _check_not_second_file(path: str) -> None:
  """Refuses the diffusers file `path` if it is the second file of an SDXL pair: the first
  is beside it, or it is named as diffusers' SDXL script names second files."""
  first_path = file_names.first_file(path)
  if not first_path:
    return
  if os.path.isfile(first_path):
    first, first_keyed = _read_one(first_path)
    if _is_pair(first, first_keyed, path) is not None:
      raise EmbeddingFileError(
          f"{path} is the second file of the diffusers SDXL pair {os.path.basename(first_path)}"
          f" + {os.path.basename(path)}; pass {first_path} (it reads both) or their folder")
  elif _DIFFUSERS_SECOND.fullmatch(file_names.stem_of(path)):
    # Its vectors are the second text encoder's alone: 1280 wide, they would pass for an
    # LDM embedding.
    raise EmbeddingFileError(
        f"{path} is the second file of a diffusers SDXL pair (the second text encoder's "
        f"vectors) but {os.path.basename(first_path)} is not beside it; pass that first file "
        "with this one beside it (or rename this file if it is an embedding of its own)")


def read_embedding_file(path: str) -> list[Concept]:
  """Reads any supported embedding file (local or gs://); returns its concepts.

  The token of each concept follows the format's own tool (see the module
  docstring); every vector is checked (`check_vectors`). A diffusers file
  `X.safetensors` with a diffusers `second_file` of the same tokens beside it
  is read as an SDXL pair; that second file alone is refused, and so is a
  diffusers file named `learned_embeds_2...` without its first file.
  """
  if fileio.is_remote(path):
    if not fileio.exists(path):
      raise EmbeddingFileError(f"embedding file not found: {path}")
    import tempfile  # pylint: disable=import-outside-toplevel
    with tempfile.TemporaryDirectory() as tmp:
      # The files a pair may need beside it, copied under the same names.
      local = os.path.join(tmp, os.path.basename(path))
      first = file_names.first_file(path)
      for remote in (path, file_names.second_file(path), first):
        if remote and (remote == path or fileio.exists(remote)):
          with open(os.path.join(tmp, os.path.basename(remote)), "wb") as f:
            f.write(fileio.read_bytes(remote))
      concepts = read_embedding_file(local)
      return [dataclasses.replace(c, source=path, vectors=tuple(np.array(v) for v in c.vectors),
                                  notes=tuple(n.replace(local, path) for n in c.notes))
              for c in concepts]
  if os.path.isdir(path):
    raise EmbeddingFileError(f"{path} is a folder without learned_embeds.safetensors or "
                             "learned_embeds.bin; pass the embedding file itself")
  concepts, keyed = _read_one(path)
  if keyed:
    _check_not_second_file(path)
  second = _is_pair(concepts, keyed, file_names.second_file(path))
  if second is None:
    return concepts
  tables = {c.token: c.vectors[0] for c in second}
  out = []
  for c in concepts:
    vectors = check_encoder_vectors(
        (c.vectors[0], tables[c.token]),
        f"{path} + {os.path.basename(file_names.second_file(path))} (key {c.token!r})")
    out.append(dataclasses.replace(c, vectors=vectors,
                                   token_from="its key, as diffusers does (an SDXL pair)"))
  return out


def load_concepts(spec: str, step: int | None = None) -> list[Concept]:
  """Concepts from `PATH[:TOKEN]`: a ti_jax run directory or an embedding file.

  A run directory gives its checkpoint's vectors (latest, or `step`) under
  its placeholder token and records the base model it was trained on; a
  folder that is not a run but holds `learned_embeds.safetensors` (or `.bin`,
  as diffusers' loader accepts; else the newest `learned_embeds-steps-N` a
  diffusers script saved) gives that file's concepts (with `learned_embeds_2`
  beside it, a diffusers SDXL pair's). An embedding file registers the token
  its format's tool would (the file name for A1111, kohya and OneTrainer
  files, SDXL clip_l/clip_g files included, the key for diffusers files and
  pairs; see the module docstring). `:TOKEN` renames a single-concept source,
  or picks one concept of a file that holds several. The concepts' `notes`
  (vectors a file held that were ignored, the file read from a folder) are
  logged here, so every command that loads embeddings shows them.
  """
  path, token = spec, None
  if ":" in spec and not fileio.exists(spec) and not spec.rsplit(":", 1)[1].startswith("//"):
    path, token = spec.rsplit(":", 1)
    if not token.strip() or any(c.isspace() for c in token):
      raise EmbeddingFileError(f"{spec!r}: the token after ':' must be one word without spaces")
  if fileio.is_dir(path):
    has_run = fileio.exists(fileio.join(path, "run.json"))
    diffusers_file, folder_notes = ((None, ()) if has_run
                                    else file_names.diffusers_file_in(path))
    if not has_run and not diffusers_file:
      raise EmbeddingFileError(f"{path} is not a ti_jax run directory (no run.json) and holds "
                               "no learned_embeds.safetensors or .bin (nor a diffusers "
                               "script's learned_embeds-steps-N save); pass an embedding "
                               "file or a run directory")
    if has_run:
      # An SDXL run's checkpoint holds both encoders' vectors: the concept gets both.
      vectors, meta = run_dir.encoder_vectors_from_workdir(path, step)
      what = f"{path} (checkpoint {meta.get('step', '?')})"
      concepts = [Concept(meta["placeholder_token"],
                          tuple(check_vectors(v, what) for v in vectors), path,
                          base_model=meta.get("pretrained_model_name_or_path"),
                          token_from="its run's placeholder_token")]
    else:
      concepts = [dataclasses.replace(c, notes=folder_notes + c.notes)
                  for c in read_embedding_file(diffusers_file)]
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
  for note in dict.fromkeys(n for c in concepts for n in c.notes):  # each once
    console.log(f"note: {note}")
  return concepts
