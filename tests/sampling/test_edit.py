"""Localized editing with learned words: Blended Latent Diffusion (`ti_jax.edit`)."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, config_module, xla_flags
from PIL import Image

from ti_jax import errors
from ti_jax.data import captions
from ti_jax.embeddings import embedding_io, pseudo_words
from ti_jax.sampling import concepts as sampling_concepts
from ti_jax.sampling import blended, editing, noise_schedule, schedulers
from ti_jax.training import trainer
from ti_jax.weights.loading import load_stable_diffusion

FAST = dict(num_inference_steps=3, scheduler="ddim", guidance_scale=5.0)
PROMPT = "a photo of a <toy> on the table"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One tiny '<toy>' run, its base model with the token added, a 64 px image and a mask."""
  root = tmp_path_factory.mktemp("edit")
  c = config_module("object").get_config("tiny")
  c.train_data_dir = os.path.join(REPO, "examples", "toy")
  c.cache_dir = str(root / "cache")
  c.compilation_cache_dir = os.environ["JAX_COMPILATION_CACHE_DIR"]
  c.validation_prompt = ""
  c.max_train_steps = 2
  c.checkpointing_steps = 2
  workdir = str(root / "toy")
  trainer.run(c, workdir, devices=jax.local_devices()[:1], progress=False)
  sd = load_stable_diffusion("tiny-sd15", cache_dir=str(root / "cache"))
  concepts = embedding_io.load_concepts(workdir)
  tokenizer, learned = sampling_concepts.tokenizer_with_concepts(sd.tokenizer, concepts)
  sd = sd.with_tokenizers((tokenizer,))  # the edits' prompts hold the learned tokens
  prompt, _ = sampling_concepts.prepare_prompt(PROMPT, concepts, tokenizer)
  toy = os.path.join(REPO, "examples", "toy", sorted(os.listdir(c.train_data_dir))[0])
  image = np.asarray(Image.open(toy).convert("RGB").resize((64, 64)))  # [64, 64, 3]
  mask = np.zeros((64, 64), bool)
  mask[16:40, 20:52] = True
  return dict(workdir=workdir, cache=str(root / "cache"), root=root, sd=sd, learned=learned,
              prompt=prompt, image=image, mask=mask)


def _edit(run, mask, *, sd=None, learned=None, image=None, num_images=2, devices=1, seed=0,
          log=None, **kw):
  args = dict(FAST, **kw)
  batches = editing.edit_batches(
      sd or run["sd"], run["image"] if image is None else image, mask, run["prompt"], num_images,
      seed=seed, learned=run["learned"] if learned is None else learned,
      devices=jax.local_devices()[:devices], log=log, **args)
  return np.concatenate([b for _, b in batches])


def _region(mask, radius=4):  # the pixel blend's mask: half a latent cell (8 px) around the mask
  return blended.dilate(mask, radius)


@pytest.mark.parametrize("scheduler", schedulers.SAMPLER_NAMES)
def test_outside_the_mask_the_edit_is_the_input_and_inside_it_changes(run, scheduler):
  edits = _edit(run, run["mask"], scheduler=scheduler)
  assert edits.shape == (2, 64, 64, 3)
  outside = ~_region(run["mask"])
  for edit in edits:
    np.testing.assert_array_equal(edit[outside], run["image"][outside])
    inside = np.abs(edit.astype(int) - run["image"].astype(int))[run["mask"]]  # [n, 3]
    assert (inside.max(axis=-1) > 8).mean() > 0.5, "the masked region did not change"


def test_background_latents_are_at_the_samplers_noise_level(run):
  # With an oracle model (it returns the very noise the sample was made with) every
  # deterministic sampler maps the input noised to level k onto the input noised to
  # level k + 1: so `noised_latents` is at the level the loop's sample reaches.
  schedule = noise_schedule.noise_schedule_from_config(run["sd"].scheduler_config)
  rng = np.random.default_rng(0)
  z0 = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
  for name in schedulers.SAMPLER_NAMES:
    sampler = schedulers.make_sampler(name, run["sd"].scheduler_config, 6)
    x = blended.noised_latents(sampler, schedule, z0, eps, 0)
    state = sampler.init_state(x)
    for k in range(sampler.num_steps - 1):  # the last step ends at t=0 (clean only nearly)
      x, state = sampler.step(state, eps, k, x)
      expected = blended.noised_latents(sampler, schedule, z0, eps, k + 1)
      np.testing.assert_allclose(x, expected, atol=2e-4, err_msg=f"{name} step {k}")
    final = blended.noised_latents(sampler, schedule, z0, eps, sampler.num_steps)
    np.testing.assert_array_equal(final, z0)


