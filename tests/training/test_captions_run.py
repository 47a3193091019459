"""Training runs with caption files and a templates file: the prompts they train on, the
one-line errors, and resumes refused when a caption or the templates file changed."""

import os
import shutil

import jax
import numpy as np
import pytest
from conftest import REPO, config_module, offline_config

from ti_jax import errors
from ti_jax.runtime import run_dir
from ti_jax.training import checkpointing, trainer
from ti_jax.training import config as training_config
from ti_jax.training import inputs as run_inputs

TOY = os.path.join(REPO, "examples", "toy")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def _data(tmp_path, captions_by_image):
  """A copy of the toy images with caption files {image number: text}."""
  folder = tmp_path / "data"
  shutil.copytree(TOY, folder)
  for i, text in captions_by_image.items():
    (folder / f"toy_robot_{i}.txt").write_text(text + "\n")
  return folder


def _config(cache_dir, folder, **overrides):
  c = config_module("object").get_config("tiny")
  return offline_config(c, cache_dir, **{
      "train_data_dir": str(folder), "max_train_steps": 2, "checkpointing_steps": 2,
      "log_every_steps": 1, "caption_extension": ".txt", "validation_prompt": "",
      **overrides})


def _decoded_batch(config, inputs, step):
  batch = run_inputs.batch_for(config, inputs, step)
  ids = np.asarray(batch["input_ids"]).reshape(-1, 77)  # [global batch, 77]
  views = np.asarray(batch["view_index"]).reshape(-1)
  tok = inputs.sd.tokenizer
  return [tok.decode(r, skip_special_tokens=True).replace(" ", "") for r in ids], views


def test_captioned_images_train_on_their_captions_others_on_templates(tmp_path, cache_dir):
  folder = _data(tmp_path, {1: "a <toy> on the moon", 3: "{} under the sea"})
  config = _config(cache_dir, folder, num_vectors=2, train_batch_size=8)
  inputs = run_inputs.build(config, str(tmp_path / "w"), jax.local_devices()[:1])
  expected = {0: "a<toy><toy>_1onthemoon", 2: "<toy><toy>_1underthesea"}
  seen_caption = seen_template = 0
  for step in range(3):
    prompts, views = _decoded_batch(config, inputs, step)
    for text, view in zip(prompts, views):
      image = int(view) % 4
      if image in expected:
        assert text == expected[image]
        seen_caption += 1
      else:
        assert "<toy><toy>_1" in text and "on the moon" not in text
        seen_template += 1
  assert seen_caption and seen_template
  result = trainer.run(config, str(tmp_path / "w"), devices=jax.local_devices()[:1],
                       progress=False)
  assert result["step"] == 2 and np.all(np.isfinite(result["embeds"]))


def test_resume_after_a_caption_changed_is_refused(tmp_path, cache_dir):
  folder = _data(tmp_path, {2: "a photo of {}"})
  workdir = str(tmp_path / "w")
  trainer.run(_config(cache_dir, folder), workdir, progress=False)
  (folder / "toy_robot_2.txt").write_text("a drawing of {}\n")
  with pytest.raises(run_dir.WorkdirError) as err:
    trainer.run(_config(cache_dir, folder, max_train_steps=4), workdir, progress=False)
  assert "prompt_texts_sha256" in str(err.value) and "another run" in str(err.value)
  assert run_dir.Checkpoints(workdir).all_steps() == [2]
  # The caption restored, the run resumes.
  (folder / "toy_robot_2.txt").write_text("a photo of {}\n")
  assert trainer.run(_config(cache_dir, folder, max_train_steps=4), workdir,
                     progress=False)["step"] == 4


