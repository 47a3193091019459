"""Entry points and shared flag parsing: one `error:` line for bad input, --help exits 0."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from absl import flags
from conftest import REPO
from ml_collections import config_flags

from ti_jax import cli
from ti_jax.embeddings import embedding_io, embedding_writer
from ti_jax.runtime import fileio

ENTRY_POINTS = ("train", "sample", "export", "evaluate", "tiny_model")


def _run(module, *args, env=None, timeout=180):
  """Runs `python -m ti_jax.MODULE ARGS`; returns (exit code, stderr lines)."""
  proc = subprocess.run([sys.executable, "-m", f"ti_jax.{module}", *args], capture_output=True,
                        text=True, timeout=timeout, cwd=REPO, env=env)
  return proc.returncode, proc.stderr.strip().splitlines(), proc.stdout


def _assert_one_error_line(lines, needle):
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  assert needle in lines[0], lines
  assert "\\n" not in lines[0] and "\\'" not in lines[0], lines  # no escaped repr text


def _parse_config(argv):
  """`cli.flags_parser` on a fresh flag set with a config-file flag, as train defines it.

  Returns (exit code or None, the stderr text).
  """
  # ml_collections loads every config file as module "config_config" and reuses a
  # module of that name already imported, which only a test parsing twice can see.
  sys.modules.pop("config_config", None)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True)
  try:
    cli.flags_parser(["prog", *argv], fv)
  except SystemExit as e:
    return e.code, None
  return None, fv


CONFIG_FILES = [
    ("syntax.py", b"def get_config(:\n", "is not valid Python (invalid syntax, line 1)"),
    ("raises.py", b"def get_config():\n  raise RuntimeError('boom here')\n",
     "get_config() of config file {} raised RuntimeError: boom here"),
    ("value.py", b"def get_config(v):\n  raise ValueError(f'no variant {v}')\n",
     "get_config() of config file {} raised ValueError: no variant x"),
    ("noget.py", b"x = 1\n", "config file {} defines no get_config() function"),
    ("none.py", b"def get_config():\n  return None\n", "returned None"),
    ("nul.py", b"\x00\x01binary", "is not valid Python (source code string cannot contain null"),
    ("latin1.py", b"\xff\xfe = 1\n", "is not valid Python ((unicode error)"),
]


@pytest.mark.parametrize("name, content, needle", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_bad_config_file_is_one_error_line(tmp_path, capfd, name, content, needle):
  path = tmp_path / name
  path.write_bytes(content)
  spec = f"{path}:x" if name == "value.py" else str(path)
  code, _ = _parse_config(["--config", spec])
  assert code == 2
  lines = capfd.readouterr().err.strip().splitlines()
  _assert_one_error_line(lines, needle.format(path))


@pytest.mark.parametrize("spec, needle", [
    ("{tmp}/missing.py", "config file not found: {tmp}/missing.py"),
    ("{tmp}", "config file {tmp} is a directory"),
    ("", "--config is empty"),
])
def test_missing_or_folder_config_file_is_one_error_line(tmp_path, capfd, spec, needle):
  code, _ = _parse_config(["--config", spec.format(tmp=tmp_path)])
  assert code == 2
  _assert_one_error_line(capfd.readouterr().err.strip().splitlines(), needle.format(tmp=tmp_path))


def test_good_config_file_parses():
  code, fv = _parse_config(["--config", os.path.join(REPO, "configs", "object.py") + ":tiny"])
  assert code is None and fv.config.max_train_steps > 0


def test_unknown_config_field_message_is_readable(tmp_path):
  code, lines, _ = _run("train", "--config", "configs/object.py:tiny", "--workdir",
                        str(tmp_path / "w"), "--config.max_steps=3")
  assert code == 2
  _assert_one_error_line(lines, "unknown config field max_steps "
                                '(Did you mean "max_train_steps" instead of "max_steps"?)')
  assert not (tmp_path / "w").exists()


def test_train_cli_config_with_syntax_error_is_one_line(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n")
  code, lines, _ = _run("train", "--config", str(bad), "--workdir", str(tmp_path / "w"))
  assert code == 2
  _assert_one_error_line(lines, f"config file {bad} is not valid Python")
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_exits_zero(module):
  code, _, out = _run(module, "--help")
  assert code == 0 and "flags:" in out


def _no_torch_env(tmp_path):
  """An environment in which `import torch` fails, as on a CPU-only install without it."""
  shim = tmp_path / "no_torch"
  shim.mkdir()
  # sys.modules[name] = None makes both `import torch` and importlib's find_spec
  # (what transformers asks) report torch as absent.
  (shim / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(shim), REPO, env.get("PYTHONPATH", "")])
  return env


def test_no_pytorch_notice_without_torch(tmp_path, tiny_sd15):
  env = _no_torch_env(tmp_path)
  check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
  assert check.returncode != 0  # the shim works: torch cannot be imported
  wide = tmp_path / "wide.safetensors"
  embedding_writer.write_embedding_file(str(wide),
                                        embedding_io.Concept("<wide>", np.ones((1, 48)), ""),
                                        "diffusers")
  # sample loads the base model (tokenizer included, so transformers is imported) and
  # then refuses the embedding of another width: a quick end-to-end run without torch.
  code, lines, _ = _run("sample", "--pretrained_model_name_or_path", tiny_sd15, "--embeddings",
                        str(wide), "--prompt", "a <wide>", env=env)
  assert code == 1
  assert not any("PyTorch was not found" in line for line in lines), lines
  assert lines[-1].startswith("error: embedding '<wide>'") and "width 48" in lines[-1]
  assert len([line for line in lines if line.startswith("error:")]) == 1


@pytest.mark.parametrize("args, needle", [
    (["--height", "-64"], "height must be > 0"),
    (["--prompts_file", "{tmp}/image.png"], "is a binary file"),
])
def test_sample_cli_bad_flags_are_one_error_line(tmp_path, args, needle):
  (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
  args = [a.format(tmp=tmp_path) for a in args]
  code, lines, _ = _run("sample", "--pretrained_model_name_or_path", "tiny-sd15",
                        "--cache_dir", str(tmp_path / "cache"), "--prompt", "a photo", *args)
  assert code == 1
  _assert_one_error_line(lines, needle)
  assert not (tmp_path / "cache").exists()  # refused before any model was written or loaded


@pytest.mark.parametrize("kwargs, needle", [
    (dict(height=-64), "height must be > 0"),
    (dict(width=-8), "width must be > 0"),
    (dict(height=100000), "height 100000 is above the limit of 2048 px"),
    (dict(width=4096), "width 4096 is above the limit of 2048 px"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
])
def test_sample_bad_sizes_and_guidance_are_refused_before_loading(tmp_path, kwargs, needle):
  from ti_jax.sampling import concepts as sampling_concepts  # pylint: disable=import-outside-toplevel
  from ti_jax.sampling import runner  # pylint: disable=import-outside-toplevel
  with pytest.raises(sampling_concepts.SampleError) as err:
    runner.run(prompts=["a photo"], pretrained_model_name_or_path="tiny-sd15",
               cache_dir=str(tmp_path / "cache"), **kwargs)
  assert needle in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name, content, needle", [
    ("image.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file"),
    ("latin1.txt", "a photo \xe9 <toy>\n".encode("latin-1"),
     "is not UTF-8 text (byte 0xe9 at offset 8)"),
    ("", None, "is a folder, not a text file"),
    ("missing.txt", None, "does not exist"),
])
def test_prompts_file_problems_are_one_line(tmp_path, name, content, needle):
  path = tmp_path / name
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(ValueError) as err:
    fileio.read_text_lines(str(path), "--prompts_file")
  assert needle in str(err.value) and "--prompts_file" in str(err.value)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind, needle", [
    ("too_large", "17 MiB, more than the 16 MiB a text input may hold"),
    ("pipe", "a named pipe, not a regular file"),
    ("device", "a character device, not a regular file"),
])
def test_prompts_file_too_large_or_special_is_refused_without_reading_it(tmp_path, kind,
                                                                         needle):
  """Prompt files were read whole: /dev/zero ran out of memory, a named pipe blocked."""
  path = tmp_path / "p.txt"
  if kind == "too_large":
    with open(path, "wb") as f:  # text, so only the size refuses it
      f.write(b"a photo of {}\n" * (17 * 2**20 // 14 + 1))
  elif kind == "pipe":
    os.mkfifo(path)
  else:  # /dev/zero in the issue; /dev/null reads empty, so the reader alone refuses it
    os.symlink("/dev/null", path)
  out = []
  reader = threading.Thread(target=lambda: out.append(pytest.raises(
      ValueError, fileio.read_text_lines, str(path), "--prompts_file")), daemon=True)
  reader.start()
  reader.join(30)
  assert not reader.is_alive(), "still reading after 30 s"
  message = str(out[0].value)
  assert f"cannot read --prompts_file {path}: {needle}" == message


def test_text_lines_reader_keeps_utf8_prompts(tmp_path):
  path = tmp_path / "p.txt"
  path.write_bytes("\ufeffa café <toy>\n\n  second  \n".encode("utf-8"))
  assert fileio.read_text_lines(str(path), "--prompts_file") == ["a café <toy>", "second"]


@pytest.mark.parametrize("args, needle", [
    (["--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["--out_dir", "{tmp}/file"], "is a file, not a folder"),
])
def test_tiny_model_bad_flags_are_one_error_line(tmp_path, args, needle):
  (tmp_path / "file").write_text("x")
  args = [a.format(tmp=tmp_path) for a in args]
  if "--out_dir" not in args:
    args += ["--out_dir", str(tmp_path / "m")]
  code, lines, _ = _run("tiny_model", *args)
  assert code == 1
  _assert_one_error_line(lines, needle)
  assert not (tmp_path / "m").exists()
