"""The paper's setup (configs/paper.py) and its per-image-token ablation, on the tiny LDM."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, config_module, offline_config, xla_flags

from ti_jax.data import captions, choices
from ti_jax.embeddings import pseudo_words
from ti_jax.runtime import run_dir
from ti_jax.training import trainer
from ti_jax.training import config as training_config
from ti_jax.weights import safetensors_io
from ti_jax.weights.loading import load_stable_diffusion

paper = config_module("paper")


def _config(arg, cache_dir, **overrides):
  c = paper.get_config(arg)
  return offline_config(c, cache_dir, **{
      "train_data_dir": os.path.join(REPO, c.train_data_dir), "max_train_steps": 3,
      "checkpointing_steps": 100, "log_every_steps": 1, "validation_prompt": "", **overrides})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def test_paper_config_has_the_papers_hyperparameters_and_ablations():
  c = paper.get_config("ldm,object")
  assert c.pretrained_model_name_or_path == "CompVis/ldm-text2im-large-256"
  assert (c.resolution, c.global_batch_size, c.learning_rate, c.scale_lr, c.max_train_steps,
          c.num_vectors) == (256, 8, 5e-3, True, 5000, 1)
  assert paper.get_config("sd15,style").resolution == 512
  assert paper.get_config("style").learnable_property == "style"
  assert paper.get_config("ldm,two_words").num_vectors == 2
  assert paper.get_config("three_words").num_vectors == 3
  progressive = paper.get_config("progressive")
  assert (progressive.num_vectors, progressive.progressive_words) == (3, 2000)
  per_image = paper.get_config("per_image")
  assert per_image.per_image_tokens and per_image.per_image_token_p == 0.25
  assert paper.get_config("regularized").embedding_reg_weight > 0
  assert paper.get_config("lr_high").learning_rate == 2e-2
  assert paper.get_config("lr_low").learning_rate == 1e-4
  for model in paper.MODELS:
    for prop in paper.PROPERTIES:
      for ablation in paper.ABLATIONS:
        if (model, prop) == ("world", "style"):  # refused: tests/world/test_world_variant.py
          continue
        c = paper.get_config(f"{model},{prop},{ablation}")
        c.train_data_dir = c.train_data_dir or "somewhere"
        training_config.validate_config(c)
  with pytest.raises(ValueError, match="unknown word 'ldm2'"):
    paper.get_config("ldm2")


def test_per_image_choices_are_deterministic_with_the_given_rate():
  idx = np.arange(4000)
  a = choices.per_image_choices(3, 7, idx, 0.25)
  np.testing.assert_array_equal(a, choices.per_image_choices(3, 7, idx, 0.25))
  assert abs(a.mean() - 0.25) < 0.03
  # Example g's draw does not depend on which other examples are asked for.
  np.testing.assert_array_equal(choices.per_image_choices(3, 7, idx[10:20], 0.25), a[10:20])
  assert not choices.per_image_choices(3, 7, idx, 0.0).any()
  assert choices.per_image_choices(3, 7, idx, 1.0).all()


def _image_embeds(workdir):
  ckpts = run_dir.Checkpoints(str(workdir), max_to_keep=None)
  try:
    state, meta = ckpts.restore_untyped(ckpts.latest_step())
  finally:
    ckpts.close()
  return np.asarray(state["state"]["params"]["image_embeds"]), meta


def test_per_image_tokens_learn_one_vector_per_image_and_export_only_s_star(tmp_path, cache_dir):
  one = jax.local_devices()[:1]
  base = trainer.run(_config("tiny,object", cache_dir), str(tmp_path / "base"), devices=one,
                   progress=False)
  never = trainer.run(_config("tiny,object,per_image", cache_dir, per_image_token_p=0.0),
                    str(tmp_path / "never"), devices=one, progress=False)
  always = trainer.run(_config("tiny,object,per_image", cache_dir, per_image_token_p=1.0),
                     str(tmp_path / "always"), devices=one, progress=False)
  # With the tokens never in a prompt, S* trains exactly as without the ablation.
  np.testing.assert_allclose(never["embeds"], base["embeds"], rtol=0, atol=1e-6)
  # In every prompt, they change what S* learns.
  assert np.abs(always["embeds"] - base["embeds"]).max() > 1e-3

  sd = load_stable_diffusion("tiny-ldm", cache_dir=str(cache_dir))
  table = np.asarray(pseudo_words.token_table(sd.text_encoder, sd.text_encoder_params))
  init = pseudo_words.initializer_vectors(sd.tokenizer, table, "toy", 1).vectors  # [1, D]
  never_images, _ = _image_embeds(tmp_path / "never")
  always_images, meta = _image_embeds(tmp_path / "always")
  assert meta["per_image_tokens"] == [f"<S*>_image{i}" for i in range(4)]  # examples/toy: 4 images
  assert always_images.shape == (4, init.shape[1])
  # 3 steps x 8 examples show every image: each S_i gets gradient steps of about lr = 0.04,
  # while unused ones only see AdamW's weight decay (lr * 0.01 * |v|).
  moved = np.abs(always_images - init).max(axis=1)
  decayed = np.abs(never_images - init).max(axis=1)
  assert (moved > 1e-2).all() and (decayed < 1e-3).all(), (moved, decayed)
  exported = safetensors_io.load(str(tmp_path / "always" / "learned_embeds.safetensors"))
  assert list(exported) == ["<S*>"] and np.asarray(exported["<S*>"]).shape == (1, init.shape[1])
  with open(tmp_path / "always" / "run.json") as f:
    assert json.load(f)["per_image_tokens"] is True
  # The ablation is part of the run's identity: switching it off on the same workdir is refused.
  with pytest.raises(run_dir.WorkdirError, match="per_image_tokens"):
    trainer.run(_config("tiny,object", cache_dir), str(tmp_path / "always"), devices=one,
              progress=False)


def test_global_batch_not_divisible_by_devices_is_a_one_line_error(tmp_path, cache_dir):
  with pytest.raises(training_config.ConfigError, match="not divisible by the 3 devices"):
    trainer.run(_config("tiny", cache_dir), str(tmp_path / "run"),
              devices=jax.local_devices()[:3], progress=False)
  assert not (tmp_path / "run" / "run.json").exists()


def test_paper_tiny_config_trains_and_samples_on_the_ldm_from_the_command_line(tmp_path, cache_dir):
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS=xla_flags(2))
  cmd = [sys.executable, "-m", "ti_jax.train", "--config",
         os.path.join(REPO, "configs/paper.py:tiny,style"), "--workdir", str(workdir),
         f"--config.cache_dir={cache_dir}", "--config.max_train_steps=2",
         f"--config.train_data_dir={os.path.join(REPO, 'examples/style')}",
         "--config.validation_prompt=",
         f"--config.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "global batch 8" in done.stderr and "on 2 device(s)" in done.stderr
  sample = subprocess.run(
      [sys.executable, "-m", "ti_jax.sample", "--workdir", str(workdir), "--prompt",
       "a painting of a fox in the style of <S*>", "--num_images", "2",
       "--num_inference_steps", "3", "--output_dir", str(tmp_path / "out"),
       f"--cache_dir={cache_dir}"], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert sample.returncode == 0, sample.stderr[-2000:]
  assert len(list((tmp_path / "out").glob("*_000.png"))) == 1


def test_per_image_prompts_name_the_token_of_the_examples_own_image(cache_dir):
  sd = load_stable_diffusion("tiny-ldm", cache_dir=str(cache_dir))
  tokens = pseudo_words.placeholder_tokens("<S*>", 2)
  image_tokens = pseudo_words.per_image_tokens("<S*>", 3)
  pseudo_words.add_new_tokens(sd.tokenizer, tokens + image_tokens)
  templates = captions.templates_for("object")
  plain, per_image = captions.prompt_tables(sd.tokenizer, templates, tokens, image_tokens)
  assert plain.shape[:2] == (2, len(templates))
  assert per_image.shape[:3] == (2, 3, len(templates))
  view_index = np.array([0, 1, 2, 3, 4, 5])  # views 3..5 mirror images 0..2
  template_index = np.array([0, 1, 2, 3, 4, 5])
  mixed = np.array([True, True, True, True, True, False])
  ids = captions.batch_input_ids(plain, per_image, 1, template_index, view_index, mixed)
  # Compared without spaces and case: the uncased BERT tokenizer lower-cases on decode.
  squash = lambda text: text.replace(" ", "").lower()
  decoded = [squash(sd.tokenizer.decode(row, skip_special_tokens=True)) for row in ids]
  for i in range(5):
    expected = templates[i].format(f"<S*> with <S*>_image{view_index[i] % 3}")
    assert decoded[i] == squash(expected), (decoded[i], expected)
  assert decoded[5] == squash(templates[5].format("<S*>"))
  # With two active vectors, both tokens come before the image token.
  two = captions.batch_input_ids(plain, per_image, 2, template_index, view_index, mixed)
  assert squash(sd.tokenizer.decode(two[1], skip_special_tokens=True)) == squash(
      templates[1].format("<S*> <S*>_1 with <S*>_image1"))


def test_resuming_per_image_tokens_after_the_images_changed_is_refused(tmp_path, cache_dir):
  import shutil
  images = tmp_path / "images"
  shutil.copytree(os.path.join(REPO, "examples/toy"), images)
  one = jax.local_devices()[:1]
  c = _config("tiny,object,per_image", cache_dir, train_data_dir=str(images), max_train_steps=1)
  trainer.run(c, str(tmp_path / "run"), devices=one, progress=False)
  shutil.copy(images / "toy_robot_1.png", images / "toy_robot_5.png")
  c.max_train_steps = 2
  # The checkpoint's own identity names the images it learned from.
  with pytest.raises(run_dir.WorkdirError, match=r"made by another run \(image_files: "):
    trainer.run(c, str(tmp_path / "run"), devices=one, progress=False)
  (images / "toy_robot_5.png").rename(images / "toy_robot_0.png")  # same count, new order
  (images / "toy_robot_4.png").unlink()
  with pytest.raises(run_dir.WorkdirError,
                     match=r"image_files: \['toy_robot_1.png'.*there, \['toy_robot_0.png'"):
    trainer.run(c, str(tmp_path / "run"), devices=one, progress=False)


def test_progressive_run_stopped_early_exports_only_its_trained_vectors(tmp_path, cache_dir):
  """paper.py:progressive with 3 vectors, one added every 2 steps, stopped at step 3."""
  c = _config("tiny,object,progressive", cache_dir, progressive_words=2, max_train_steps=3)
  trainer.run(c, str(tmp_path / "run"), devices=jax.local_devices()[:1], progress=False)
  exported = safetensors_io.load(str(tmp_path / "run" / "learned_embeds.safetensors"))["<S*>"]
  vectors, meta = run_dir.learned_from_workdir(str(tmp_path / "run"))
  assert meta["active_vectors"] == 2 and vectors.shape[0] == 2
  np.testing.assert_array_equal(np.asarray(exported), vectors)
