"""A run of many concepts (`config.concepts_file`): one compiled mesh step trains them all.

Each concept equals itself trained alone (several device layouts, one of them over two
processes); a resumed run continues exactly; a concept that diverges is frozen, named and
not exported while the others train on; the command line writes each concept's files; a
bad concepts file is one line and writes nothing.
"""

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest
import safetensors.numpy
from conftest import REPO, config_module, offline_config
from test_multihost import _two_processes

from ti_jax.runtime import run_dir
from ti_jax.training import concepts_file, concepts_run, dry_run, tensorboard, trainer

TOY = os.path.join(REPO, "examples", "toy")
STYLE = os.path.join(REPO, "examples", "style")
STEPS = 4
# Three concepts that differ in every field a concept may set (images, property, start,
# learning rate, seed). The global batch is fixed, so any device count trains the same.
LINES = (
    {"placeholder_token": "<a>", "train_data_dir": TOY},
    {"placeholder_token": "<b>", "train_data_dir": STYLE, "learnable_property": "style",
     "learning_rate": 1e-2, "seed": 7},
    {"placeholder_token": "<c>", "train_data_dir": TOY, "initializer_token": "cat"},
)


def _config(cache, concepts: str = "", **overrides):
  c = config_module("object").get_config("tiny")
  return offline_config(c, cache, **{
      "max_train_steps": STEPS, "checkpointing_steps": 2, "log_every_steps": 1,
      "global_batch_size": 4, "concepts_file": concepts, **overrides})


def _write_concepts(path, lines) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(line) + "\n" for line in lines))
  return str(path)


def _rel(a, b) -> float:
  return float(np.abs(a - b).max() / np.abs(b).max())


def _saved(workdir, name):
  return safetensors.numpy.load_file(
      os.path.join(workdir, name, "learned_embeds.safetensors"))[f"<{name}>"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Each concept trained alone (1 device), and all three in one run on 8 devices (4 concept
  shards of 2 devices: each concept's batch split over two), with validation images."""
  root = tmp_path_factory.mktemp("concepts")
  cache = root / "cache"
  concepts = _write_concepts(root / "concepts.jsonl", LINES)
  alone = {}
  for spec in concepts_file.read_concepts_file(concepts, _config(cache, concepts)):
    c = concepts_file.concept_config(_config(cache, concepts), spec)
    alone[spec.name] = trainer.run(c, str(root / f"alone-{spec.name}"),
                                   devices=jax.devices()[:1], progress=False)["embeds"]
  many = concepts_run.run(
      _config(cache, concepts, report_to="tensorboard", validation_prompt="a photo of {}",
              num_validation_images=1, validation_inference_steps=2, validation_steps=STEPS),
      str(root / "many"), devices=jax.devices()[:8], progress=False)
  return {"root": root, "cache": cache, "concepts": concepts, "alone": alone, "many": many}


def test_each_concept_trained_with_others_equals_it_trained_alone(runs):
  for name, alone in runs["alone"].items():
    assert _rel(runs["many"]["concepts"][name]["embeds"], alone) <= 1e-5
    np.testing.assert_array_equal(_saved(runs["root"] / "many", name),
                                  runs["many"]["concepts"][name]["embeds"])
  # They learned different things (different images, rates and seeds).
  a, b = runs["alone"]["a"], runs["alone"]["b"]
  assert _rel(a, b) > 1e-3


def test_the_run_directory_holds_one_run_and_a_folder_per_concept(runs):
  workdir = runs["root"] / "many"
  assert run_dir.concept_names(str(workdir)) == ["a", "b", "c"]
  got = run_dir.concept_vectors_from_workdir(str(workdir), ["b"])
  (vectors,), meta = got[0]
  np.testing.assert_array_equal(vectors, runs["many"]["concepts"]["b"]["embeds"])
  assert meta["placeholder_token"] == "<b>" and meta["seed"] == 7
  assert meta["config"]["learnable_property"] == "style"
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert {(r["step"], r["concept"]) for r in records} == {
      (s, n) for s in range(1, STEPS + 1) for n in "abc"}
  assert all(np.isfinite(r["loss"]) for r in records)
  events = tensorboard.read_events(str(workdir / "tensorboard"))
  assert {f"{n}/train/loss" for n in "abc"} <= set(events.scalars)
  assert len(events.scalars["b/train/loss"]) == STEPS
  for name in "abc":  # each concept's validation images, in its folder and TensorBoard
    assert os.listdir(workdir / name / "validation")
    assert f"{name}/validation/p0" in events.images


def test_a_resumed_run_continues_exactly(runs):
  """A run killed after its step-2 checkpoint (the later one removed) resumes to the same
  vectors as the run that was not interrupted."""
  workdir = runs["root"] / "resumed"
  shutil.copytree(runs["root"] / "many", workdir)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))
  for name in "abc":
    os.unlink(workdir / name / "learned_embeds.safetensors")
  resumed = concepts_run.run(_config(runs["cache"], runs["concepts"]), str(workdir),
                             devices=jax.devices()[:8], progress=False)
  for name in "abc":
    np.testing.assert_array_equal(resumed["concepts"][name]["embeds"],
                                  runs["many"]["concepts"][name]["embeds"])
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == sorted(steps) and steps.count(STEPS) == 3  # each step logged once


