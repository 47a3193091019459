"""Loss options: min-SNR-gamma weighting (against diffusers' compute_snr) and noise_offset."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, config_module, offline_config, step_pieces

from ti_jax.data import choices
from ti_jax.training import checkpointing, train_lib
from ti_jax.training import config as training_config

TOY = os.path.join(REPO, "examples", "toy")
GAMMA = 5.0


def _pieces(path):
  """(params, frozen, settings, a batch maker, scheduler config) of a tiny model."""
  p = step_pieces(path, 1, flip=False, seed=3)
  sd, init, frozen, settings = p["sd"], p["init"], p["frozen"], p["settings"]
  images, templates, template_ids = p["images"], p["templates"], p["template_ids"]

  def batch(index):
    index = np.asarray(index)
    view, tmpl = choices.example_choices(3, 0, index, global_batch_size=16,
                                         num_images=images.num_images, flip_p=0.0,
                                         num_templates=len(templates))
    return {"input_ids": template_ids[tmpl], "view_index": view,
            "example_index": index.astype(np.int32)}
  return {"embeds": jnp.asarray(init.vectors)}, frozen, settings, batch, sd.scheduler_config


def _diffusers_weights(scheduler_config, timesteps: np.ndarray) -> np.ndarray:
  """diffusers' min-SNR-gamma weights: its compute_snr, then its scripts' min / divide."""
  torch = pytest.importorskip("torch")
  from diffusers import DDPMScheduler
  from diffusers.training_utils import compute_snr
  scheduler = DDPMScheduler.from_config(scheduler_config)
  t = torch.from_numpy(np.asarray(timesteps, np.int64))
  snr = compute_snr(scheduler, t)
  weights = torch.clamp(snr, max=GAMMA)
  if scheduler.config.prediction_type == "epsilon":
    weights = weights / snr
  elif scheduler.config.prediction_type == "v_prediction":
    weights = weights / (snr + 1)
  return weights.numpy()


@pytest.mark.parametrize("model,prediction", [("tiny_sd15", "epsilon"),
                                              ("tiny_sd21", "v_prediction")])
def test_min_snr_weights_equal_diffusers_compute_snr(model, prediction, request):
  path = request.getfixturevalue(model)
  _, frozen, _, _, scheduler_config = _pieces(path)
  assert frozen.schedule.prediction_type == prediction
  t = np.arange(frozen.schedule.num_train_timesteps)
  ours = np.asarray(train_lib.min_snr_weights(frozen.schedule, jnp.asarray(t), GAMMA))
  want = _diffusers_weights(scheduler_config, t)
  np.testing.assert_allclose(ours, want, rtol=2e-5, atol=1e-7)
  assert np.ptp(ours) > 0.5  # the weights span the clipped and the unclipped range


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_sd21"])
def test_snr_gamma_loss_is_the_weighted_mean_of_per_example_losses(model, request):
  """The batch loss with snr_gamma = mean_i w(t_i) * loss_i, loss_i the plain loss of example
  i alone (the same draws, a function of its index), w from diffusers."""
  params, frozen, settings, batch, scheduler_config = _pieces(request.getfixturevalue(model))
  index = np.arange(8)
  weighted = dataclasses.replace(settings, snr_gamma=GAMMA)
  loss_fn = jax.jit(train_lib.loss_fn, static_argnums=(4,))
  loss = float(loss_fn(params, frozen, batch(index), 0, weighted))
  per_example = np.array([float(loss_fn(params, frozen, batch([i]), 0, settings))
                          for i in index])
  t = np.array([int(train_lib._example_noise(3, 0, i, (8, 8, 4), 1000)[2]) for i in index])
  w = _diffusers_weights(scheduler_config, t)
  assert np.ptp(w) > 0.05, w  # the weights differ between these examples
  np.testing.assert_allclose(loss, np.mean(per_example * w), rtol=1e-5)
  assert abs(loss - per_example.mean()) > 1e-3 * per_example.mean()


def test_noise_offset_adds_a_per_example_per_channel_constant():
  shape, draws = (8, 8, 4), {}
  for offset in (0.0, 0.1, 0.2):
    draws[offset] = jax.vmap(lambda g, o=offset: train_lib._example_noise(
        7, 5, g, shape, 1000, noise_offset=o))(jnp.arange(6))
  base_post, base_noise, base_t = (np.asarray(x) for x in draws[0.0])
  for offset in (0.1, 0.2):
    post, noise, t = (np.asarray(x) for x in draws[offset])
    # The posterior sample and timestep draws are those of a run without the offset.
    np.testing.assert_array_equal(post, base_post)
    np.testing.assert_array_equal(t, base_t)
    extra = noise - base_noise  # [6, 8, 8, 4]
    np.testing.assert_allclose(extra, np.broadcast_to(extra[:, :1, :1], extra.shape),
                               atol=1e-6)  # constant over the latent's pixels
    assert np.all(np.abs(extra[:, 0, 0]) > 0)
  # Linear in noise_offset: the same standard-normal constant scaled.
  np.testing.assert_allclose(draws[0.2][1] - base_noise, 2 * (draws[0.1][1] - base_noise),
                             rtol=1e-4, atol=1e-6)
  per_channel = np.asarray(draws[0.1][1] - base_noise)[:, 0, 0]  # [6, C]
  assert len(np.unique(np.round(per_channel, 6))) == per_channel.size  # all different
  # Example 4's draw alone is the one it gets inside the batch (devices, hosts, resume).
  alone = train_lib._example_noise(7, 5, jnp.int32(4), shape, 1000, noise_offset=0.1)[1]
  np.testing.assert_allclose(np.asarray(alone), np.asarray(draws[0.1][1])[4], atol=1e-6)


def test_noise_offset_changes_the_loss(tiny_sd15):
  params, frozen, settings, batch, _ = _pieces(tiny_sd15)
  b = batch(np.arange(4))
  plain = float(train_lib.loss_fn(params, frozen, b, 0, settings))
  offset = float(train_lib.loss_fn(params, frozen, b, 0,
                                   dataclasses.replace(settings, noise_offset=0.5)))
  assert np.isfinite(offset) and abs(offset - plain) > 1e-4 * plain


def _config(**overrides):
  return offline_config(config_module("object").get_config("tiny"), "/tmp", train_data_dir=TOY,
                        **overrides)


@pytest.mark.parametrize("field,value", [("snr_gamma", -1.0), ("noise_offset", -0.1),
                                         ("snr_gamma", float("nan"))])
def test_bad_values_are_refused(field, value):
  with pytest.raises(training_config.ConfigError, match=f"config.{field}"):
    training_config.validate_config(_config(**{field: value}))


def _metadata(config):
  return checkpointing.run_metadata(config, tokens=["<toy>"], token_ids=[5], image_tokens=[],
                                    embedding_dim=32, model_path="m", global_batch=4,
                                    base_lr=1e-3, image_paths=["a.png"])


@pytest.mark.parametrize("field,value", [("snr_gamma", 5.0), ("noise_offset", 0.1)])
def test_resume_with_a_changed_value_is_refused_and_old_checkpoints_mean_off(field, value):
  saved = _metadata(_config())
  now = _metadata(_config(**{field: value}))
  diffs = checkpointing.identity_diffs(saved, now)
  assert len(diffs) == 1 and diffs[0].startswith(f"{field}: 0.0 there, {value!r} now")
  old = {k: v for k, v in saved.items() if k not in ("snr_gamma", "noise_offset")}
  assert checkpointing.identity_diffs(old, _metadata(_config())) == []
  assert len(checkpointing.identity_diffs(old, now)) == 1
