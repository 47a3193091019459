"""ti_jax.edit --concept on a many-concept run (written directly: no training)."""

import os

import jax
import numpy as np
import pytest
from multi_concept_run import STYLE, concept_entry, write_multi_run
from PIL import Image

from ti_jax.embeddings import exporter
from ti_jax.runtime import run_dir
from ti_jax.sampling import editing

ENTRIES = [concept_entry("cat-toy", "<cat-toy>"), concept_entry("pot", "<pot>", STYLE)]
PROMPT = "a photo of a <pot>"
FAST = dict(num_images=1, num_inference_steps=2, scheduler="ddim", guidance_scale=5.0, seed=0)


@pytest.fixture(scope="module", name="multi")
def _multi(tmp_path_factory, tiny_sd15):
  root = tmp_path_factory.mktemp("edit-multi")
  workdir = str(root / "run")
  write_multi_run(workdir, tiny_sd15, ENTRIES)
  rng = np.random.default_rng(0)
  image = str(root / "image.png")
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(image)
  mask = np.zeros((64, 64), np.uint8)
  mask[16:48, 16:48] = 255
  mask_path = str(root / "mask.png")
  Image.fromarray(mask).save(mask_path)
  return {"workdir": workdir, "image": image, "mask": mask_path, "root": root}


def _pixels(paths):
  return np.stack([np.asarray(Image.open(p)) for p in paths if "_grid" not in p])


def test_one_concepts_edits_go_to_its_folder_and_equal_its_exported_file(multi, tiny_sd15):
  devices = jax.local_devices()[:1]
  paths = editing.run(image=multi["image"], mask=multi["mask"], prompt=PROMPT,
                      workdir=multi["workdir"], concept=["pot"], devices=devices, **FAST)
  assert {os.path.dirname(p) for p in paths} == {os.path.join(multi["workdir"], "pot", "edits")}
  (file, _), = exporter.export_selected(multi["workdir"], "diffusers", ["pot"],
                                        output=str(multi["root"] / "pot.safetensors"))
  alone = editing.run(image=multi["image"], mask=multi["mask"], prompt=PROMPT,
                      embedding_sources=[file], pretrained_model_name_or_path=tiny_sd15,
                      devices=devices, output_dir=str(multi["root"] / "alone"), **FAST)
  np.testing.assert_array_equal(_pixels(paths), _pixels(alone))


def test_a_many_concept_run_needs_concept_in_one_line(multi):
  with pytest.raises(run_dir.WorkdirError, match="is a run of 2 concepts: pass --concept") as e:
    editing.run(image=multi["image"], mask=multi["mask"], prompt=PROMPT,
                workdir=multi["workdir"], **FAST)
  assert "\n" not in str(e.value) and "cat-toy, pot" in str(e.value)
  assert not os.path.exists(os.path.join(multi["workdir"], "edits"))
