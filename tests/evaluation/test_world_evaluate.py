"""`ti_jax.evaluate` with the world's checker as the scorer, on a tiny random-weight world model."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, config_module, offline_config
from PIL import Image

from ti_jax import errors
from ti_jax.evaluation import clip_io, evaluator, plot, prompt_lists, world_scores
from ti_jax.training import trainer
from ti_jax.weights import loading, pipeline
from ti_jax.world import base_model
from ti_jax.world import checker as checker_lib
from ti_jax.world import scenes
from ti_jax.world import tokenizer as world_tokenizer

PROTOCOL = evaluator.Protocol(num_samples=2, num_inference_steps=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A random-weight tiny-world folder (with the shipped checker), a cross concept folder and a
  2-step textual-inversion run of it."""
  tmp = tmp_path_factory.mktemp("world_eval")
  vocab = world_tokenizer.write_world_tokenizer(str(tmp / "tokenizer"))
  configs = base_model.model_configs(vocab)
  params = base_model._init_params(pipeline.build_modules(configs), 0)
  model = str(tmp / "tiny-world")
  base_model.write_folder(model, configs, {k: params[k] for k in ("vae", "unet", "text_encoder")},
                          checker_lib.SHIPPED_DIR, "random weights for tests")
  concept_dir = str(tmp / "cross")
  scenes.write_concept_folder(concept_dir, seed=3, count=4)
  c = config_module("paper").get_config("tiny,object")
  offline_config(c, tmp / "cache", pretrained_model_name_or_path=model,
                 train_data_dir=concept_dir, initializer_token="object", resolution=32,
                 max_train_steps=2, validation_prompt="")
  workdir = str(tmp / "run")
  trainer.run(c, workdir, devices=jax.local_devices()[:1], progress=False)
  return {"tmp": tmp, "model": model, "concept_dir": concept_dir, "workdir": workdir,
          "tokenizer": str(tmp / "tokenizer"), "cache": str(tmp / "cache")}


@pytest.fixture(scope="module")
def shipped():
  return checker_lib.load_shipped()


def _renders(count, **fixed):
  return np.stack([scenes.render(s) for s in scenes.concept_scenes(5, count, **fixed)])


# ---------------------------------------------------------------------------
# Prompts and scoring arithmetic (no model).
# ---------------------------------------------------------------------------


def test_world_prompts_use_only_single_token_words_and_each_names_an_edit(world):
  tok = loading.load_tokenizer(world["tokenizer"], subfolder="")
  every = [p.text for p in world_scores.OBJECT_PROMPTS + world_scores.STYLE_PROMPTS]
  every += [world_scores.reconstruction_prompt({"shape": "cross"}),
            world_scores.reconstruction_prompt({"style": "outlined"})]
  for text in every:
    for word in prompt_lists.without_token(text).split():
      # bos + the word + eos: a word the tokenizer does not know is split into pieces.
      assert len(tok(word).input_ids) == 3, (text, word)
  for p in world_scores.OBJECT_PROMPTS:
    edit = world_scores.edit_attributes(p.text)
    assert edit and "shape" not in edit, p.text  # an object prompt never renames the shape
    assert p.category in world_scores.CATEGORIES
  for p in world_scores.STYLE_PROMPTS:
    assert world_scores.edit_attributes(p.text) and p.text.endswith("in the style of {}")
  assert world_scores.edit_attributes(world_scores.reconstruction_prompt({"style": "x"})) == {}


def test_shipped_checker_is_accurate_on_renders(shipped):
  accuracy = checker_lib.accuracy(shipped, seed=9191, count=200)
  assert all(a >= 0.95 for a in accuracy.values()), accuracy


