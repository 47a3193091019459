"""Training with aspect-ratio buckets: one bucket per step, one compiled program per bucket
shape (and none after each bucket's first step), the identity, the dry run, the checks."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from conftest import config_module, offline_config
from PIL import Image

from ti_jax.data import choices, image_loader, latent_cache
from ti_jax.runtime import parallel, run_dir
from ti_jax.training import checkpointing, dry_run, train_lib, trainer
from ti_jax.training import config as training_config
from ti_jax.training import inputs as run_inputs

WIDE, TALL = (120, 40), (40, 120)  # 3:1 -> the 96x32 bucket, 1:3 -> 32x96 at resolution 64


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Three wide and two tall images, the tall ones captioned."""
  folder = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  for i, size in enumerate([WIDE, TALL, WIDE, TALL, WIDE]):
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(
        folder / f"img{i}.png")
    if size == TALL:
      (folder / f"img{i}.txt").write_text(f"a tall {{}} number {i}\n")
  return folder


def _config(cache_dir, folder, **overrides):
  return offline_config(config_module("object").get_config("tiny"), cache_dir, **{
      "train_data_dir": str(folder), "caption_extension": ".txt", "enable_bucket": True,
      "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32,
      "max_train_steps": 2, "checkpointing_steps": 2, "log_every_steps": 1,
      "validation_prompt": "", **overrides})


@pytest.fixture(scope="module")
def built(cache_dir, data, tmp_path_factory):
  config = _config(cache_dir, data)
  inputs = run_inputs.build(config, str(tmp_path_factory.mktemp("w")), jax.local_devices()[:1])
  return config, inputs


def test_images_and_latents_are_kept_per_bucket(built):
  _, inputs = built
  images = inputs.images
  assert images.buckets == [(32, 96), (96, 32)]
  assert images.bucket_index.tolist() == [1, 0, 1, 0, 1]
  assert run_inputs.bucket_sizes(images) == [2, 3]
  # One (mean, std) per bucket, [V_b, h_b / 8, w_b / 8, C], V_b = 2 N_b with flips.
  assert [m.shape for m, _ in inputs.latents] == [(4, 12, 4, 4), (6, 4, 12, 4)]
  assert all(m.shape == s.shape for m, s in inputs.latents)


def test_a_step_draws_one_bucket_the_same_under_any_device_split(built):
  config, inputs = built
  tok = inputs.sd.tokenizer
  for step in range(10):
    bucket, _ = run_inputs.step_bucket(config, inputs, step)
    assert (bucket, _) == choices.bucket_choice(config.seed, step, [2, 3])
    whole = run_inputs.batch_for(config, inputs, step)  # 1 device x 2
    assert inputs.global_batch == 2
    # 1 example per device on 2 devices, or 2 accumulation steps of 1: the same global batch.
    for devices, accumulation in ((2, 1), (1, 2)):
      split_config = _config(config.cache_dir, config.train_data_dir, train_batch_size=1,
                             gradient_accumulation_steps=accumulation)
      split = run_inputs.batch_for(split_config, dataclasses.replace(
          inputs, per_device_batch=1, local_devices=devices), step)
      for k in whole:
        np.testing.assert_array_equal(split[k].reshape(whole[k].shape), whole[k])
    views = whole["view_index"].reshape(-1)
    members = inputs.images.bucket_members(bucket)
    assert views.max() < 2 * len(members)  # indexes its bucket's latents only
    # A tall image trains on its own caption; a wide one on the templates.
    for ids, view in zip(whole["input_ids"].reshape(-1, 77), views):
      image = int(members[view % len(members)])
      text = tok.decode(ids, skip_special_tokens=True).replace(" ", "")
      assert (text == f"atall<toy>number{image}") == (image in (1, 3)), text


def test_one_compiled_program_per_bucket_none_after_its_first_step(built):
  config, inputs = built
  devices = jax.local_devices()[:1]
  frozen, settings = trainer.step_inputs(config, inputs)
  frozen = run_inputs.bucket_frozen(inputs, parallel.replicate(frozen, devices), devices)
  assert len(frozen) == 2 and frozen[1].unet is frozen[0].unet  # weights on device once
  step_fn = train_lib.make_pmapped_step(settings, inputs.optimizer, inputs.lr, devices)
  state = parallel.replicate(inputs.state, devices)
  lowered = []  # the step at which each program was lowered (a compile or a cache load)
  step = 0

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      lowered.append(step)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    buckets_seen, firsts, drawn = [], [], []
    # Seed 0 draws buckets 1, 0, 0, 1: each bucket's first step, then another of each.
    for step in range(4):
      batch = run_inputs.batch_for(config, inputs, step)
      bucket, _ = run_inputs.step_bucket(config, inputs, step)
      drawn.append(bucket)
      if bucket not in buckets_seen:
        buckets_seen.append(bucket)
        firsts.append(step)
      state, metrics = step_fn(state, run_inputs.frozen_for(config, inputs, frozen, step), batch)
      jax.block_until_ready(metrics)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert sorted(buckets_seen) == [0, 1]
  assert all(drawn.count(b) >= 2 for b in (0, 1)), drawn  # steps after each bucket's first
  assert lowered == firsts, (lowered, firsts)  # one per bucket, at its first step only
  assert np.isfinite(float(parallel.unreplicate(metrics["loss"])))


