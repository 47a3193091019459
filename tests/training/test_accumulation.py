"""Gradient accumulation: A micro-batches of b inside the step equal one batch of A * b."""

import dataclasses
import os
import types

import jax
import numpy as np
import optax
import pytest
from conftest import REPO, config_module, offline_config, step_pieces

from ti_jax.data import choices
from ti_jax.runtime import parallel
from ti_jax.training import inputs as run_inputs
from ti_jax.training import train_lib
from ti_jax.training import config as training_config

TOY = os.path.join(REPO, "examples", "toy")


@pytest.fixture(scope="module")
def setup(tiny_sd15):
  """A tiny SD, one placeholder vector, cached latents and the step's pieces."""
  return step_pieces(tiny_sd15, 1)


def _batch(setup, step, size):
  index = np.arange(size)
  view, tmpl = choices.example_choices(0, step, index, global_batch_size=size,
                                       num_images=setup["num_images"], flip_p=0.5,
                                       num_templates=len(setup["template_ids"]))
  return {"input_ids": setup["template_ids"][tmpl], "view_index": view,
          "example_index": index.astype(np.int32)}


def _train(setup, accumulation, steps=3):
  """Learned vectors and per-step losses after `steps` steps of a global batch of 4 on one
  device, as one batch of 4 (accumulation 1) or `accumulation` micro-batches."""
  devices = jax.local_devices()[:1]
  lr = optax.constant_schedule(5e-2)
  opt = train_lib.make_optimizer(lr, 0.9, 0.999, 1e-8, 1e-2)
  settings = dataclasses.replace(setup["settings"], gradient_accumulation_steps=accumulation)
  step_fn = train_lib.make_pmapped_step(settings, opt, lr, devices)
  state = parallel.replicate(train_lib.init_state({"embeds": setup["init"].vectors}, opt), devices)
  frozen = parallel.replicate(setup["frozen"], devices)
  losses, norms = [], []
  compiled = step_fn.lower(state, frozen, parallel.shard(_batch(setup, 0, 4), 1)).compile()
  setup.setdefault("temp_bytes", {})[accumulation] = compiled.memory_analysis().temp_size_in_bytes
  for step in range(steps):
    state, metrics = step_fn(state, frozen, parallel.shard(_batch(setup, step, 4), 1))
    losses.append(float(parallel.unreplicate(metrics["loss"])))
    norms.append(float(parallel.unreplicate(metrics["grad_norm"])))
  return np.asarray(parallel.unreplicate(state).params["embeds"]), losses, norms


def test_four_micro_batches_of_one_equal_one_batch_of_four(setup):
  whole, whole_losses, whole_norms = _train(setup, 1)
  micro, micro_losses, micro_norms = _train(setup, 4)
  # The same examples and draws, only the order of float sums differs.
  np.testing.assert_allclose(micro_losses, whole_losses, rtol=1e-5)
  np.testing.assert_allclose(micro_norms, whole_norms, rtol=1e-4)
  np.testing.assert_allclose(micro, whole, rtol=0, atol=1e-5)
  assert np.abs(whole - setup["init"].vectors).max() > 1e-3  # the steps moved the vectors
  # Two micro-batches of two are a third split of the same global batch.
  pairs, pair_losses, _ = _train(setup, 2)
  np.testing.assert_allclose(pair_losses, whole_losses, rtol=1e-5)
  np.testing.assert_allclose(pairs, whole, rtol=0, atol=1e-5)
  # The micro-batches run one at a time: the step holds fewer activations at once.
  temp = setup["temp_bytes"]
  print(f"step temporaries by accumulation steps: {temp}")
  assert temp[4] < temp[2] < temp[1], temp


def _fake_inputs(config, devices: int, num_images=4, num_templates=5, seq=7):
  """What `inputs.batch_for` reads of the run's inputs, for a run on `devices` devices."""
  per_device, global_batch = run_inputs.batch_sizes(config, devices)
  template_ids = np.arange(num_templates * seq, dtype=np.int32).reshape(1, num_templates, seq)
  return types.SimpleNamespace(
      per_device_batch=per_device, global_batch=global_batch, local_devices=devices,
      images=types.SimpleNamespace(num_images=num_images),
      prompts=types.SimpleNamespace(num_templates=num_templates, image_tokens=[], captioned=None),
      concepts=(types.SimpleNamespace(suffix="", template_ids=template_ids, image_template_ids=None,
                                      caption_ids=None, image_caption_ids=None),))


def _config(batch, accumulation, **overrides):
  return offline_config(config_module("object").get_config("tiny"), "/tmp", train_data_dir=TOY,
                        train_batch_size=batch, gradient_accumulation_steps=accumulation,
                        **overrides)


@pytest.mark.parametrize("devices,batch,accumulation", [(1, 1, 4), (2, 1, 2), (2, 2, 1)])
def test_per_example_draws_are_those_of_the_same_global_batch(devices, batch, accumulation):
  plain_config, config = _config(4, 1), _config(batch, accumulation)
  plain, split = _fake_inputs(plain_config, 1), _fake_inputs(config, devices)
  assert split.global_batch == plain.global_batch == 4
  for step in (0, 1, 7):
    want = run_inputs.batch_for(plain_config, plain, step)
    got = run_inputs.batch_for(config, split, step)
    for k in want:
      assert got[k].shape[:2] == (devices, 4 // devices)  # [d, A * b, ...]
      np.testing.assert_array_equal(got[k].reshape(want[k].shape), want[k])


def test_global_batch_size_counts_the_accumulation_steps():
  assert run_inputs.batch_sizes(_config(3, 4, global_batch_size=8), 2) == (1, 8)
  assert run_inputs.batch_sizes(_config(3, 4), 2) == (3, 24)
  with pytest.raises(training_config.ConfigError, match="2 devices x 4 accumulation steps"):
    run_inputs.batch_sizes(_config(3, 4, global_batch_size=4), 2)
  with pytest.raises(training_config.ConfigError, match="gradient_accumulation_steps must be >= 1"):
    training_config.validate_config(_config(1, 0))
