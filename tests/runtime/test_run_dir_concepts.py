"""Reading a many-concept run directory: names, --concept selection, one concept's vectors,
and ti_jax.export of one, several or all concepts (the run is written directly: no training)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from multi_concept_run import STYLE, concept_entry, write_multi_run

from ti_jax import errors
from ti_jax.embeddings import embedding_io, exporter
from ti_jax.runtime import run_dir

ENTRIES = [concept_entry("cat-toy", "<cat-toy>"),
           concept_entry("pot", "<pot>", STYLE, learnable_property="style", seed=3),
           concept_entry("dog", "<dog>", learning_rate=1e-3)]


@pytest.fixture(scope="module", name="multi")
def _multi(tmp_path_factory):
  """A run of three concepts ("dog" went non-finite at step 3); (workdir, vectors)."""
  workdir = str(tmp_path_factory.mktemp("multi") / "run")
  vectors = write_multi_run(workdir, "tiny-sd15", ENTRIES, non_finite={"dog": 3})
  return workdir, vectors


@pytest.fixture(scope="module", name="single")
def _single(tmp_path_factory):
  """A single-concept run directory (run.json without "concepts", `[n, D]` vectors)."""
  workdir = str(tmp_path_factory.mktemp("single") / "run")
  run_dir.write_identity(workdir, {"placeholder_token": "<toy>"})
  ckpts = run_dir.Checkpoints(workdir)
  vectors = np.random.default_rng(1).normal(size=(1, 32)).astype(np.float32)
  ckpts.save(2, {"state": {"params": {"embeds": vectors}}},
             {"placeholder_token": "<toy>", "step": 2})
  ckpts.close()
  return workdir


def test_concept_names_tell_the_kinds_of_run_apart(multi, single):
  assert run_dir.concept_names(multi[0]) == ["cat-toy", "pot", "dog"]
  assert run_dir.concept_names(single) is None


@pytest.mark.parametrize("flag, names", [
    (["pot"], ["pot"]), (["dog", "cat-toy"], ["dog", "cat-toy"]),
    (["pot, cat-toy", "pot"], ["pot", "cat-toy"]), (["all"], ["cat-toy", "pot", "dog"]),
    (["pot,all"], ["cat-toy", "pot", "dog"]),
])
def test_select_concepts(multi, flag, names):
  assert run_dir.select_concepts(multi[0], flag) == names


@pytest.mark.parametrize("flag, needle", [
    ([], "is a run of 3 concepts: pass --concept NAME (repeat it or separate names with "
         "commas; --concept all for every one); its concepts: cat-toy, pot, dog"),
    (["pot,cat"], "--concept cat: "),
])
def test_a_bad_selection_is_one_line_listing_the_names(multi, flag, needle):
  with pytest.raises(run_dir.WorkdirError) as e:
    run_dir.select_concepts(multi[0], flag)
  assert needle in str(e.value) and "\n" not in str(e.value)
  assert "cat-toy, pot, dog" in str(e.value)


def test_single_concept_run_refuses_concept_and_reads_as_before(single):
  assert run_dir.select_concepts(single, []) is None
  with pytest.raises(run_dir.WorkdirError, match=r"--concept x: .* is a run of one concept"):
    run_dir.select_concepts(single, ["x"])
  vectors, meta = run_dir.encoder_vectors_from_workdir(single)
  assert len(vectors) == 1 and vectors[0].shape == (1, 32) and meta["step"] == 2


def test_one_concepts_vectors_and_metadata_read_as_a_single_runs(multi):
  workdir, vectors = multi
  (pot, meta), (cat, cat_meta) = run_dir.concept_vectors_from_workdir(workdir, ["pot", "cat-toy"])
  assert len(pot) == 1 and pot[0].shape == (2, 32)
  np.testing.assert_array_equal(pot[0], vectors[1][0])
  np.testing.assert_array_equal(cat[0], vectors[0][0])
  assert meta["placeholder_token"] == "<pot>" and meta["concept"] == "pot"
  assert meta["learnable_property"] == "style" and meta["step"] == 4
  assert meta["config"]["train_data_dir"] == STYLE and meta["config"]["seed"] == 3
  assert meta["config"]["resolution"] == 64  # shared fields stay the run's
  assert meta["train_data_path"] == os.path.abspath(STYLE)
  assert run_dir.CONCEPTS_KEY not in meta and run_dir.NON_FINITE_KEY not in meta
  assert cat_meta["placeholder_token"] == "<cat-toy>" and cat_meta["config"]["seed"] == 0


def test_a_concept_that_went_non_finite_is_refused_in_one_line(multi):
  with pytest.raises(run_dir.WorkdirError) as e:
    run_dir.concept_vectors_from_workdir(multi[0], ["dog"])
  message = str(e.value)
  assert "concept 'dog'" in message and "non-finite (NaN or inf) at step 3" in message
  assert "other concepts: cat-toy, pot" in message and "\n" not in message


def test_the_checkpoint_must_hold_one_row_per_concept(tmp_path):
  workdir = str(tmp_path / "run")
  write_multi_run(workdir, "tiny-sd15", ENTRIES[:2])
  identity = run_dir.read_identity(workdir)
  ckpts = run_dir.Checkpoints(workdir)
  state, meta = ckpts.restore_untyped(4)
  meta[run_dir.CONCEPTS_KEY] = ENTRIES  # three listed, two rows
  ckpts.save(5, state, meta)
  ckpts.close()
  assert run_dir.read_identity(workdir) == identity
  with pytest.raises(run_dir.WorkdirError, match=r"'embeds' has shape \(2, 2, 32\), not \[3, n"):
    run_dir.concept_vectors_from_workdir(workdir, ["pot"])
  (v,), _ = run_dir.concept_vectors_from_workdir(workdir, ["pot"], step=4)[0]
  assert v.shape == (2, 32)


# --- ti_jax.export ---------------------------------------------------------------------------


def test_export_one_several_and_all_concepts(multi, tmp_path):
  workdir, vectors = multi
  [(path, concept)] = exporter.export_selected(workdir, "diffusers", ["pot"],
                                               output=str(tmp_path / "one.safetensors"))
  assert path == str(tmp_path / "one.safetensors") and concept.token == "<pot>"
  [back] = embedding_io.load_concepts(path)
  np.testing.assert_array_equal(back.vectors[0], vectors[1][0])
  out = tmp_path / "several"
  done = exporter.export_selected(workdir, "a1111", ["cat-toy,pot"], output=str(out))
  assert [p for p, _ in done] == [str(out / "cat-toy" / "<cat-toy>.safetensors"),
                                  str(out / "pot" / "<pot>.safetensors")]
  for (p, _), v in zip(done, vectors):
    np.testing.assert_array_equal(embedding_io.load_concepts(p)[0].vectors[0], v[0])
  # "all" with a concept that went non-finite: refused, nothing written anywhere.
  with pytest.raises(run_dir.WorkdirError, match="concept 'dog'"):
    exporter.export_selected(workdir, "diffusers", ["all"], output=str(tmp_path / "all"))
  assert not (tmp_path / "all").exists()
  assert not any(os.path.isdir(os.path.join(workdir, e["name"])) for e in ENTRIES)


def test_export_defaults_to_each_concepts_folder(tmp_path):
  workdir = str(tmp_path / "run")
  vectors = write_multi_run(workdir, "tiny-sd15", ENTRIES[:2], widths=(32, 32))  # SDXL-shaped
  done = exporter.export_selected(workdir, "diffusers", ["all"])
  for (path, concept), entry, v in zip(done, ENTRIES, vectors):
    assert path == os.path.join(workdir, entry["name"], "export", "diffusers",
                                "learned_embeds.safetensors")
    assert os.path.exists(path.replace("learned_embeds", "learned_embeds_2"))
    [back] = embedding_io.load_concepts(path)
    assert back.token == entry["placeholder_token"] and len(back.vectors) == 2
    np.testing.assert_array_equal(back.vectors[1], v[1])
  with pytest.raises(embedding_io.EmbeddingFileError, match="already exists; pass --overwrite"):
    exporter.export_selected(workdir, "diffusers", ["pot"])
  assert exporter.export_selected(workdir, "diffusers", ["pot"], overwrite=True)


def test_export_refuses_concept_on_a_single_run_and_needs_it_on_a_many_concept_run(multi, single):
  with pytest.raises(errors.UserError, match="is a run of one concept"):
    exporter.export_selected(single, "diffusers", ["pot"])
  with pytest.raises(errors.UserError, match="is a run of 3 concepts"):
    exporter.export_selected(multi[0], "diffusers", [])


def test_export_command_line(multi, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  cmd = [sys.executable, "-m", "ti_jax.export", "--workdir", multi[0], "--format", "kohya",
         "--output", str(tmp_path / "k")]
  ok = subprocess.run(cmd + ["--concept", "pot", "--concept", "cat-toy"], capture_output=True,
                      text=True, env=env, cwd=REPO, check=False)
  assert ok.returncode == 0, ok.stderr
  assert ok.stderr.count("wrote ") == 2 and (tmp_path / "k" / "pot" / "<pot>.safetensors").exists()
  bad = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines() == [
      f"error: {multi[0]} is a run of 3 concepts: pass --concept NAME (repeat it or separate "
      "names with commas; --concept all for every one); its concepts: cat-toy, pot, dog"]
  helped = subprocess.run([sys.executable, "-m", "ti_jax.export", "--help"], capture_output=True,
                          text=True, env=env, cwd=REPO, check=False)
  assert helped.returncode == 0 and "--concept" in helped.stdout and "'all'" in helped.stdout