def test_prompt_share_counts_samples_showing_the_concept_and_the_named_edit(shipped):
  green = _renders(8, background="green")  # crosses on green
  cross = {"shape": "cross"}
  assert world_scores.prompt_share(shipped, green, cross, "a photo of {} on a green background"
                                   )["share"] == 1.0
  red_bg = world_scores.prompt_share(shipped, green, cross, "a photo of {} on a red background")
  assert red_bg["share"] == 0.0 and red_bg["concept_share"] == 1.0
  assert red_bg["edit"] == {"background": "red"}
  # The concept must be shown too: green-background crosses are no stars.
  assert world_scores.prompt_share(shipped, green, {"shape": "star"},
                                   "a photo of {} on a green background")["share"] == 0.0
  # Half red crosses, half blue ones: "a red {}" is met by half.
  mixed = np.concatenate([_renders(4, colour="red"), _renders(4, colour="blue")])
  assert world_scores.prompt_share(shipped, mixed, cross, "a photo of a red {}")["share"] == 0.5


def test_report_means_the_prompt_shares_overall_and_per_category(shipped):
  green, red = _renders(4, background="green"), _renders(4, colour="red")
  generated = [(prompt_lists.EvalPrompt("a photo of {} on a green background", "background"),
                green),
               (prompt_lists.EvalPrompt("a photo of {} on a white background", "background"),
                green),
               (prompt_lists.EvalPrompt("a photo of a red {}", "colour"), red)]
  stars = np.stack([scenes.render(scenes.Scene("star", "red", "blue", "large", "middle"))] * 4)
  recon = np.concatenate([green[:2], stars[:2]])  # 2 of 4 crosses
  r = world_scores.report(shipped, {"shape": "cross"}, recon, generated, extra={"label": "x"})
  assert r["reconstruction"] == 0.5 and r["scorer"] == "checker" and r["label"] == "x"
  assert [p["share"] for p in r["prompts"]] == [1.0, 0.0, 1.0]
  assert r["editability"] == pytest.approx(2 / 3)
  assert r["editability_by_category"] == {"background": 0.5, "colour": 1.0}
  assert r["edit_fidelity"] == pytest.approx(2 / 3)  # the white background is never drawn


def test_edit_fidelity_counts_the_edit_whatever_is_drawn_for_the_concept(shipped):
  """The paper's text similarity: a word that drops the concept but keeps the prompt scores 1."""
  green_stars = np.stack([scenes.render(scenes.Scene("star", "red", "green", "large", "middle"))
                          ] * 4)
  green_crosses = _renders(4, background="green")
  prompt = prompt_lists.EvalPrompt("a photo of {} on a green background", "background")
  ignores = world_scores.report(shipped, {"shape": "cross"}, green_stars, [(prompt, green_stars)])
  assert ignores["edit_fidelity"] == 1.0 and ignores["editability"] == 0.0
  # A word that overrides the prompt: crosses, but on the training images' purple.
  purple = _renders(4, background="purple")
  overrides = world_scores.report(shipped, {"shape": "cross"}, purple, [(prompt, purple)])
  assert overrides["edit_fidelity"] == 0.0 and overrides["reconstruction"] == 1.0
  both = world_scores.report(shipped, {"shape": "cross"}, green_crosses, [(prompt, green_crosses)])
  assert both["edit_fidelity"] == 1.0 and both["editability"] == 1.0


# ---------------------------------------------------------------------------
# Choosing the scorer and the concept.
# ---------------------------------------------------------------------------