def _img2img_reference(run, seed, indices, num_steps, guidance):
  """Plain img2img written out here: encode, noise to the first step's level, guided DDIM, decode.

  Image `index` starts from the noise (seed, index, 0), as the editor documents.
  """
  sd = run["sd"]
  sampler = schedulers.make_sampler("ddim", sd.scheduler_config, num_steps)
  schedule = noise_schedule.noise_schedule_from_config(sd.scheduler_config)
  scale, shift = sd.vae.config.scaling_factor, sd.vae.config.shift_factor
  pixels = jnp.asarray(run["image"], jnp.float32)[None] / 127.5 - 1.0
  mean, _ = sd.vae.apply({"params": sd.vae_params}, pixels, method=sd.vae.encode)
  z0 = (mean - shift) * scale  # [1, 8, 8, 4]
  ids = captions.tokenize(sd.tokenizer, [run["prompt"], ""])  # [2, T]
  vectors, token_ids = run["learned"][0]

  @jax.jit  # eager op-by-op dispatch of the UNet is far slower on CPU than one compile
  def one(unet_params, text_params, index):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), 0)
    noise = jax.random.normal(key, z0.shape[1:])[None]
    x = noise_schedule.add_noise(schedule, z0, noise, sampler.timesteps[:1])  # [1, 8, 8, 4]
    table = pseudo_words.token_table(sd.text_encoder, text_params)
    embeds = pseudo_words.embed_tokens(table, jnp.asarray(vectors, jnp.float32),
                                       jnp.asarray(token_ids), ids)
    context = sd.text_encoder.apply({"params": text_params}, ids, inputs_embeds=embeds)
    state = sampler.init_state(x)
    for i in range(sampler.num_steps):
      t = jnp.full((2,), sampler.timesteps[i])
      out = sd.unet.apply({"params": unet_params}, jnp.concatenate([x, x]), t, context)
      cond, uncond = out[:1], out[1:]
      x, state = sampler.step(state, uncond + guidance * (cond - uncond), i, x)
    return sd.vae.apply({"params": sd.vae_params}, x / scale + shift, method=sd.vae.decode)[0]

  images = [one(sd.unet_params, sd.text_encoder_params, i) for i in indices]
  return [np.round(np.clip((np.asarray(im) + 1) / 2, 0, 1) * 255).astype(np.uint8) for im in images]


def test_full_white_mask_is_img2img_from_the_noised_input(run):
  white = np.ones((64, 64), bool)
  edits = _edit(run, white, seed=5, num_images=2)
  references = _img2img_reference(run, seed=5, indices=(0, 1), num_steps=3, guidance=5.0)
  for edit, reference in zip(edits, references):
    # Same arithmetic compiled in two programs: at most rounding of one level.
    assert np.abs(edit.astype(int) - reference.astype(int)).max() <= 1
  assert not np.array_equal(edits[0], edits[1])


def test_full_black_mask_returns_the_input(run):
  black = np.zeros((64, 64), bool)
  edits = _edit(run, black)
  np.testing.assert_array_equal(edits, np.stack([run["image"]] * 2))
  # The loop itself ends on the input's own latents: its decode is the VAE's reconstruction.
  sd = run["sd"]
  editor = blended.BlendedEditor(sd, height=64, width=64, devices=jax.local_devices()[:1], **FAST)
  latents = editor.encode(run["image"])
  decoded = editor.edit([run["prompt"]] * 2, latents, blended.latent_masks(black, 8, 0),
                        learned=run["learned"])
  z = latents / sd.vae.config.scaling_factor + sd.vae.config.shift_factor
  recon = sd.vae.apply({"params": sd.vae_params}, z[None], method=sd.vae.decode)
  recon = np.round(np.clip((np.asarray(recon[0]) + 1) / 2, 0, 1) * 255).astype(np.uint8)
  assert np.abs(decoded[0].astype(int) - recon.astype(int)).max() <= 1


