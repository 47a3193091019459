"""Optimizers through optax: each trains the learned vectors only and keeps no frozen state."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, config_module, offline_config, step_pieces

from ti_jax.data import choices
from ti_jax.embeddings import pseudo_words
from ti_jax.runtime import parallel
from ti_jax.training import checkpointing, train_lib
from ti_jax.training import config as training_config

TOY = os.path.join(REPO, "examples", "toy")
# Learning rates at which a few steps move the vectors visibly (prodigy's is a multiplier).
LR = {"adamw": 5e-3, "lion": 1e-3, "prodigy": 1.0, "adafactor": 5e-2, "sgd": 1.0}


@pytest.fixture(scope="module")
def setup(tiny_sd15):
  """A tiny SD with two placeholder vectors, cached latents and the step's settings."""
  return step_pieces(tiny_sd15, 2)


def _batch(setup, step, size=2):
  index = np.arange(size)
  view, tmpl = choices.example_choices(0, step, index, global_batch_size=size,
                                       num_images=setup["num_images"], flip_p=0.5,
                                       num_templates=len(setup["template_ids"]))
  return {"input_ids": setup["template_ids"][tmpl], "view_index": view,
          "example_index": index.astype(np.int32)}


@pytest.mark.parametrize("name", train_lib.OPTIMIZERS)
def test_each_optimizer_trains_only_the_placeholder_rows(setup, name):
  devices = jax.local_devices()[:1]
  lr = optax.constant_schedule(LR[name])
  opt = train_lib.make_optimizer(lr, 0.9, 0.999, 1e-8, 1e-2, name)
  step_fn = train_lib.make_pmapped_step(setup["settings"], opt, lr, devices)
  state = parallel.replicate(train_lib.init_state({"embeds": setup["init"].vectors}, opt), devices)
  frozen = parallel.replicate(setup["frozen"], devices)
  for step in range(3):
    state, metrics = step_fn(state, frozen, parallel.shard(_batch(setup, step), 1))
    assert np.isfinite(float(parallel.unreplicate(metrics["loss"])))
  learned = np.asarray(parallel.unreplicate(state).params["embeds"])  # [2, D]
  assert np.all(np.isfinite(learned))
  # The vectors trained (Prodigy starts from a step size of 1e-6 and grows it as it goes).
  assert np.abs(learned - setup["init"].vectors).max() > (1e-6 if name == "prodigy" else 1e-4)
  # What the text encoder sees: the frozen table, except the placeholder rows.
  table = setup["table"]
  all_ids = jnp.arange(max(setup["ids"]) + 1, dtype=jnp.int32)[None]  # [1, V + n]
  looked_up = np.asarray(pseudo_words.embed_tokens(
      jnp.asarray(table), jnp.asarray(learned), jnp.asarray(setup["ids"], jnp.int32),
      all_ids))[0]  # [V + n, D]
  np.testing.assert_array_equal(looked_up[:table.shape[0]], table)
  np.testing.assert_array_equal(looked_up[setup["ids"]], learned)
  # The frozen params the step read are unchanged on the device.
  for b, a in zip(jax.tree_util.tree_leaves(setup["frozen"]),
                  jax.tree_util.tree_leaves(parallel.unreplicate(frozen))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", train_lib.OPTIMIZERS)
def test_no_optimizer_keeps_state_for_frozen_leaves(name):
  opt = train_lib.make_optimizer(optax.constant_schedule(1e-2), 0.9, 0.999, 1e-8, 1e-2, name)
  params = {"embeds": jnp.ones((2, 8)), "frozen_table": jnp.ones((1000, 8))}
  opt_state = opt.init(params)
  sizes = [np.size(x) for x in jax.tree_util.tree_leaves(opt_state)]
  # Per-vector state at most the [2, 8] vectors' size; nothing of the 8000-value table.
  assert sizes and max(sizes) <= 16, (name, sizes)
  updates, _ = opt.update({"embeds": jnp.full((2, 8), 0.5), "frozen_table": jnp.ones((1000, 8))},
                          opt_state, params)
  assert not np.any(np.asarray(updates["frozen_table"]))
  assert np.all(np.asarray(updates["embeds"]) != 0), name


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_weight_decay_is_decoupled_and_scaled_by_the_learning_rate(name):
  """With a zero gradient the update is the decay alone: -lr * weight_decay * params."""
  lr, wd = 0.1, 0.3
  opt = train_lib.make_optimizer(optax.constant_schedule(lr), 0.9, 0.999, 1e-8, wd, name)
  params = {"embeds": jnp.arange(1.0, 17.0).reshape(2, 8)}
  updates, _ = opt.update({"embeds": jnp.zeros((2, 8))}, opt.init(params), params)
  np.testing.assert_allclose(np.asarray(updates["embeds"]), -lr * wd * np.asarray(params["embeds"]),
                             rtol=1e-6)


def _config(**overrides):
  return offline_config(config_module("object").get_config("tiny"), "/tmp", train_data_dir=TOY,
                        **overrides)


def test_unknown_optimizer_is_one_line_listing_the_choices(tmp_path):
  with pytest.raises(training_config.ConfigError) as e:
    training_config.validate_config(_config(optimizer="adam"))
  assert str(e.value) == ("config.optimizer must be one of adamw, lion, prodigy, adafactor, "
                          "sgd, got 'adam'")
  run = subprocess.run(
      [sys.executable, "-m", "ti_jax.train", "--config",
       os.path.join(REPO, "configs/object.py:tiny"), "--workdir", str(tmp_path / "w"),
       f"--config.train_data_dir={TOY}", "--config.optimizer=adam"],
      capture_output=True, text=True, timeout=300)
  assert run.returncode != 0
  assert run.stderr.strip().splitlines() == [f"error: {e.value}"], run.stderr
  assert not (tmp_path / "w").exists()


def _metadata(config):
  return checkpointing.run_metadata(config, tokens=["<toy>"], token_ids=[5], image_tokens=[],
                                    embedding_dim=32, model_path="m", global_batch=4,
                                    base_lr=1e-3, image_paths=["a.png"])


def test_resume_with_another_optimizer_is_refused_and_old_checkpoints_mean_adamw():
  saved = _metadata(_config())
  assert checkpointing.identity_diffs(saved, _metadata(_config(optimizer="lion"))) == [
      "optimizer: 'adamw' there, 'lion' now"]
  old = {k: v for k, v in saved.items() if k != "optimizer"}  # written before the field
  assert checkpointing.identity_diffs(old, _metadata(_config())) == []
  assert checkpointing.identity_diffs(old, _metadata(_config(optimizer="sgd"))) == [
      "optimizer: 'adamw' there, 'sgd' now"]
