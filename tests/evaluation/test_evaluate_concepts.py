"""ti_jax.evaluate --concept on a many-concept run: which runs it prepares (no evaluation)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from multi_concept_run import STYLE, TOY, concept_entry, write_multi_run

from ti_jax.evaluation import evaluator
from ti_jax.runtime import run_dir

ENTRIES = [concept_entry("cat-toy", "<cat-toy>"),
           concept_entry("pot", "<pot>", STYLE, learnable_property="style"),
           concept_entry("dog", "<dog>")]


@pytest.fixture(scope="module", name="runs")
def _runs(tmp_path_factory):
  """A run of three concepts ("dog" went non-finite) and a single-concept run."""
  root = tmp_path_factory.mktemp("eval_concepts")
  multi = str(root / "many")
  write_multi_run(multi, "tiny-sd15", ENTRIES, non_finite={"dog": 2})
  single = str(root / "single")
  run_dir.write_identity(single, {"placeholder_token": "<toy>"})
  ckpts = run_dir.Checkpoints(single)
  ckpts.save(3, {"state": {"params": {"embeds": np.ones((1, 32), np.float32)}}},
             {"placeholder_token": "<toy>", "step": 3, "train_data_path": TOY,
              "pretrained_model_name_or_path": "tiny-sd15", "resolution": 64})
  ckpts.close()
  return multi, single


def test_each_named_concept_is_a_run_of_its_own(runs):
  multi, _ = runs
  prepared, truth = evaluator.prepare_runs([multi], None, concept="pot,cat-toy")
  assert truth == ""  # the checker reads each concept's own concept.json
  assert [r.label for r in prepared] == ["many/pot", "many/cat-toy"]
  assert [r.concept.token for r in prepared] == ["<pot>", "<cat-toy>"]
  assert [r.folder for r in prepared] == [os.path.abspath(STYLE), os.path.abspath(TOY)]
  assert prepared[0].meta["learnable_property"] == "style" and prepared[0].resolution == 64
  assert evaluator.default_output_dir([multi], prepared) == os.path.join(multi, "eval")
  one, _ = evaluator.prepare_runs([multi], 4, concept="pot")
  assert [r.label for r in one] == ["many/pot@4"]
  assert evaluator.default_output_dir([multi], one) == os.path.join(multi, "pot", "eval")


def test_a_single_concept_run_keeps_concept_as_the_checkers_ground_truth(runs):
  multi, single = runs
  prepared, truth = evaluator.prepare_runs([single], None, concept="cross")
  assert truth == "cross" and [r.label for r in prepared] == ["single"]
  assert evaluator.default_output_dir([single], prepared) == os.path.join(single, "eval")
  # Beside a many-concept run, --concept selects its concepts; the single run is whole.
  mixed, truth = evaluator.prepare_runs([single, multi], None, concept="cat-toy")
  assert truth == "" and [r.label for r in mixed] == ["single", "many/cat-toy"]
  assert evaluator.default_output_dir([single, multi], mixed) == "eval"


@pytest.mark.parametrize("kw, needle", [
    (dict(concept=""), "is a run of 3 concepts: pass --concept NAME"),
    (dict(concept="all"), "concept 'dog'"),
    (dict(concept="pot,cow"), "--concept cow: "),
    (dict(concept="pot,cat-toy", train_data_dir=TOY), "--train_data_dir gives one concept's"),
])
def test_bad_selections_are_one_line(runs, kw, needle):
  with pytest.raises(Exception) as e:
    evaluator.prepare_runs([runs[0]], None, **kw)
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_evaluate_command_line_takes_concept(runs):
  env = dict(os.environ, PYTHONPATH=REPO)
  done = subprocess.run([sys.executable, "-m", "ti_jax.evaluate", "--workdir", runs[0],
                         "--concept", "pot", "--concept", "cow"], capture_output=True, text=True,
                        env=env, cwd=REPO, check=False)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      f"error: --concept cow: {runs[0]} has no such concept; its concepts: cat-toy, pot, dog "
      "(or all)"]
  out = subprocess.run([sys.executable, "-m", "ti_jax.evaluate", "--help"], capture_output=True,
                       text=True, env=env, cwd=REPO, check=False)
  assert out.returncode == 0 and "run of many concepts" in out.stdout