def test_a_bucketed_run_logs_its_buckets_and_resumes_only_with_them(tmp_path, cache_dir, data,
                                                                  capsys):
  workdir = str(tmp_path / "w")
  result = trainer.run(_config(cache_dir, data), workdir, devices=jax.local_devices()[:1],
                       progress=False)
  assert result["step"] == 2 and np.all(np.isfinite(result["embeds"]))
  assert "2 buckets in use: 32x96 (2 images), 96x32 (3 images)" in capsys.readouterr().err
  assert run_dir.read_identity(workdir)["buckets"] == [32, 128, 32]
  with pytest.raises(run_dir.WorkdirError, match="buckets: \\[32, 128, 32\\] there, None now"):
    trainer.run(_config(cache_dir, data, enable_bucket=False, max_train_steps=4), workdir,
                progress=False)
  # Without run.json the checkpoint's own metadata refuses it too.
  os.remove(os.path.join(workdir, "run.json"))
  with pytest.raises(run_dir.WorkdirError, match="buckets"):
    trainer.run(_config(cache_dir, data, bucket_reso_steps=64, min_bucket_reso=64,
                        max_train_steps=4), workdir, progress=False)


def test_a_run_without_buckets_is_what_it_was(cache_dir, data, tmp_path):
  config = _config(cache_dir, data, enable_bucket=False)
  # Old checkpoints and run.json files have no "buckets": they count as made without.
  assert checkpointing.run_identity(config)["buckets"] is None
  assert checkpointing.identity_diffs({"seed": 0}, {"seed": 0, "buckets": None}) == []
  assert checkpointing.identity_diffs({"seed": 0}, {"seed": 0, "buckets": [32, 128, 32]})
  inputs = run_inputs.build(config, str(tmp_path / "w"), jax.local_devices()[:1])
  assert inputs.images.pixels.shape == (5, 64, 64, 3) and not inputs.images.buckets
  [(mean, std)] = inputs.latents
  want_mean, want_std = latent_cache.encode_views(
      inputs.sd.vae, inputs.sd.vae_params, image_loader.view_pixels(inputs.images.pixels, True))
  np.testing.assert_array_equal(mean, want_mean)
  np.testing.assert_array_equal(std, want_std)
  assert run_inputs.step_bucket(config, inputs, 3) is None
  for step in (0, 5):
    batch = run_inputs.batch_for(config, inputs, step)
    views, _ = choices.example_choices(0, step, np.arange(2), global_batch_size=2, num_images=5,
                                       flip_p=0.5, num_templates=inputs.prompts.num_templates)
    np.testing.assert_array_equal(batch["view_index"].reshape(-1), views)


def test_dry_run_shows_each_images_bucket(tmp_path, cache_dir, data):
  lines = dry_run.dry_run(_config(cache_dir, data), str(tmp_path / "w"))
  assert "2 buckets in use: 32x96 (2 images), 96x32 (3 images)" in lines
  image_lines = [line for line in lines if line.startswith("image ")]
  assert "120x40 px, trains at 96x32 (bucket 2 of 2, crop top-left 0,0)" in image_lines[0]
  assert "40x120 px, trains at 32x96 (bucket 1 of 2, crop top-left 0,0)" in image_lines[1]
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("overrides,message", [
    ({"bucket_reso_steps": 12}, "bucket_reso_steps must be a positive multiple of 8, got 12"),
    ({"min_bucket_reso": 48}, "min_bucket_reso must be a positive multiple of bucket_reso_steps"),
    ({"resolution": 256}, "resolution 256 must lie in \\[min_bucket_reso, max_bucket_reso\\]"),
    ({"max_bucket_reso": 4096}, "max_bucket_reso 4096 is above the limit"),
])
def test_bad_bucket_settings_are_one_line_errors(tmp_path, data, overrides, message):
  with pytest.raises(training_config.ConfigError, match=message):
    training_config.validate_config(_config(tmp_path, data, **overrides))
  if "resolution" not in overrides:  # off, the reso fields are unused and not checked
    training_config.validate_config(_config(tmp_path, data, enable_bucket=False, **overrides))


def test_steps_that_the_unet_cannot_downsample_are_refused_naming_the_rule(cache_dir, data):
  # The tiny VAE downsamples 8x and its UNet 4x more: bucket sides must be multiples of 32.
  with pytest.raises(training_config.ConfigError,
                     match="bucket_reso_steps 16 must be a multiple of 32"):
    run_inputs.load_model(_config(cache_dir, data, bucket_reso_steps=16))