def test_auto_picks_the_checker_for_a_world_model_and_clip_otherwise(world, tmp_path):
  plain = str(tmp_path / "plain-model")
  os.makedirs(plain)
  assert evaluator.choose_scorer("auto", [world["model"]]) == "checker"
  assert evaluator.choose_scorer("auto", [plain]) == "clip"
  assert evaluator.choose_scorer("clip", [world["model"]]) == "clip"
  assert evaluator.choose_scorer("checker", [world["model"]]) == "checker"
  for requested, dirs, needle in (("checker", [plain], "carries no world checker"),
                                  ("auto", [world["model"], plain], "--scorer clip"),
                                  ("nope", [plain], "--scorer must be")):
    with pytest.raises(errors.UserError) as e:
      evaluator.choose_scorer(requested, dirs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_the_runs_base_model_folder_and_concept_are_found(world):
  r = evaluator.prepare_run(world["workdir"], None, "", "run")
  assert evaluator.model_folder(r) == world["model"]
  assert evaluator.concept_of(r) == {"shape": "cross"}  # from concept.json
  assert evaluator.concept_of(r, "shape=star") == {"shape": "star"}  # --concept wins
  with pytest.raises(errors.UserError, match="--concept"):
    evaluator.concept_of(r, "not-an-attribute")


def test_a_checker_evaluation_without_a_concept_is_a_one_line_error(world, tmp_path):
  images = str(tmp_path / "images")
  shutil.copytree(world["concept_dir"], images)
  os.remove(os.path.join(images, scenes.CONCEPT_FILE))
  with pytest.raises(errors.UserError) as e:
    evaluator.run(workdirs=[world["workdir"]], protocol=PROTOCOL, train_data_dir=images,
                  output_dir=str(tmp_path / "out"), devices=jax.local_devices()[:1])
  assert "--concept" in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "out").exists()  # refused before anything loads or is written


# ---------------------------------------------------------------------------
# End to end.
# ---------------------------------------------------------------------------


def test_checker_evaluation_reports_the_run_and_a_word_baseline_and_plots_them(
    world, tmp_path, monkeypatch):
  def no_clip(*args, **kwargs):
    raise AssertionError("the checker scorer must not load CLIP")
  monkeypatch.setattr(clip_io, "load_clip", no_clip)
  axes = []
  real_png = plot.scatter_png
  def spy_png(points, path, **kwargs):
    axes.append(kwargs)
    real_png(points, path, **kwargs)
  monkeypatch.setattr(evaluator.plot, "scatter_png", spy_png)
  out = tmp_path / "out"
  report = evaluator.run(workdirs=[world["workdir"]], protocol=PROTOCOL, words=["object"],
                         output_dir=str(out), devices=jax.local_devices()[:1])
  with open(out / "report.json") as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(report))
  assert written["scorer"] == "checker" and written["protocol"]["scorer"] == "auto"
  run, word = written["runs"]
  assert run["label"] == "run" and word["label"] == "word: object"
  assert run["token"] == "<S*>" and run["num_vectors"] == 1 and run["step"] == 2
  assert word["token"] == "object" and word["num_vectors"] == 0 and word["word"] == "object"
  for r in (run, word):
    assert r["scorer"] == "checker" and r["concept"] == {"shape": "cross"}
    assert r["reconstruction_prompt"] == "a photo of {}"
    assert [p["template"] for p in r["prompts"]] == [
        p.text for p in world_scores.OBJECT_PROMPTS]
    assert all(p["num_images"] == 2 for p in r["prompts"])
    assert 0.0 <= r["reconstruction"] <= 1.0
    assert r["editability"] == pytest.approx(np.mean([p["share"] for p in r["prompts"]]))
    assert r["edit_fidelity"] == pytest.approx(
        np.mean([p["edit_share"] for p in r["prompts"]]))
    assert set(r["editability_by_category"]) == set(world_scores.CATEGORIES)
  assert axes[-1]["x_title"] == plot.CHECKER_X_TITLE
  assert axes[-1]["y_title"] == plot.CHECKER_Y_TITLE
  # The second panel: the same runs with edit fidelity (the paper's text similarity) on x.
  ((fidelity_title, fidelity),) = axes[-1]["more"]
  assert fidelity_title == plot.CHECKER_FIDELITY_X_TITLE
  assert fidelity == [(r["label"], r["edit_fidelity"], r["reconstruction"]) for r in (run, word)]
  with Image.open(out / "scatter.png") as img:
    assert img.size == (1500, 600)


def test_cli_help_explains_the_checker_flags():
  done = subprocess.run([sys.executable, "-m", "ti_jax.evaluate", "--help"], capture_output=True,
                        text=True, timeout=120, cwd=REPO)
  for flag in ("--scorer", "--concept", "--word"):
    assert flag in done.stdout, flag
  assert "checker" in done.stdout
