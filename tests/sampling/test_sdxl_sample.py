"""Sampling Stable Diffusion XL: ti_jax's generator equals diffusers' StableDiffusionXLPipeline.

Both load the same tiny-sdxl folder (random weights written by ti_jax) and start
from the same latents (the generator's own noise of (seed, image index), handed
to the pipeline as `latents=`). Images are uint8 on ti_jax's side, so equality is
within half a grey level plus float32 error.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, config_module, record_parity
from PIL import Image

from ti_jax.embeddings import embedding_io, embedding_writer
from ti_jax.runtime import parallel
from ti_jax.sampling import blended, generation, schedulers
from ti_jax.sampling import concepts as sampling_concepts
from ti_jax.training import validation
from ti_jax.weights import presets
from ti_jax.weights.loading import load_stable_diffusion

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
# diffusers 0.42 calls np.array on torch tensors in set_timesteps.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 64  # tiny-sdxl's native size: UNet sample_size 8 x the VAE's factor 8
FAST = {"num_inference_steps": 3, "guidance_scale": 5.0, "height": SIZE, "width": SIZE}
PROMPTS = ["a photo of a red toy", "a painting of a cat"]
# Half a grey level (ti_jax rounds to uint8) plus float32 error through the whole loop.
IMAGE_ATOL = (0.5 + 0.02) / 255
TORCH_SCHEDULERS = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler",
                    "pndm": "PNDMScheduler", "dpm++2m": "DPMSolverMultistepScheduler"}


@pytest.fixture(scope="module")
def sd(tiny_sdxl):
  return load_stable_diffusion(tiny_sdxl)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
  return diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)


@pytest.fixture(scope="module")
def gen(sd):
  """Euler (SDXL's own scheduler), 3 steps, guidance 5, one device."""
  return generation.ImageGenerator(sd, scheduler="euler", devices=jax.local_devices()[:1], **FAST)


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
  """A one-vector SDXL concept '<toy>' read from a kohya/A1111 clip_l/clip_g file."""
  rng = np.random.default_rng(7)
  path = tmp_path_factory.mktemp("emb") / "toy-xl.safetensors"
  made = embedding_io.Concept("<toy>", (rng.standard_normal((1, 32)).astype(np.float32),
                                       rng.standard_normal((1, 32)).astype(np.float32)), "")
  embedding_writer.write_embedding_file(str(path), made, "kohya")
  (loaded,) = embedding_io.load_concepts(f"{path}:<toy>")
  return loaded


def _latents(generator, seed, n):
  """The generator's starting noise of images 0..n-1, NCHW for the pipeline `[n, C, h, w]`."""
  key = jax.random.key(seed)
  noise = [np.asarray(jax.random.normal(jax.random.fold_in(key, g), generator.settings.latent_shape))
           for g in range(n)]
  return torch.from_numpy(np.stack(noise).transpose(0, 3, 1, 2).copy())


def _pipeline_images(pipe, generator, scheduler, seed=0, **kw):
  pipe.scheduler = getattr(diffusers, TORCH_SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
  out = pipe(PROMPTS, num_inference_steps=FAST["num_inference_steps"],
             guidance_scale=FAST["guidance_scale"], height=SIZE, width=SIZE,
             latents=_latents(generator, seed, len(PROMPTS)), output_type="np", **kw).images
  return np.asarray(out, np.float64)  # [n, H, W, 3] in [0, 1]


def _assert_same_images(ours, ref, label):
  assert ours.shape == ref.shape
  assert ref.std() > 0.05  # not a flat (saturated) image that anything would match
  err = float(np.max(np.abs(ours / 255.0 - ref)))
  record_parity(f"SDXL sampling {label} vs StableDiffusionXLPipeline (max |a-b|)", err, IMAGE_ATOL)
  assert err <= IMAGE_ATOL


def test_sdxl_images_equal_the_pipeline_with_zeros_for_the_empty_negative_prompt(sd, pipe, gen):
  # diffusers zeros the negative conditioning only when no negative prompt is given
  # (None) and the model_index says force_zeros_for_empty_prompt, as tiny-sdxl does.
  assert sd.model_index["force_zeros_for_empty_prompt"] is True
  ref = _pipeline_images(pipe, gen, "euler", negative_prompt=None)
  _assert_same_images(gen.generate(PROMPTS, seed=0, negative_prompt=""), ref, "euler, zeros")
  encoded_empty = _pipeline_images(pipe, gen, "euler", negative_prompt="")
  assert np.abs(encoded_empty - ref).max() > 0.02  # the zeros are what made them equal


def test_sdxl_images_equal_the_pipeline_with_a_negative_prompt(pipe, gen):
  ref = _pipeline_images(pipe, gen, "euler", seed=5, negative_prompt="blurry")
  _assert_same_images(gen.generate(PROMPTS, seed=5, negative_prompt="blurry"), ref,
                      "euler, negative prompt")


def test_sdxl_images_equal_the_pipeline_with_guidance_rescale(sd, pipe):
  # (The other samplers on SDXL's scheduler config: test_samplers_on_sdxls_scheduler_config_...
  # here and test_schedulers.py's loops, whose SD 1.5 config has the same spacing and offset.)
  g = generation.ImageGenerator(sd, scheduler="euler", guidance_rescale=0.7,
                                devices=jax.local_devices()[:1], **FAST)
  ref = _pipeline_images(pipe, g, "euler", negative_prompt="blurry", guidance_rescale=0.7)
  _assert_same_images(g.generate(PROMPTS, negative_prompt="blurry"), ref,
                      "euler, guidance_rescale 0.7")
  plain = _pipeline_images(pipe, g, "euler", negative_prompt="blurry")
  assert np.abs(plain - ref).max() > 0.02  # the rescale changed the images it matched


@pytest.mark.parametrize("name", list(TORCH_SCHEDULERS))
def test_samplers_on_sdxls_scheduler_config_match_diffusers(name):
  """SDXL base's scheduler config (Euler, "leading" spacing, steps_offset 1) under every sampler."""
  cfg = presets.preset("sdxl")["scheduler"]
  assert cfg["timestep_spacing"] == "leading" and cfg["steps_offset"] == 1
  for steps in (4, 30, 50):
    sched = getattr(diffusers, TORCH_SCHEDULERS[name]).from_config(cfg)
    sched.set_timesteps(steps)
    sampler = schedulers.make_sampler(name, cfg, steps)
    np.testing.assert_array_equal(np.asarray(sampler.timesteps),
                                  sched.timesteps.numpy().astype(np.asarray(sampler.timesteps).dtype))
    assert sampler.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)
    if name == "euler":  # Euler's sigmas (diffusers appends the final 0, which is implied here)
      np.testing.assert_allclose(np.asarray(sampler.tables["sigma"]), sched.sigmas.numpy()[:-1],
                                 rtol=1e-6)


def test_rescale_guidance_equals_diffusers_rescale_noise_cfg():
  from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    rescale_noise_cfg,
  )
  rng = np.random.default_rng(0)
  guided, cond = (rng.standard_normal((3, 8, 8, 4)).astype(np.float32) for _ in range(2))
  for rescale in (0.3, 0.7, 1.0):
    want = rescale_noise_cfg(torch.from_numpy(guided), torch.from_numpy(cond), rescale).numpy()
    got = np.asarray(generation.rescale_guidance(guided, cond, rescale))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_guidance_rescale_zero_leaves_the_sd_program_as_it_was(tiny_sd15, monkeypatch):
  """rescale 0 is not traced at all, so SD images stay bit for bit those without the option."""
  sd15 = load_stable_diffusion(tiny_sd15)
  devices = jax.local_devices()[:1]
  make = lambda **kw: generation.ImageGenerator(sd15, scheduler="ddim", devices=devices,
                                                **FAST, **kw).lower(1).as_text()
  rescaled = make(guidance_rescale=0.7)

  def refuse(*args):
    raise AssertionError("rescale_guidance traced with guidance_rescale=0")
  monkeypatch.setattr(generation, "rescale_guidance", refuse)
  assert make(guidance_rescale=0.0) == make()
  assert rescaled != make()


