"""`python -m ti_jax.train --dry_run`: every input checked and described, nothing written."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, config_module, offline_config

from ti_jax import errors
from ti_jax.training import dry_run, train_lib, trainer

TOY = os.path.join(REPO, "examples", "toy")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture
def data(tmp_path):
  folder = tmp_path / "data"
  shutil.copytree(TOY, folder)
  (folder / "toy_robot_2.txt").write_text("a <toy> on the moon\n")
  return folder


def _config(cache_dir, folder, **overrides):
  c = config_module("object").get_config("tiny")
  return offline_config(c, cache_dir, **{"train_data_dir": str(folder),
                                         "caption_extension": ".txt", **overrides})


def _never(*args, **kwargs):
  raise AssertionError("a dry run must not build or compile the training step")


def test_dry_run_describes_each_image_and_writes_nothing(tmp_path, cache_dir, data,
                                                         monkeypatch):
  monkeypatch.setattr(train_lib, "make_pmapped_step", _never)
  monkeypatch.setattr(trainer, "compile_step", _never)
  workdir = tmp_path / "w"
  lines = dry_run.dry_run(_config(cache_dir, data, num_vectors=2), str(workdir))
  assert not workdir.exists()
  report = "\n".join(lines)
  for i in (1, 2, 3, 4):
    assert f"{data / f'toy_robot_{i}.png'}: " in report
  image_lines = [l for l in lines if l.startswith("image ")]
  assert len(image_lines) == 4 and all("trains at 64x64" in l for l in image_lines)
  assert "caption (toy_robot_2.txt): 'a {} on the moon'" in image_lines[1]
  assert all("templates (27 from object templates)" in image_lines[i] for i in (0, 2, 3))
  # The tokens of the caption's example: start, "a", <toy>, <toy>_1, ...: positions 2 and 3.
  token_lines = [l for l in lines if l.startswith("  token ids ")]
  assert len(token_lines) == 4
  assert token_lines[1].endswith("placeholder at position(s) [2, 3]")
  # The first object template, "a photo of a {}": start + 4 words, then the two vectors.
  assert token_lines[0].endswith("placeholder at position(s) [5, 6]")
  assert "'a <toy> <toy>_1 on the moon'" in lines[lines.index(image_lines[1]) + 1]


def test_dry_run_reports_bad_input_like_a_run(tmp_path, cache_dir, data):
  (data / "toy_robot_3.txt").write_text("no slot\n")
  with pytest.raises(errors.UserError, match="toy_robot_3.txt:1: 'no slot' has no slot"):
    dry_run.dry_run(_config(cache_dir, data), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_cli_dry_run_prints_the_report_and_creates_nothing(tmp_path, cache_dir, data):
  workdir, xla = tmp_path / "w", tmp_path / "xla"
  cmd = [sys.executable, "-m", "ti_jax.train", "--config",
         os.path.join(REPO, "configs/object.py:tiny"), "--workdir", str(workdir), "--dry_run",
         f"--config.cache_dir={cache_dir}", f"--config.train_data_dir={data}",
         "--config.caption_extension=.txt", f"--config.compilation_cache_dir={xla}"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "caption (toy_robot_2.txt): 'a {} on the moon'" in out.stdout
  assert out.stdout.count("placeholder at position(s) [") == 4
  assert out.stdout.rstrip().endswith("nothing trained, nothing written")
  assert not workdir.exists() and not xla.exists()
  bad = subprocess.run(cmd + ["--config.train_data_dir=" + str(tmp_path / "missing")],
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error: training image folder")
  assert not workdir.exists()
