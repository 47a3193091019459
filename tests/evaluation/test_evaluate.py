"""`python -m ti_jax.evaluate` end to end on a tiny LDM run and the tiny random CLIP."""

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
from ti_jax.evaluation import clip_io, clip_scores, evaluator, prompt_lists
from ti_jax.sampling import generation
from ti_jax.training import trainer
from ti_jax.weights.loading import load_stable_diffusion

paper = config_module("paper")

PROTOCOL = evaluator.Protocol(num_samples=3, num_inference_steps=2, clip_model="tiny-clip")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two tiny-LDM runs of the same concept (different vectors): "long", 2 steps, and "short",
  that run as if killed after its step-1 checkpoint (a copy without the later checkpoint and
  the final files): one training run for both."""
  tmp = tmp_path_factory.mktemp("eval")
  cache = tmp / "cache"
  c = paper.get_config("tiny,object")
  offline_config(c, cache, train_data_dir=os.path.join(REPO, c.train_data_dir),
                 max_train_steps=2, checkpointing_steps=1, validation_prompt="")
  trainer.run(c, str(tmp / "long"), devices=jax.local_devices()[:1], progress=False)
  shutil.copytree(tmp / "long", tmp / "short")
  shutil.rmtree(tmp / "short" / "checkpoints" / "2")
  for name in os.listdir(tmp / "short"):
    if name.startswith("learned_embeds"):
      os.unlink(tmp / "short" / name)
  return {"long": str(tmp / "long"), "short": str(tmp / "short")}, str(cache), tmp


@pytest.fixture(scope="module")
def prompts_file(runs):
  _, _, tmp = runs
  path = tmp / "prompts.txt"
  path.write_text("# two editability prompts\nbackground\ta photo of {} on the moon\n"
                  "style\tan oil painting of {}\n")
  return str(path)


@pytest.fixture(scope="module")
def report(runs, prompts_file):
  workdirs, cache, tmp = runs
  return evaluator.run(workdirs=[workdirs["long"], workdirs["short"]], protocol=PROTOCOL,
                      prompts_file=prompts_file, output_dir=str(tmp / "out"), cache_dir=cache,
                      devices=jax.local_devices()[:2])


def test_report_and_scatter_plot_are_written_for_several_runs(runs, report):
  _, _, tmp = runs
  with open(tmp / "out" / "report.json") as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(report))
  assert written["protocol"]["num_samples"] == 3 and written["devices"] == 2
  assert [r["label"] for r in written["runs"]] == ["long", "short"]
  for r in written["runs"]:
    # Overall and per-category text similarity are means over the prompts (one per category).
    texts = [p["text_similarity"] for p in r["prompts"]]
    assert texts[0] != texts[1]  # two prompts, two texts: two scores
    assert r["text_similarity"] == pytest.approx((texts[0] + texts[1]) / 2)
    assert r["text_similarity_by_category"] == pytest.approx(
        {"background": texts[0], "style": texts[1]})
    for p in r["prompts"]:  # the cosine of the mean image is never nearer zero than the mean cosine
      assert abs(p["text_similarity_of_mean"]) >= abs(p["text_similarity"]) - 1e-9
    assert r["num_prompts"] == 2 and r["reconstruction_prompt"] == "a photo of {}"
    assert [p["num_images"] for p in r["prompts"]] == [3, 3]
    assert r["base_model"] == "tiny-ldm" and r["num_training_images"] == 4
  assert written["runs"][0]["step"] == 2 and written["runs"][1]["step"] == 1
  # Different vectors, same seeds: different scores.
  assert written["runs"][0]["image_similarity"] != written["runs"][1]["image_similarity"]
  with Image.open(tmp / "out" / "scatter.png") as img:
    assert img.size == (960, 600)


def test_scores_are_the_papers_metrics_of_the_generated_images(runs, report):
  """Regenerates run 'long''s images with the same seeds and recomputes both scores."""
  workdirs, cache, _ = runs
  from ti_jax.data import image_loader
  from ti_jax.embeddings import pseudo_words
  from ti_jax.runtime import run_dir
  vectors, meta = run_dir.learned_from_workdir(workdirs["long"])
  sd = load_stable_diffusion("tiny-ldm", cache_dir=cache)
  ids = pseudo_words.add_placeholder_tokens(sd.tokenizer, meta["placeholder_token"], 1)
  gen = generation.ImageGenerator(sd, scheduler="ddim", num_inference_steps=2, guidance_scale=5.0,
                                height=64, width=64, devices=jax.local_devices()[:1])
  make = lambda template: gen.generate(
      [prompt_lists.with_token(template, "<S*>")] * 3, seed=0, learned=[(vectors, ids)])
  clip = clip_io.load_clip("tiny-clip", cache_dir=cache)
  training = image_loader.load_training_images(os.path.join(REPO, "examples/toy"), 64, False)
  image_sim = clip_scores.image_similarity(clip_io.image_features(clip, make("a photo of {}")),
                                            clip_io.image_features(clip, training.pixels))
  moon = make("a photo of {} on the moon")
  text = clip_io.text_features(clip, ["a photo of on the moon"])[0]
  text_sim = clip_scores.text_similarity(clip_io.image_features(clip, moon), text)
  long = report["runs"][0]
  # 2 devices there, 1 here: the images may differ by a uint8 level.
  assert abs(long["image_similarity"] - image_sim) < 1e-3
  assert abs(long["prompts"][0]["text_similarity"] - text_sim) < 1e-3
  assert long["prompts"][0]["template"] == "a photo of {} on the moon"