def test_learned_concept_goes_into_copies_of_both_tokenizers_and_changes_the_images(
    sd, gen, concept):
  own = [e.tokenizer for e in sd.text_encoders]
  before = tuple(len(t) for t in own)
  vocab = sampling_concepts.tokenizers_with_concepts(sd, [concept])
  assert tuple(len(t) for t in own) == before  # the model's own are untouched
  assert all("<toy>" not in t.get_vocab() for t in own)
  assert len(vocab["tokenizers"]) == len(vocab["learned"]) == 2
  for tok, (got, ids), vectors in zip(vocab["tokenizers"], vocab["learned"], concept.vectors,
                                      strict=True):
    assert list(ids) == [tok.convert_tokens_to_ids("<toy>")] and ids[0] >= min(before)
    np.testing.assert_array_equal(got, vectors)
  prompts = ["a photo of <toy>"] * 2
  images = gen.generate(prompts, **vocab)
  # The second encoder's vectors alone, then the first's alone, change the images.
  (vectors_1, ids_1), (vectors_2, ids_2) = vocab["learned"]
  other_2 = dict(vocab, learned=((vectors_1, ids_1), (vectors_2 * -1.0, ids_2)))
  other_1 = dict(vocab, learned=((vectors_1 * -1.0, ids_1), (vectors_2, ids_2)))
  for other in (other_2, other_1):
    assert np.abs(gen.generate(prompts, **other).astype(int) - images).max() > 10
  # Both tokenizers' ids are checked.
  with pytest.raises(ValueError, match="not in the tokenizer"):
    gen.generate(prompts, learned=vocab["learned"],
                 tokenizers=(vocab["tokenizers"][0], own[1]))
  with pytest.raises(ValueError, match="every encoder"):
    gen.generate(prompts, learned=vocab["learned"][:1], tokenizers=vocab["tokenizers"])


