"""TensorBoard events (report_to="tensorboard"): the metrics and validation grids, read back."""

import errno
import io
import json
import os
import shutil
import subprocess
import threading

import jax
import numpy as np
import pytest
from conftest import REPO, config_module, offline_config
from PIL import Image
from tensorboardX import record_writer

from ti_jax.runtime import run_dir
from ti_jax.training import config as training_config
from ti_jax.training import loop, tensorboard, trainer

TOY = os.path.join(REPO, "examples", "toy")
SCALARS = ("loss", "lr", "grad_norm", "max_vector_norm", "step_time_s", "images_per_sec")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def _config(cache_dir, **overrides):
  return offline_config(config_module("object").get_config("tiny"), cache_dir, **{
      "train_data_dir": TOY, "max_train_steps": 4, "checkpointing_steps": 2,
      "log_every_steps": 1, "report_to": "tensorboard", **overrides})


def test_events_round_trip_and_a_resumed_writer_replaces_the_steps_it_redoes(tmp_path):
  w = tensorboard.open_writer("tensorboard", str(tmp_path), 0, True)
  for step in (1, 2, 3):
    w.scalars(step, {"step": step, "loss": float(step), "time": 1e9})
  w.image(2, "validation/p0", np.full((4, 6, 3), 200, np.uint8))
  w.close()
  # A run killed after step 3 resumes from its step-2 checkpoint and logs 3 and 4 anew.
  w = tensorboard.open_writer("tensorboard", str(tmp_path), 2, True)
  for step in (3, 4):
    w.scalars(step, {"loss": 10.0 * step})
  w.close()
  logdir = tmp_path / "tensorboard"
  assert len(os.listdir(logdir)) == 2  # the resumed run appends a file
  events = tensorboard.read_events(str(logdir))
  assert set(events.scalars) == {"train/loss"}  # step and wall time are not scalars
  assert events.scalars["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
  [(step, png)] = events.images["validation/p0"]
  assert step == 2 and np.asarray(Image.open(io.BytesIO(png))).tolist() == [[[200] * 3] * 6] * 4


def test_no_writer_when_off_or_not_process_0(tmp_path):
  assert tensorboard.open_writer("", str(tmp_path), 0, True) is None
  assert tensorboard.open_writer("tensorboard", str(tmp_path), 0, False) is None
  assert not os.listdir(tmp_path)


def test_report_to_other_than_tensorboard_is_refused_listing_the_choices(tmp_path):
  c = _config(tmp_path, report_to="wandb")
  with pytest.raises(training_config.ConfigError,
                     match="'' \\(off\\) or 'tensorboard', got 'wandb'"):
    training_config.validate_config(c)


def test_run_writes_the_metrics_and_validation_grids_and_a_resume_logs_each_step_once(
    tmp_path, cache_dir):
  workdir = tmp_path / "run"
  c = _config(cache_dir, validation_prompts=("a photo of {}", "a {} on a table"),
              validation_steps=2, num_validation_images=2, validation_inference_steps=2)
  one_device = jax.local_devices()[:1]
  trainer.run(c, str(workdir), devices=one_device, progress=False)
  # Killed after step 4 before its checkpoint: the re-run resumes from step 2, redoes 3-4.
  shutil.rmtree(workdir / "checkpoints" / "4")
  trainer.run(c, str(workdir), devices=one_device, progress=False)
  assert len(os.listdir(workdir / "tensorboard")) == 2
  events = tensorboard.read_events(str(workdir / "tensorboard"))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for key in SCALARS:
    logged = [(r["step"], r[key]) for r in records if key in r]
    shown = events.scalars[f"train/{key}"]
    assert [s for s, _ in shown] == [s for s, _ in logged], key  # each step once
    np.testing.assert_allclose([v for _, v in shown], [v for _, v in logged], rtol=1e-6)
  # Step 1 of each run (1, and 3 after the resume) only compiled: no timing for it.
  assert [s for s, _ in events.scalars["train/step_time_s"]] == [2, 4]
  for k in (0, 1):
    grids = events.images[f"validation/p{k}"]
    assert [s for s, _ in grids] == [2, 4]
    # Two 64 px images side by side, the same grid as validation/step<step>_p<k>.png.
    for step, png in grids:
      shown = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
      written = np.asarray(Image.open(workdir / "validation" / f"step{step:06d}_p{k}.png"))
      assert shown.shape == (64, 128, 3) and np.array_equal(shown, written)
  assert events.texts["validation/p1_prompt"][0] == (2, "a <toy> on a table")


def test_validation_prompt_alone_keeps_its_pngs_and_sends_its_grid(tmp_path, cache_dir):
  workdir = tmp_path / "run"
  c = _config(cache_dir, max_train_steps=1, validation_prompt="a photo of {}",
              validation_steps=1, num_validation_images=2, validation_inference_steps=2)
  trainer.run(c, str(workdir), devices=jax.local_devices()[:1], progress=False)
  assert sorted(os.listdir(workdir / "validation")) == ["step000001_0.png", "step000001_1.png"]
  [(step, png)] = tensorboard.read_events(str(workdir / "tensorboard")).images["validation/p0"]
  grid = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
  images = [np.asarray(Image.open(workdir / "validation" / f"step000001_{i}.png")) for i in (0, 1)]
  assert step == 1 and np.array_equal(grid, np.concatenate(images, axis=1))


# --- issue 28: a TensorBoard folder that fails never stops or hangs training ------------------


class _FailingFile:
  """An event file that raises `error` on every write and flush once `armed`."""

  def __init__(self, file, error):
    self._file, self._error, self.armed = file, error, False

  def write(self, data):
    if self.armed:
      raise self._error
    return self._file.write(data)

  def flush(self):
    if self.armed:
      raise self._error
    return self._file.flush()

  def fileno(self):
    return self._file.fileno()

  def close(self):
    self._file.close()


@pytest.fixture
def failing_event_files(monkeypatch):
  """Every event file tensorboardX opens fails once `arm(error)` is called."""
  files = []
  real = record_writer.open_file

  def open_file(path):
    files.append(_FailingFile(real(path), None))
    return files[-1]

  def arm(error):
    for f in files:
      f.armed, f._error = True, error  # pylint: disable=protected-access
  monkeypatch.setattr(record_writer, "open_file", open_file)
  return arm


def _finishes(fn, timeout):
  """`fn()` in a thread: its result (or its exception, raised); fails if it hangs."""
  out = {}

  def target():
    try:
      out["result"] = fn()
    except BaseException as e:  # pylint: disable=broad-except  # re-raised below
      out["error"] = e
  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(timeout)
  assert not thread.is_alive(), f"still running after {timeout} s: it hangs"
  if "error" in out:
    raise out["error"]
  return out["result"]


def _chattr(flag, *paths):
  """chattr on paths; False where the file system does not support it."""
  return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True).returncode == 0


