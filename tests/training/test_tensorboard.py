"""TensorBoard events (report_to="tensorboard"): the metrics and validation grids, read back."""

import io
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import REPO, config_module, offline_config
from PIL import Image

from ti_jax.training import tensorboard, trainer

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
  with pytest.raises(trainer.ConfigError, match="'' \\(off\\) or 'tensorboard', got 'wandb'"):
    trainer.validate_config(c)


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