def test_empty_negative_prompt_is_zeros_only_with_force_zeros(sd):
  zero = lambda model, negative: bool(generation.prompt_arrays(model, ["a cat"], negative)[2][
      "zero_uncond"])
  off = dataclasses.replace(sd, model_index=dict(sd.model_index,
                                                  force_zeros_for_empty_prompt=False))
  assert zero(sd, "") and not zero(sd, "blurry") and not zero(off, "")


def test_two_devices_give_the_images_of_one(sd, gen, concept):
  vocab = sampling_concepts.tokenizers_with_concepts(sd, [concept])
  prompts = ["a photo of <toy>", "a cat", "a red toy"]  # 3: one padded row on 2 devices
  two = generation.ImageGenerator(sd, scheduler="euler", devices=jax.local_devices()[:2], **FAST)
  # One device, in calls of 2 images (the program `gen` has compiled for this module's other
  # tests): image i starts from the noise of (seed, first_index + i) whatever the call.
  one = np.concatenate([gen.generate(prompts[:2], seed=2, **vocab),
                        gen.generate(prompts[2:] * 2, seed=2, first_index=2, **vocab)[:1]])
  assert one.shape == (3, SIZE, SIZE, 3)
  # Same noise per image; only the batch layout differs, so at most rounding of one level.
  assert np.abs(two.generate(prompts, seed=2, **vocab).astype(int) - one).max() <= 1


def test_lower_includes_the_sdxl_arrays(sd):
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                               tree)
  abstract = dataclasses.replace(
      sd, unet_params=shapes(sd.unet_params), vae_params=shapes(sd.vae_params),
      text_encoders=tuple(dataclasses.replace(e, params=shapes(e.params))
                          for e in sd.text_encoders))
  g = generation.ImageGenerator(abstract, scheduler="euler", devices=jax.local_devices()[:2],
                                **FAST)
  text = g.lower(3, num_learned=2).as_text()
  assert "tensor<2x3x2x77xi32>" in text  # [devices, batch, both tokenizers, 77] prompt ids
  assert "tensor<2x2x32xf32>" in text  # both encoders' [2, 32] learned vectors per device
  assert g.lower(3).as_text() == generation.ImageGenerator(
      sd, scheduler="euler", devices=jax.local_devices()[:2], **FAST).lower(3).as_text()
  assert generation.auto_batch_size(g, 3) == 2  # covers 3 images on 2 CPU devices