def test_a_diverging_concept_is_frozen_named_and_not_exported_while_the_others_train(
    runs, capsys):
  lines = LINES + ({"placeholder_token": "<d>", "train_data_dir": TOY, "learning_rate": 1e30},)
  concepts = _write_concepts(runs["root"] / "diverging.jsonl", lines)
  workdir = runs["root"] / "diverging"
  result = concepts_run.run(_config(runs["cache"], concepts), str(workdir),
                            devices=jax.devices()[:8], progress=False)
  err = capsys.readouterr().err
  frozen_lines = [line for line in err.splitlines() if line.startswith("concept d:")]
  assert len(frozen_lines) == 1 and "frozen at its last finite vectors" in frozen_lines[0]
  assert list(result["non_finite"]) == ["d"]
  for name in "abc":  # the others train on, as alone
    assert _rel(result["concepts"][name]["embeds"], runs["alone"][name]) <= 1e-5
  assert not os.path.exists(workdir / "d" / "learned_embeds.safetensors")
  with pytest.raises(run_dir.WorkdirError, match="concept 'd'.*refused"):
    run_dir.concept_vectors_from_workdir(str(workdir), ["d"])
  meta = run_dir.Checkpoints(str(workdir)).restore_metadata(STEPS)
  assert meta[run_dir.NON_FINITE_KEY] == {"d": result["non_finite"]["d"]}


def test_bad_concepts_files_are_one_line_and_write_nothing(tmp_path):
  cache = tmp_path / "cache"
  duplicate = _write_concepts(tmp_path / "dup.jsonl", LINES[:1] + LINES[:1])
  with pytest.raises(concepts_file.ConceptsFileError, match="line 2: placeholder_token"):
    concepts_run.run(_config(cache, duplicate), str(tmp_path / "w1"), progress=False)
  empty = tmp_path / "empty-images"
  empty.mkdir()
  no_images = _write_concepts(tmp_path / "none.jsonl",
                              LINES[:1] + ({"placeholder_token": "<e>",
                                            "train_data_dir": str(empty)},))
  with pytest.raises(concepts_file.ConceptsFileError, match=r"line 2 \(concept e\): ") as e:
    concepts_run.run(_config(cache, no_images), str(tmp_path / "w2"), progress=False)
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "w1") and not os.path.exists(tmp_path / "w2")
  with pytest.raises(Exception, match="concepts_file is set"):
    trainer.run(_config(cache, duplicate), str(tmp_path / "w3"), progress=False)


def test_cli_on_two_processes_trains_the_concepts_over_both_hosts(runs, tmp_path):
  """`python -m ti_jax.train --config.concepts_file=...` as 2 processes x 2 devices: the
  concept axis spans the hosts (4 concept shards of one device); each concept as alone."""
  workdir = tmp_path / "two"
  errs = _two_processes([
      "ti_jax.train", "--config", os.path.join(REPO, "configs/object.py:tiny"),
      "--workdir", str(workdir), f"--config.cache_dir={runs['cache']}",
      f"--config.concepts_file={runs['concepts']}", "--config.validation_prompt=",
      f"--config.max_train_steps={STEPS}", "--config.global_batch_size=4",
      f"--config.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"])
  assert "3 concepts on 4 concept shard(s) x 1 device(s) each" in errs[0]
  for name, alone in runs["alone"].items():
    assert _rel(_saved(workdir, name), alone) <= 1e-5


def test_dry_run_checks_and_describes_each_concept_and_writes_nothing(runs, tmp_path):
  lines = dry_run.dry_run(_config(runs["cache"], runs["concepts"]), str(tmp_path / "dry"))
  assert lines[0].startswith(f"dry run of {tmp_path / 'dry'} (a new run): 3 concepts")
  described = [line for line in lines if line.startswith("concept ")]
  assert [line.split()[1] for line in described] == ["a", "b", "c"]
  assert "style" in described[1] and "seed 7" in described[1]
  assert not os.path.exists(tmp_path / "dry")
  # The trained run's workdir: the dry run sees it resumes there.
  again = dry_run.dry_run(_config(runs["cache"], runs["concepts"]), str(runs["root"] / "many"))
  assert "resumes the run there" in again[0]


def test_on_tpu_the_mesh_takes_xla_attention_and_refuses_the_pallas_kernel(tmp_path):
  """jax.jit cannot partition the Pallas kernel over the concept axis: TPU's default attention
  becomes XLA's; an explicit pallas_tpu is one line; elsewhere the config is left as it is."""
  tpu = [types.SimpleNamespace(platform="tpu")]
  config = _config(tmp_path, "concepts.jsonl")
  assert concepts_run.mesh_attention(config, tpu).attention_impl == "xla"
  assert config.attention_impl == ""  # a copy: the caller's config unchanged
  assert concepts_run.mesh_attention(config, jax.devices()[:1]) is config
  with pytest.raises(concepts_file.config_lib.ConfigError, match="cannot train many concepts"):
    concepts_run.mesh_attention(_config(tmp_path, "c", attention_impl="pallas_tpu"), tpu)
