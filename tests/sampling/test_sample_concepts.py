"""ti_jax.sample --concept on a many-concept run (written directly: no training)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from multi_concept_run import STYLE, concept_entry, write_multi_run
from PIL import Image

from ti_jax.embeddings import embedding_io, exporter
from ti_jax.runtime import run_dir
from ti_jax.sampling import concepts as concept_lib
from ti_jax.sampling import runner

ENTRIES = [concept_entry("cat-toy", "<cat-toy>"), concept_entry("pot", "<pot>", STYLE),
           concept_entry("dog", "<dog>")]
FAST = dict(num_images=1, num_inference_steps=2, scheduler="ddim", guidance_scale=5.0,
            seed=0)


@pytest.fixture(scope="module", name="multi")
def _multi(tmp_path_factory, tiny_sd15):
  workdir = str(tmp_path_factory.mktemp("multi") / "run")
  write_multi_run(workdir, tiny_sd15, ENTRIES, non_finite={"dog": 2})
  return workdir


def _pixels(paths):
  return np.stack([np.asarray(Image.open(p)) for p in paths])


def test_sampled_concepts_equal_their_exported_files(multi, tiny_sd15, tmp_path):
  devices = jax.local_devices()[:1]
  prompts = ["a photo of a <pot>", "a <cat-toy> beside a <pot>"]
  paths = runner.run(prompts=prompts, workdir=multi, concept=["cat-toy,pot"], devices=devices,
                     **FAST)
  assert [os.path.dirname(p) for p in paths] == [os.path.join(multi, "samples")] * 2
  assert "_step4_" in os.path.basename(paths[0])
  assert Image.open(paths[1]).text["prompt"] == prompts[1]
  files = [p for p, _ in exporter.export_selected(multi, "diffusers", ["cat-toy", "pot"],
                                                  output=str(tmp_path / "files"))]
  alone = runner.run(prompts=prompts, embedding_sources=files,
                     pretrained_model_name_or_path=tiny_sd15, devices=devices,
                     output_dir=str(tmp_path / "alone"), **FAST)
  np.testing.assert_array_equal(_pixels(paths), _pixels(alone))


def test_one_concepts_samples_go_to_its_folder(multi):
  one = {"selected_concepts": ["pot"]}
  assert concept_lib.concepts_folder(multi, one) == os.path.join(multi, "pot")
  assert concept_lib.concepts_folder(multi, {"selected_concepts": ["pot", "dog"]}) == multi
  assert concept_lib.concepts_folder(multi, {}) == multi


@pytest.mark.parametrize("kw, needle", [
    (dict(concept=[]), "is a run of 3 concepts: pass --concept NAME"),
    (dict(concept=["all"]), "concept 'dog'"),
    (dict(concept=["cat"]), "--concept cat: "),
    (dict(concept=["pot"], workdir=None, embedding_sources=["x.safetensors"]),
     "--concept picks concepts of the --workdir run"),
])
def test_sample_refusals_are_one_line_before_any_model_loads(multi, tmp_path, kw, needle):
  args = dict(prompts=["a <pot>"], workdir=multi, output_dir=str(tmp_path / "x"), **FAST)
  args.update(kw)
  with pytest.raises(Exception) as e:
    runner.run(**args)
  assert needle in str(e.value) and "\n" not in str(e.value)
  assert not (tmp_path / "x").exists()


def test_a_many_concept_run_is_not_read_as_one_concept(multi):
  with pytest.raises(run_dir.WorkdirError, match=r"is a run of 3 concepts \(cat-toy, pot, dog\)"):
    embedding_io.load_concepts(multi)


def test_sample_command_line_takes_concept(multi):
  env = dict(os.environ, PYTHONPATH=REPO)
  done = subprocess.run([sys.executable, "-m", "ti_jax.sample", "--workdir", multi, "--prompt",
                         "a <pot>", "--concept", "pot", "--concept", "cow"], capture_output=True,
                        text=True, env=env, cwd=REPO, check=False)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      f"error: --concept cow: {multi} has no such concept; its concepts: cat-toy, pot, dog "
      "(or all)"]
  helped = subprocess.run([sys.executable, "-m", "ti_jax.sample", "--help"], capture_output=True,
                          text=True, env=env, cwd=REPO, check=False)
  assert helped.returncode == 0 and "--concept" in helped.stdout and "'all'" in helped.stdout