def test_same_seed_same_edit_on_one_and_four_devices(run):
  one = _edit(run, run["mask"], num_images=4, devices=1, seed=3, batch_size=2)
  four = _edit(run, run["mask"], num_images=4, devices=4, seed=3)
  # Same noise per edit; only the batch layout differs, so at most rounding of one level.
  assert np.abs(one.astype(int) - four.astype(int)).max() <= 1
  other = _edit(run, run["mask"], num_images=4, devices=4, seed=4)
  assert not np.array_equal(other, four)


def test_progressive_mask_shrinking_starts_dilated_and_ends_on_the_mask():
  block = np.zeros((64, 64), bool)
  block[16:40, 20:52] = True  # rows of cells 2-4; columns 2 and 6 are covered by half, so in
  masks = blended.latent_masks(block, 8, 2)  # [3, 8, 8, 1]
  assert masks.shape == (3, 8, 8, 1) and not blended.is_thin(block, 8)
  base = masks[-1, ..., 0] > 0
  expected = np.zeros((8, 8), bool)
  expected[2:5, 2:7] = True  # column 6 is half covered (48..51 of 48..55)
  np.testing.assert_array_equal(base, expected)
  np.testing.assert_array_equal(masks[1, ..., 0] > 0, blended.dilate(expected, 1))
  np.testing.assert_array_equal(masks[0, ..., 0] > 0, blended.dilate(expected, 2))
  # A 2 px stroke covers no cell by half: every cell it touches is edited instead.
  stroke = np.zeros((64, 64), bool)
  stroke[30:32, 5:60] = True
  assert blended.is_thin(stroke, 8)
  thin = blended.latent_masks(stroke, 8, 0)[-1, ..., 0] > 0
  assert thin[3].all() and thin.sum() == 8
  # Three masks over 6 steps: two steps each, largest first, the last blend on the mask.
  np.testing.assert_array_equal(blended.stage_of_step(6, 3), [0, 0, 1, 1, 2, 2])
  assert blended.stage_of_step(2, 3)[-1] == 2


def test_thin_mask_is_edited_and_logged(run):
  stroke = np.zeros((64, 64), bool)
  stroke[30:32, 5:60] = True
  lines = []
  edits = _edit(run, stroke, log=lines.append)
  assert any("thin" in line and "2 progressive mask shrinking" in line for line in lines)
  outside = ~_region(stroke)
  np.testing.assert_array_equal(edits[0][outside], run["image"][outside])
  assert (edits[0][stroke] != run["image"][stroke]).any(axis=-1).mean() > 0.5


def test_a_thin_stroke_survives_downscaling_to_the_working_size(run):
  # 128 px is edited at 64 px: a 1 px line on an even row is one that nearest-neighbour
  # downscaling would drop (it keeps odd rows); the area-averaged mask keeps it.
  image = np.asarray(Image.fromarray(run["image"]).resize((128, 128)))  # [128, 128, 3]
  line = np.zeros((128, 128), bool)
  line[60, 10:118] = True
  lines = []
  edits = _edit(run, line, image=image, log=lines.append)
  assert edits.shape == (2, 128, 128, 3)
  assert any("edited at 64x64" in message for message in lines)
  assert any("thin" in message for message in lines)
  outside = ~blended.dilate(line, 8)  # half a 64 px latent cell is 8 px at 128 px
  np.testing.assert_array_equal(edits[0][outside], image[outside])
  assert (edits[0][line] != image[line]).any(axis=-1).mean() > 0.5


@pytest.mark.parametrize("preset", ["tiny-sd21", "tiny-ldm"])
def test_every_base_model_edits_with_the_background_kept(run, preset):
  sd = load_stable_diffusion(preset, cache_dir=run["cache"])
  edits = _edit(run, run["mask"], sd=sd, learned=[], num_images=1, num_inference_steps=2)
  outside = ~_region(run["mask"])
  np.testing.assert_array_equal(edits[0][outside], run["image"][outside])
  assert (edits[0][run["mask"]] != run["image"][run["mask"]]).any(axis=-1).mean() > 0.5


def test_working_size_keeps_the_aspect_near_the_model_resolution():
  assert editing.working_size(64, 64, 64, 32) == (64, 64)
  assert editing.working_size(100, 150, 64, 32) == (64, 96)
  assert editing.working_size(768, 1024, 512, 64) == (512, 704)
  assert editing.working_size(100, 5000, 512, 64, max_size=2048) == (64, 2048)