def test_templates_file_replaces_the_lists_and_is_part_of_the_identity(tmp_path, cache_dir):
  folder = _data(tmp_path, {})
  templates = tmp_path / "templates.txt"
  templates.write_text("a sketch of {}\n<toy> in a box\n")
  config = _config(cache_dir, folder, caption_extension="", templates_file=str(templates))
  inputs = run_inputs.build(config, str(tmp_path / "w"), jax.local_devices()[:1])
  assert inputs.prompts.num_templates == 2
  prompts, _ = _decoded_batch(config, inputs, 0)
  assert set(prompts) <= {"asketchof<toy>", "<toy>inabox"}
  workdir = str(tmp_path / "w")
  trainer.run(config, workdir, progress=False)
  templates.write_text("a sketch of {}\n")
  with pytest.raises(run_dir.WorkdirError, match="prompt_texts_sha256"):
    trainer.run(config, workdir, progress=False)


@pytest.mark.parametrize("which", ["caption", "templates_file"])
def test_text_without_a_slot_is_one_line_error_naming_file_and_line(tmp_path, cache_dir, which):
  folder = _data(tmp_path, {4: "a photo of a robot"} if which == "caption" else {})
  templates = tmp_path / "t.txt"
  templates.write_text("a photo of {}\n\na robot\n")
  extra = {"templates_file": str(templates)} if which == "templates_file" else {}
  with pytest.raises(errors.UserError) as err:
    trainer.run(_config(cache_dir, folder, **extra), str(tmp_path / "w"), progress=False)
  where = f"{folder / 'toy_robot_4.txt'}:1" if which == "caption" else f"{templates}:3"
  assert str(err.value).startswith(f"{where}: ") and "has no slot" in str(err.value)
  assert "\n" not in str(err.value) and not (tmp_path / "w").exists()


def test_caption_too_long_for_the_vectors_is_refused(tmp_path, cache_dir):
  folder = _data(tmp_path, {1: "{} " + "very " * 60 + "long"})
  with pytest.raises(training_config.ConfigError) as err:
    trainer.run(_config(cache_dir, folder, num_vectors=20), str(tmp_path / "w"), progress=False)
  assert "caption" in str(err.value) and "toy_robot_1.txt" in str(err.value)
  assert "leaving room for at most" in str(err.value)


def test_caption_extension_without_dot_is_refused(tmp_path, cache_dir):
  with pytest.raises(training_config.ConfigError, match="start with a dot"):
    trainer.run(_config(cache_dir, TOY, caption_extension="txt"), str(tmp_path / "w"),
                progress=False)


def test_runs_recorded_before_captions_existed_resume_with_the_defaults(tmp_path, cache_dir):
  import json
  config = _config(cache_dir, TOY, caption_extension="")
  identity = checkpointing.run_identity(config)
  assert identity["caption_extension"] == identity["templates_file"] == ""
  old = {k: v for k, v in identity.items() if k not in ("caption_extension", "templates_file")}
  (tmp_path / "run.json").write_text(json.dumps(old))
  assert checkpointing.check_identity(str(tmp_path), identity)  # resumes
  with pytest.raises(run_dir.WorkdirError, match="caption_extension: '' there"):
    checkpointing.check_identity(str(tmp_path), dict(identity, caption_extension=".txt"))
  # A checkpoint's metadata without the new fields was made without captions: it resumes
  # without them and is refused with them.
  off = {"caption_extension": "", "templates_file": "", "prompt_texts_sha256": ""}
  now = {"caption_extension": ".txt", "templates_file": "", "prompt_texts_sha256": "ab"}
  assert checkpointing.identity_diffs({"seed": 0}, dict(off, seed=0)) == []
  assert checkpointing.identity_diffs({"seed": 0}, dict(now, seed=0)) == [
      "caption_extension: '' there, '.txt' now",
      "prompt_texts_sha256: '' there, 'ab' now (a caption file or the templates file changed)"]
  assert checkpointing.identity_diffs(dict(now, prompt_texts_sha256="cd"), now) == [
      "prompt_texts_sha256: 'cd' there, 'ab' now "
      "(a caption file or the templates file changed)"]