def _warnings(err):
  return [l for l in err.splitlines() if l.startswith("warning: TensorBoard is off")]


def test_writer_whose_file_fails_warns_once_turns_off_and_never_blocks(
    tmp_path, failing_event_files, capfd):
  """tensorboardX's own writer thread died at the first failed write and its next calls
  blocked forever on a full queue."""
  record = {"step": 0, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "time": 1e9}

  def log():
    w = tensorboard.open_writer("tensorboard", str(tmp_path), 0, True)
    w.scalars(1, dict(record, step=1))
    w.flush()
    failing_event_files(OSError(errno.ENOSPC, "No space left on device"))
    for step in range(2, 40):  # far more events than tensorboardX's queue holds
      w.scalars(step, dict(record, step=step))
      w.image(step, "validation/p0", np.zeros((4, 4, 3), np.uint8))
      w.text(step, "validation/p0_prompt", "a photo")
    w.flush()
    w.close()
    return w
  w = _finishes(log, 60)
  assert not w.active
  err = capfd.readouterr().err
  [line] = _warnings(err)
  assert "at step 2" in line and "No space left on device" in line and "training goes on" in line
  assert "Traceback" not in err and "Exception" not in err
  assert tensorboard.read_events(str(tmp_path / "tensorboard")).scalars["train/loss"] == [(1, 1.0)]


@pytest.mark.parametrize("fault", ["immutable", "injected"])
def test_tensorboard_folder_that_fails_mid_run_warns_once_and_training_goes_on(
    tmp_path, cache_dir, monkeypatch, failing_event_files, capfd, fault):
  """The folder made immutable (chattr +i) after step 2 hung the run; an injected write
  error stands in where chattr is not available."""
  workdir = tmp_path / "run"
  logdir = workdir / "tensorboard"
  if fault == "immutable":
    probe = tmp_path / "probe"
    probe.mkdir()
    if not _chattr("+i", probe):
      pytest.skip("chattr +i is not supported here")
    _chattr("-i", probe)

  def break_tensorboard():
    if fault == "immutable":
      assert _chattr("+i", logdir, *logdir.iterdir())
    else:
      failing_event_files(PermissionError(errno.EPERM, "Operation not permitted"))

  class Bar:
    n = 0

    def update(self, k):
      self.n += k
      if self.n == 2:
        break_tensorboard()

    def set_postfix(self, _):
      pass

    def close(self):
      pass
  monkeypatch.setattr(loop, "progress_bar", lambda *a: Bar())
  c = _config(cache_dir, max_train_steps=6)
  try:
    result = _finishes(lambda: trainer.run(c, str(workdir), devices=jax.local_devices()[:1],
                                           progress=False), 300)
  finally:
    if logdir.exists():
      _chattr("-i", logdir, *logdir.iterdir())
  assert result["step"] == 6 and not result["interrupted"]
  assert run_dir.Checkpoints(str(workdir)).all_steps() == [2, 4, 6]
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert (workdir / "learned_embeds.safetensors").exists()
  err = capfd.readouterr().err
  [line] = _warnings(err)
  assert "Operation not permitted" in line and str(logdir) in line
  assert "Traceback" not in err and "Exception" not in err
  if fault == "injected":
    assert "at step 3" in line  # the first log after the fault; steps 4-6 trained without it


@pytest.mark.parametrize("fault", ["file", "immutable", "full"])
def test_tensorboard_folder_unusable_at_start_is_refused_in_one_line(tmp_path, cache_dir,
                                                                   monkeypatch, fault):
  """`tensorboard` a file, an immutable folder or a full disk gave tracebacks
  (NotADirectoryError, PermissionError) or hangs."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  logdir = workdir / "tensorboard"
  if fault == "file":
    logdir.write_text("not a folder")
  elif fault == "immutable":
    logdir.mkdir()
    if not _chattr("+i", logdir):
      pytest.skip("chattr +i is not supported here")
  else:  # every write of an event file reports a full disk, as /dev/full does
    monkeypatch.setattr(record_writer, "open_file", lambda path: open("/dev/full", "wb"))
  try:
    with pytest.raises(tensorboard.TensorBoardError) as err:
      _finishes(lambda: trainer.run(_config(cache_dir, max_train_steps=2), str(workdir),
                                    devices=jax.local_devices()[:1], progress=False), 300)
  finally:
    if fault == "immutable":
      _chattr("-i", logdir)
  message = str(err.value)
  assert f"cannot write TensorBoard events to {logdir}" in message and "\n" not in message
  assert "report_to=''" in message
  assert not run_dir.Checkpoints(str(workdir)).all_steps()  # refused before training
