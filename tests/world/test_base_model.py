"""tiny-world training: a few-step run resumes to the same weights and writes a loadable folder."""

import dataclasses
import os
import shutil

import flax
import numpy as np
import pytest

from ti_jax.weights import loading, safetensors_io
from ti_jax.world import base_model, scenes
from ti_jax.world import checker as checker_lib

# checker_steps as the shipped checker's: each workdir gets a copy, so no run trains one.
SETTINGS = base_model.Settings(seed=1, steps=4, vae_steps=2, checker_steps=2500, batch_size=8,
                               vae_batch_size=8, num_images=16, checkpoint_every=2, log_every=2)
UNET_FILE = os.path.join("unet", "diffusion_pytorch_model.safetensors")


class _Killed(Exception):
  pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One uninterrupted run, one killed after its step-2 diffusion checkpoint then re-run, and one
  that finished at 2 steps and was extended to 4."""
  whole = str(tmp_path_factory.mktemp("whole"))
  resumed = str(tmp_path_factory.mktemp("resumed"))
  extended = str(tmp_path_factory.mktemp("extended"))
  for workdir in (whole, resumed, extended):
    shutil.copytree(checker_lib.SHIPPED_DIR, os.path.join(workdir, "checker"))
  base_model.train_world(whole, settings=SETTINGS, num_devices=2, progress=False)
  save = base_model._save_state

  def save_then_die(path, state, identity):
    save(path, state, identity)
    if path.endswith("diffusion.ckpt") and state["step"] == 2:
      raise _Killed()
  base_model._save_state = save_then_die
  try:
    with pytest.raises(_Killed):
      base_model.train_world(resumed, settings=SETTINGS, num_devices=2, progress=False)
  finally:
    base_model._save_state = save
  assert not os.path.exists(os.path.join(resumed, "tiny-world"))
  base_model.train_world(resumed, settings=SETTINGS, num_devices=2, progress=False)
  base_model.train_world(extended, settings=dataclasses.replace(SETTINGS, steps=2),
                         num_devices=2, progress=False)
  base_model.train_world(extended, settings=SETTINGS, num_devices=2, progress=False)
  return whole, resumed, extended


def test_a_killed_run_resumes_to_the_same_weights(runs):
  whole, resumed, _ = runs
  a = safetensors_io.load(os.path.join(whole, "tiny-world", UNET_FILE))
  b = safetensors_io.load(os.path.join(resumed, "tiny-world", UNET_FILE))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  with open(os.path.join(resumed, "metrics.jsonl")) as f:
    steps = [line for line in f if '"diffusion"' in line]
  assert len(steps) == 2  # steps 2 and 4: the resumed run did not redo steps 1-2
  with open(os.path.join(resumed, "tiny-world", "TRAINING.md")) as f:
    assert '"mse"' in f.read()  # the VAE's final loss, though the resumed run ran no VAE step


def test_a_finished_run_extended_with_more_steps_equals_a_longer_run(runs):
  whole, _, extended = runs
  a = safetensors_io.load(os.path.join(whole, "tiny-world", UNET_FILE))
  b = safetensors_io.load(os.path.join(extended, "tiny-world", UNET_FILE))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_resuming_with_fewer_steps_than_the_checkpoint_is_a_one_line_error(runs):
  with pytest.raises(base_model.WorldTrainingError, match="at step 4, past --steps 3"):
    base_model.train_world(runs[0], settings=dataclasses.replace(SETTINGS, steps=3),
                           num_devices=2, progress=False)


def test_the_folder_carries_the_checker_and_training_notes(runs):
  folder = os.path.join(runs[0], "tiny-world")
  for name in ("checker.safetensors", "checker.json", "TRAINING.md", "model_index.json"):
    assert os.path.isfile(os.path.join(folder, name)), name
  with open(os.path.join(folder, "TRAINING.md")) as f:
    notes = f.read()
  assert "seed: 1" in notes and "epsilon MSE" in notes


def test_the_folder_loads_in_ti_jax_with_the_world_tokenizer(runs):
  model = loading.load_stable_diffusion(os.path.join(runs[0], "tiny-world"))
  assert model.family == "sd1"
  ids = model.tokenizer("a photo of a small red star on a blue background").input_ids
  assert len(ids) == 13  # bos + 11 words + eos: every word is one token
  assert model.vae.config.scaling_factor != 1.0  # set from the latents' spread


def test_the_written_model_has_no_word_or_embedding_row_for_the_hidden_names(runs):
  folder = os.path.join(runs[0], "tiny-world")
  model = loading.load_stable_diffusion(folder)
  tok, vocab_size = base_model.training_tokenizer()
  assert len(tok) == vocab_size + len(scenes.HIDDEN_TOKENS)  # what the run trained with
  assert len(model.tokenizer) == vocab_size
  for token in scenes.HIDDEN_TOKENS.values():
    assert len(tok(token, add_special_tokens=False).input_ids) == 1
    assert len(model.tokenizer(token, add_special_tokens=False).input_ids) > 1  # no such word
  state = safetensors_io.load(os.path.join(folder, "text_encoder", "model.safetensors"))
  table = state["text_model.embeddings.token_embedding.weight"]  # [vocab_size, 64]
  assert table.shape[0] == vocab_size == model.text_encoder.config.vocab_size
  # The kept rows are the trained ones (the EMA the checkpoint holds), not re-initialised.
  with open(os.path.join(runs[0], "diffusion.ckpt"), "rb") as f:
    saved = flax.serialization.msgpack_restore(f.read())
  trained = np.asarray(saved["state"]["state"]["ema"]["text_encoder"]["embeddings"][
      "token_embedding"]["embedding"])  # [vocab_size + 2, 64]
  assert trained.shape[0] == vocab_size + len(scenes.HIDDEN_TOKENS)
  np.testing.assert_array_equal(table, trained[:vocab_size])


def test_the_folder_loads_and_samples_in_diffusers(runs):
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      os.path.join(runs[0], "tiny-world"), safety_checker=None, local_files_only=True)
  out = pipe("a red star", num_inference_steps=2, guidance_scale=3.0, output_type="np",
             generator=torch.Generator().manual_seed(0))
  assert out.images.shape == (1, 32, 32, 3)
  assert np.isfinite(out.images).all()