def test_shipped_prompt_list_is_used_without_a_prompts_file(runs):
  workdirs, cache, tmp = runs
  # The `report` fixture's protocol and devices: its compiled sampler, not a new one.
  report = evaluator.run(workdirs=[workdirs["short"]], protocol=PROTOCOL,
                        output_dir=str(tmp / "shipped"), cache_dir=cache,
                        devices=jax.local_devices()[:2])
  assert report["runs"][0]["num_prompts"] == len(prompt_lists.prompts_for("object"))


@pytest.mark.parametrize("kwargs, needle", [
    (dict(workdirs=["/nonexistent/run"]), "does not exist"),
    (dict(prompts_file="/nonexistent/prompts.txt"), "--prompts_file"),
    (dict(train_data_dir="/nonexistent/images"), "training images"),
    (dict(protocol=evaluator.Protocol(num_samples=0)), "num_samples"),
    (dict(protocol=evaluator.Protocol(scheduler="nope")), "nope"),
    (dict(protocol=evaluator.Protocol(seed=2**32)), "seed must be in"),
])
def test_bad_input_is_a_one_line_error(runs, kwargs, needle):
  workdirs, cache, tmp = runs
  args = dict(workdirs=[workdirs["short"]], protocol=PROTOCOL, output_dir=str(tmp / "bad"),
              cache_dir=cache, devices=jax.local_devices()[:1])
  args.update(kwargs)
  with pytest.raises(errors.UserError) as e:
    evaluator.run(**args)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_help_and_errors_are_clean():
  done = subprocess.run([sys.executable, "-m", "ti_jax.evaluate", "--help"], capture_output=True,
                        text=True, timeout=120, cwd=REPO)
  # absl's --help exits with status 1, as for every absl tool.
  assert "--num_samples" in done.stdout and "paper: 64" in done.stdout
  done = subprocess.run([sys.executable, "-m", "ti_jax.evaluate", "--workdir", "/nonexistent"],
                        capture_output=True, text=True, timeout=120, cwd=REPO)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == ["error: run directory /nonexistent does not exist"]


def test_every_run_is_checked_before_any_model_loads(runs, tmp_path):
  workdirs, cache, _ = runs
  not_a_run = tmp_path / "not_a_run"
  not_a_run.mkdir()
  with pytest.raises(errors.UserError, match="not a ti_jax run directory"):
    evaluator.run(workdirs=[workdirs["short"], str(not_a_run)], protocol=PROTOCOL,
                 output_dir=str(tmp_path / "out"), cache_dir=cache,
                 devices=jax.local_devices()[:1])
  assert not (tmp_path / "out").exists()  # nothing generated, nothing written
  with pytest.raises(errors.UserError, match="no checkpoint at step 7"):
    evaluator.run(workdirs=[workdirs["short"]], step=7, protocol=PROTOCOL,
                 output_dir=str(tmp_path / "out"), cache_dir=cache,
                 devices=jax.local_devices()[:1])


def test_an_sdxl_run_is_evaluated_with_both_encoders_vectors(tmp_path, prompts_file, runs,
                                                             tiny_sdxl_run, monkeypatch):
  """An SDXL run's report, its images generated with the checkpoint's vectors for both
  text encoders."""
  _, cache, _ = runs
  workdir = tiny_sdxl_run  # 1 training step on tiny-sdxl (conftest.py)
  seen = []
  real = evaluator.generation.generate_images
  def spy(*args, **kwargs):
    seen.append(kwargs)
    return real(*args, **kwargs)
  monkeypatch.setattr(evaluator.generation, "generate_images", spy)
  # Euler, 3 steps, guidance 5 on one device, 2 images a call: the program
  # tests/sampling/test_sdxl_sample.py's `gen` samples with, compiled once for both files.
  protocol = evaluator.Protocol(num_samples=2, num_inference_steps=3, scheduler="euler",
                                guidance_scale=5.0, clip_model="tiny-clip")
  report = evaluator.run(workdirs=[workdir], protocol=protocol, prompts_file=prompts_file,
                        output_dir=str(tmp_path / "out"), cache_dir=cache,
                        devices=jax.local_devices()[:1])["runs"][0]
  assert 0 < report["image_similarity"] <= 1 and len(report["prompts"]) == 2
  from ti_jax.runtime import run_dir
  vectors, _ = run_dir.encoder_vectors_from_workdir(workdir, None)
  assert seen and all(len(k["learned"]) == len(k["tokenizers"]) == 2 for k in seen)
  for k in seen:  # each encoder gets its own vectors, under its own tokenizer's ids
    for (got, ids), expected, tokenizer in zip(k["learned"], vectors, k["tokenizers"],
                                               strict=True):
      np.testing.assert_array_equal(got, expected)
      assert max(ids) < len(tokenizer)  # ids of that encoder's own tokenizer