def test_validation_renders_sdxl_grids(sd, gen, concept, tmp_path):
  """The training run's validation with SDXL's two learned sets (as the trainer hands them)."""
  vocab = sampling_concepts.tokenizers_with_concepts(sd, [concept])
  trained = sd.with_tokenizers(vocab["tokenizers"])
  c = config_module("object").get_config("tiny")
  c.placeholder_token, c.resolution, c.seed = "<toy>", SIZE, 0
  c.validation_prompt, c.validation_prompts = "", ("a photo of {}",)
  c.num_validation_images, c.validation_batch_size = 2, 0
  c.validation_scheduler, c.validation_inference_steps = "euler", FAST["num_inference_steps"]
  c.validation_guidance_scale = FAST["guidance_scale"]
  devices = jax.local_devices()[:1]
  shared = parallel.replicate({"unet": sd.unet_params, "text_encoder": sd.text_encoder_params},
                              devices)
  ids, ids_2 = ([int(i) for i in learned_ids] for _, learned_ids in vocab["learned"])
  with pytest.raises(ValueError, match="one list of token ids per text encoder"):
    validation.make(c, trained, [ids], devices, str(tmp_path), shared)
  v = validation.make(c, trained, [ids, ids_2], devices, str(tmp_path), shared)
  assert validation.write_images(v, 1, list(concept.vectors))
  grid = np.asarray(Image.open(tmp_path / "validation" / "step000001_p0.png"))
  want = gen.generate(["a photo of <toy>"] * 2, seed=0, **vocab)
  np.testing.assert_array_equal(grid, generation.image_grid(want))  # [64, 128, 3]


def test_blended_edit_runs_on_sdxl_and_keeps_the_background(sd, concept):
  vocab = sampling_concepts.tokenizers_with_concepts(sd, [concept])
  editor = blended.BlendedEditor(sd, scheduler="euler", devices=jax.local_devices()[:1], **FAST)
  image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  mask = np.zeros((SIZE, SIZE), bool)
  mask[16:48, 16:48] = True
  edits = editor.edit(["a photo of <toy>"], editor.encode(image),
                      blended.latent_masks(mask, blended.latent_factor(sd), 0), **vocab)
  out = blended.blend_pixels(image, edits, mask)
  assert out.shape == (1, SIZE, SIZE, 3)
  np.testing.assert_array_equal(out[0][~mask], image[~mask])
  assert np.abs(out[0][mask].astype(int) - image[mask]).mean() > 5


def test_sample_cli_writes_sdxl_pngs_from_an_embedding_file(concept, tmp_path):
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "ti_jax.sample", "--embeddings", f"{concept.source}:<toy>",
         "--pretrained_model_name_or_path", "tiny-sdxl", "--cache_dir", str(tmp_path / "cache"),
         "--prompt", "a photo of <toy>", "--num_images", "2", "--num_inference_steps", "2",
         "--scheduler", "euler", "--guidance_rescale", "0.7", "--output_dir", str(out)]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  pngs = sorted(os.listdir(out))
  assert pngs == ["000_a_photo_of_toy_seed0_000.png", "000_a_photo_of_toy_seed0_001.png",
                  "000_a_photo_of_toy_seed0_grid.png"]
  first = Image.open(out / pngs[0])
  assert first.size == (SIZE, SIZE)  # the model's native size when --height/--width are not given
  assert first.text["guidance_rescale"] == "0.7" and first.text["learned_tokens"] == "<toy>"


def test_sampling_an_sdxl_run_uses_both_encoders_vectors_of_its_checkpoint(gen, tiny_sdxl_run,
                                                                           tmp_path):
  from ti_jax.sampling import runner
  from ti_jax.runtime import run_dir
  workdir = tiny_sdxl_run  # 1 training step on tiny-sdxl, checkpointed at step 1
  # 2 images: one call of the batch `gen` has compiled (image i's noise is (seed, i) either way).
  paths = runner.run(prompts=["a photo of a <toy>"], workdir=workdir, num_images=2,
                     output_dir=str(tmp_path / "out"), devices=jax.local_devices()[:1],
                     scheduler="euler", num_inference_steps=FAST["num_inference_steps"],
                     guidance_scale=FAST["guidance_scale"])
  assert [os.path.basename(p) for p in paths] == ["000_a_photo_of_a_toy_step1_seed0_000.png",
                                                  "000_a_photo_of_a_toy_step1_seed0_001.png"]
  vectors, _ = run_dir.encoder_vectors_from_workdir(workdir)
  assert len(vectors) == 2 and vectors[1].shape[0] == vectors[0].shape[0]
  # `gen` samples the same tiny-sdxl weights (written by ti_jax from the preset and seed 0).
  run_concept = embedding_io.Concept("<toy>", vectors, workdir)
  vocab = sampling_concepts.tokenizers_with_concepts(gen.sd, [run_concept])
  want = gen.generate(["a photo of a <toy>"] * 2, **vocab)
  for path, image in zip(paths, want, strict=True):
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
