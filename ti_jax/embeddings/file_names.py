"""Embedding file names: the files of a diffusers SDXL pair, the file diffusers' scripts
leave in a folder, the file name that registers a token in each tool, and the line that
says what to type for an exported file.

Pure functions of paths and tokens: `embedding_io` reads by them and
`embedding_writer` writes by them, and neither is imported here.

A diffusers SDXL pair is `X.safetensors` (the first text encoder's vectors)
with `X_2.safetensors` beside it (`second_file`); the intermediate saves of
diffusers' textual_inversion_sdxl.py put the "_2" before their step suffix
(`learned_embeds_2-steps-500.safetensors`). A1111, kohya and ComfyUI take a
token from its file's name, so a file keeps the token's own characters
wherever the file system allows (`file_stem`).

InvokeAI installs an embedding under its file name and finds it in a prompt as
`<NAME>`, where NAME may hold only letters, digits and `. , _ -` and spaces: a file
`<toy>.safetensors` cannot be typed there, so `prompt_usage` names the file to export
for it (`invokeai_name`). InvokeAI's probe reads the width of a diffusers file from
its first dimension (`[n, dim]` is "n wide"), so diffusers files are not for InvokeAI.
"""

from __future__ import annotations

import os
import re

from ti_jax.runtime import fileio


# The intermediate saves of diffusers' textual_inversion(_sdxl).py: learned_embeds-steps-N.
_STEPS_SUFFIX = re.compile(r"-steps-\d+$")
_DIFFUSERS_STEP_FILE = re.compile(r"learned_embeds-steps-(\d+)\.(safetensors|bin)")
# InvokeAI's <NAME> triggers: the characters NAME may hold (its ti_utils' pattern
# allows also "," and " ", left out here as no file name should need them).
_INVOKEAI_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def _steps_split(path: str) -> tuple[str, str, str]:
  """`path` as (root, step suffix, extension): ("a/learned_embeds", "-steps-500", ".bin")."""
  root, ext = os.path.splitext(path)
  steps = _STEPS_SUFFIX.search(root)
  cut = steps.start() if steps else len(root)
  return root[:cut], root[cut:], ext


def part_file(path: str, encoder: int) -> str:
  """The diffusers file of text encoder `encoder` (0-based) of a multi-encoder concept
  whose first file is `path`: `path` itself, then `second_file(path)`, ..."""
  if encoder == 0:
    return path
  root, steps, ext = _steps_split(path)
  return f"{root}_{encoder + 1}{steps}{ext}"


def second_file(path: str) -> str:
  """The second file of a diffusers SDXL pair beside its first, `path`.

  `X_2.safetensors` for `X.safetensors`; for the intermediate saves of
  diffusers' textual_inversion_sdxl.py the "_2" goes before the step suffix,
  as that script names them: `learned_embeds_2-steps-500.safetensors` for
  `learned_embeds-steps-500.safetensors`.
  """
  return part_file(path, 1)


def first_file(path: str) -> str | None:
  """The path whose `second_file` is `path` (the first file of its pair), else None."""
  root, steps, ext = _steps_split(path)
  if not root.endswith("_2") or len(os.path.basename(root)) <= 2:
    return None
  first = f"{root[:-2]}{steps}{ext}"
  return first if second_file(first) == path else None


def stem_of(path: str) -> str:
  """The file name of `path` without its folder and extension."""
  return os.path.splitext(os.path.basename(path))[0]


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


def invokeai_name(token: str) -> str:
  """The file name (without extension) that InvokeAI's trigger for `token` reads well with.

  InvokeAI installs an embedding under its file name and finds it in a prompt
  as `<NAME>`, where NAME may hold only letters, digits, `. , _ -` and spaces:
  `<toy>.safetensors` would need the trigger `<<toy>>`, which it never
  matches. So the token loses one pair of surrounding `<>` and any other
  character becomes `_`: `<toy>` is `toy`, typed `<toy>` in InvokeAI as in
  ti_jax and A1111.
  """
  bracketed = len(token) >= 2 and token.startswith("<") and token.endswith(">")
  name = _INVOKEAI_UNSAFE.sub("_", token[1:-1] if bracketed else token).strip(".")
  return name or "embedding"


def _invokeai_usage(path: str, token: str, fmt: str) -> str:
  """What to do with the file at `path` in InvokeAI (see `invokeai_name`)."""
  if fmt == "diffusers":
    return ("InvokeAI: not this format (its probe takes the first dimension of a diffusers "
            "file's [n, dim] tensor for the width); export --format kohya for it")
  stem, ext = os.path.splitext(os.path.basename(path))
  if not _INVOKEAI_UNSAFE.search(stem):
    return f"InvokeAI: install it and type <{stem}>"
  name = invokeai_name(token)
  folder = os.path.dirname(path)
  better = fileio.join(folder, f"{name}{ext}") if folder else f"{name}{ext}"
  return (f"InvokeAI: export again with --output {better}, install that and type <{name}> "
          f"(InvokeAI names a model after its file, and <{stem}> is no trigger it reads)")


def prompt_usage(path: str, token: str, fmt: str, *, sdxl: bool = False) -> str:
  """What a user types for the file at `path` in each tool that reads format `fmt`.

  `sdxl`: the file holds an SDXL concept (both text encoders' vectors).
  """
  stem = stem_of(path)
  ours = f"ti_jax.sample --embeddings {path}: type {token if fmt == 'diffusers' else stem}"
  invokeai = _invokeai_usage(path, token, fmt)
  if fmt == "diffusers" and sdxl:
    second = second_file(path)
    return (f"diffusers: pipe.load_textual_inversion({path!r}, text_encoder=pipe.text_encoder, "
            f"tokenizer=pipe.tokenizer) and pipe.load_textual_inversion({second!r}, "
            "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2), then type "
            f"{token} in prompts; {ours}; {invokeai}")
  if fmt == "diffusers":
    return (f"diffusers: pipe.load_textual_inversion({path!r}), then type {token} in "
            f"prompts; {ours}; {invokeai}")
  tools = "A1111 (put it in embeddings/)" if fmt.startswith("a1111") else "kohya sd-scripts"
  usage = f"{tools}: type {stem} in prompts; ComfyUI: type embedding:{stem}; {invokeai}; {ours}"
  if sdxl:
    usage += ("; diffusers: load the file's 'clip_l' and 'clip_g' tensors and pass each to "
              f"pipe.load_textual_inversion(..., token={stem!r}) with text_encoder/tokenizer "
              "and text_encoder_2/tokenizer_2")
  return usage


def diffusers_file_in(folder: str) -> tuple[str | None, tuple[str, ...]]:
  """The embedding file diffusers' scripts leave in `folder` (None if none), and a note.

  The final `learned_embeds.safetensors` (or `.bin`), as diffusers' own
  loader takes; else, for a run that stopped before its end, the newest of
  its intermediate saves `learned_embeds-steps-N` (the note names it).
  """
  for ext in (".safetensors", ".bin"):
    final = fileio.join(folder, f"learned_embeds{ext}")
    if fileio.exists(final):
      return final, ()
  saves = [(int(m.group(1)), m.group(2) == "safetensors", name)
           for name in fileio.list_names(folder) if (m := _DIFFUSERS_STEP_FILE.fullmatch(name))]
  if not saves:
    return None, ()
  newest = max(saves)[2]
  return fileio.join(folder, newest), (
      f"{folder} holds no learned_embeds.safetensors; read its newest intermediate save, "
      f"{newest} (pass another file to choose it)",)