def _cli(*args, env_extra=None):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env["XLA_FLAGS"] = xla_flags(2)
  return subprocess.run([sys.executable, "-m", "ti_jax.edit", *args], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=600)


def _write(path, array):
  Image.fromarray(array).save(path)
  return str(path)


def test_cli_edits_an_image_of_another_size_and_writes_pngs_and_grid(run):
  root = run["root"]
  big = np.asarray(Image.fromarray(run["image"]).resize((150, 100)))  # [100, 150, 3]
  mask = np.zeros((100, 150), np.uint8)
  mask[30:70, 50:110] = 200  # a grey level above the threshold
  out = root / "cli_out"
  proc = _cli("--workdir", run["workdir"], "--image", _write(root / "big.png", big),
              "--mask", _write(root / "big_mask.png", mask), "--prompt", PROMPT,
              "--num_images", "2", "--num_inference_steps", "2", "--output_dir", str(out))
  assert proc.returncode == 0, proc.stderr
  assert "grey level >= 128 of 255" in proc.stderr
  assert "image 150x100 is edited at 96x64" in proc.stderr and "resized back to 150x100" in proc.stderr
  files = sorted(os.listdir(out))
  pngs = [f for f in files if not f.endswith("_grid.png")]
  assert len(pngs) == 2 and sum(f.endswith("_grid.png") for f in files) == 1
  edit = Image.open(out / pngs[0])
  assert edit.text["prompt"] == PROMPT and edit.text["seed"] == "0" and edit.text["steps"] == "2"
  pixels = np.asarray(edit)
  assert pixels.shape == (100, 150, 3)
  # Half a latent cell at 96x64 is 4 px there, 6 px (rounded up from 150/96 * 4) here.
  outside = ~blended.dilate(mask >= 128, 6)
  np.testing.assert_array_equal(pixels[outside], big[outside])
  grid = np.asarray(Image.open(out / [f for f in files if f.endswith("_grid.png")][0]))
  assert grid.shape == (100, 4 * 150, 3)  # input, mask, two edits
  np.testing.assert_array_equal(grid[:, :150], big)


@pytest.fixture(scope="module")
def bad_inputs(run):
  root = run["root"]
  image = _write(root / "img.png", run["image"])
  return {
      "missing image": (["--image", str(root / "nope.png"), "--mask", image], "does not exist"),
      "missing mask": (["--image", image, "--mask", str(root / "nope.png")], "does not exist"),
      "mask of another size": (["--image", image, "--mask", _write(
          root / "small_mask.png", np.full((32, 48), 255, np.uint8))],
          "is 48x32 but --image is 64x64"),
      "empty mask": (["--image", image, "--mask", _write(
          root / "black.png", np.full((64, 64), 100, np.uint8))], "marks no pixel to change"),
      "image too small": (["--image", _write(root / "tiny.png", run["image"][:20, :20]),
                           "--mask", _write(root / "tiny_mask.png", np.full((20, 20), 255,
                                                                          np.uint8))],
                          "too small, need at least 32 px"),
      "too many steps": (["--image", image, "--mask", _write(
          root / "white.png", np.full((64, 64), 255, np.uint8)), "--num_inference_steps", "5000"],
          "num_inference_steps=5000 must be an integer in [1, num_train_timesteps=1000]"),
  }


@pytest.mark.parametrize("case", ["missing image", "missing mask", "mask of another size",
                                  "empty mask", "image too small", "too many steps"])
def test_bad_input_is_one_error_line(run, bad_inputs, case):
  args, needle = bad_inputs[case]
  kw = dict(zip([a.lstrip("-") for a in args[::2]], args[1::2]))
  kw = {k: int(v) if k == "num_inference_steps" else v for k, v in kw.items()}
  with pytest.raises(errors.UserError, match=re.escape(needle)) as err:
    editing.run(prompt=PROMPT, workdir=run["workdir"], **kw)
  assert isinstance(err.value, editing.EditError)
  proc = _cli("--workdir", run["workdir"], "--prompt", PROMPT, *args)
  assert proc.returncode != 0
  lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
  # Status lines (the mask's threshold) may come first; the error is one line, the last.
  assert [line for line in lines if "error" in line.lower()] == lines[-1:], proc.stderr
  assert lines[-1].startswith("error: ") and needle in lines[-1], proc.stderr
  assert "Traceback" not in proc.stderr and not os.path.exists(os.path.join(run["workdir"], "edits"))
