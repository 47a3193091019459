"""Sampling FLUX.1: ti_jax's compiled program equals diffusers' FluxPipeline.

Both load the same tiny-flux folder (random weights written by ti_jax; a schnell-like copy
without the guidance embedding and dynamic shifting) and start from the same latents (the
generator's own noise of (seed, image index), packed and handed to the pipeline as
`latents=`). Images are uint8 on ti_jax's side, so equality is within half a grey level
plus float32 error.
"""

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest
from conftest import record_parity
from PIL import Image

from ti_jax import errors
from ti_jax.embeddings import embedding_io, embedding_writer
from ti_jax.embeddings.pseudo_words import token_table
from ti_jax.models import flux
from ti_jax.sampling import flow_match, flux_generation, runner
from ti_jax.weights import safetensors_io
from ti_jax.weights.loading import load_stable_diffusion, resolve_model_dir

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
# diffusers 0.42 calls np.array on torch tensors in set_timesteps.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 32  # 4x4 latents, 2x2 packed tokens
DEV = {"num_inference_steps": 3, "height": SIZE, "width": SIZE}
SCHNELL = {"num_inference_steps": 4, "height": SIZE, "width": SIZE}
PROMPTS = ["a photo of a red toy", "a painting of a cat"]
# Half a grey level (ti_jax rounds to uint8) plus float32 error through the whole loop.
IMAGE_ATOL = (0.5 + 0.02) / 255


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
  """The tiny-flux FluxPipeline folder (FLUX.1-dev's topology: guidance embedding, dynamic
  shifting)."""
  return resolve_model_dir("tiny-flux", cache_dir=str(tmp_path_factory.mktemp("flux")))


@pytest.fixture(scope="module")
def schnell_folder(dev_folder, tmp_path_factory):
  """A copy of tiny-flux configured as FLUX.1-schnell: no guidance embedder (its weights
  dropped) and the static shift 1.0 instead of dynamic shifting."""
  folder = str(tmp_path_factory.mktemp("flux") / "tiny-flux-schnell")
  shutil.copytree(dev_folder, folder)
  edit = lambda path, **fields: _rewrite_json(os.path.join(folder, path), fields)
  edit("transformer/config.json", guidance_embeds=False)
  edit("scheduler/scheduler_config.json", shift=1.0, use_dynamic_shifting=False)
  weights = os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")
  kept = {k: v for k, v in safetensors_io.load(weights).items()
          if "guidance_embedder" not in k}
  safetensors_io.save(weights, kept)
  return folder


def _rewrite_json(path, fields):
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  data.update(fields)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)


@pytest.fixture(scope="module")
def dev_gen(dev_folder):
  """tiny-flux (dev), 3 steps, guidance 3.5, T5 padded to 512, one device."""
  return flux_generation.FluxImageGenerator(load_stable_diffusion(dev_folder),
                                            devices=jax.local_devices()[:1], **DEV)


def _pipeline_images(folder, generator, n, **kw):
  """FluxPipeline's images `[n, H, W, 3]` in [0, 1] from the generator's starting noise."""
  pipe = diffusers.FluxPipeline.from_pretrained(folder)
  noise = flux_generation.starting_noise(0, np.arange(n), generator.settings.latent_shape)
  latents = torch.from_numpy(np.asarray(flux.pack_latents(noise)).copy())  # [n, S, 64]
  out = pipe(PROMPTS[:n], latents=latents, output_type="np",
             max_sequence_length=generator.max_sequence_length, **kw).images
  return np.asarray(out, np.float64)


def _assert_same_images(ours, ref, label):
  assert ours.shape == ref.shape
  assert ref.std() > 0.05  # not a flat (saturated) image that anything would match
  err = float(np.max(np.abs(ours / 255.0 - ref)))
  record_parity(f"FLUX.1 sampling {label} vs FluxPipeline (max |a-b|)", err, IMAGE_ATOL)
  # All but rounding ties give the pipeline's uint8 image ((x * 255).round(), as its PIL output).
  assert np.mean(ours != np.round(ref * 255)) < 0.01


def test_dev_images_equal_the_pipeline(dev_folder, dev_gen):
  assert dev_gen.settings.guidance == flow_match.DEFAULT_GUIDANCE_SCALE
  assert dev_gen.max_sequence_length == 512
  seq_len = flow_match.image_seq_len(SIZE, SIZE)
  assert seq_len == 4
  # Dynamic shifting: mu from the image sequence length shifts the sigmas.
  unshifted = flow_match.flow_sigma_grid(3)
  assert not np.allclose(np.asarray(dev_gen.sampler.sigmas[:-1]), unshifted)
  ours = dev_gen.generate(PROMPTS, seed=0)
  ref = _pipeline_images(dev_folder, dev_gen, 2, guidance_scale=3.5, **DEV)
  _assert_same_images(ours, ref, "dev, guidance 3.5, 3 steps")
  assert not np.array_equal(ours[0], ours[1])


def test_schnell_images_equal_the_pipeline(schnell_folder):
  sd = load_stable_diffusion(schnell_folder)
  assert not sd.transformer.config.guidance_embeds
  gen = flux_generation.FluxImageGenerator(sd, devices=jax.local_devices()[:1], **SCHNELL)
  assert gen.settings.guidance is None and gen.max_sequence_length == 256
  # No dynamic shifting, shift 1: FluxPipeline's linear grid itself.
  np.testing.assert_allclose(np.asarray(gen.sampler.sigmas),
                             np.append(flow_match.flow_sigma_grid(4), 0.0), rtol=1e-6)
  ref = _pipeline_images(schnell_folder, gen, 2, guidance_scale=0.0, **SCHNELL)
  _assert_same_images(gen.generate(PROMPTS, seed=0), ref, "schnell-like, 4 steps")


def test_two_devices_give_the_images_of_one(dev_folder, dev_gen):
  prompts = ["a photo of a red toy", "a cat", "a red toy"]  # 3: one padded row on 2 devices
  two = flux_generation.FluxImageGenerator(dev_gen.sd, devices=jax.local_devices()[:2], **DEV)
  # One device, in calls of 2 images (the program the other tests compiled): image i starts
  # from the noise of (seed, first_index + i) whatever the call.
  one = np.concatenate([dev_gen.generate(prompts[:2], seed=2),
                        dev_gen.generate(prompts[2:] * 2, seed=2, first_index=2)[:1]])
  assert one.shape == (3, SIZE, SIZE, 3)
  # Same noise per image; only the batch layout differs, so at most rounding of one level.
  assert np.abs(two.generate(prompts, seed=2).astype(int) - one).max() <= 1


def test_lowered_program_takes_the_weights_as_arguments(dev_gen):
  """One pmapped program whose frozen weights are arguments, not constants closed over."""
  lowered = flux_generation.FluxImageGenerator(
      dev_gen.sd, devices=jax.local_devices()[:2], **DEV).lower(per_device_batch=3)
  weights = (dev_gen.sd.transformer_params, dev_gen.sd.vae_params,
             [e.params for e in dev_gen.sd.text_encoders])
  arg_shapes = [a.shape for a in jax.tree_util.tree_leaves(lowered.args_info[0])]
  assert len(arg_shapes) >= len(jax.tree_util.tree_leaves(weights))
  for leaf in jax.tree_util.tree_leaves(weights):
    assert (2,) + leaf.shape in arg_shapes  # replicated over the 2 devices
  text = lowered.as_text()
  assert "while" in text and "tensor<2x3x77xi32>" in text and "tensor<2x3x512xi32>" in text


def test_learned_vectors_are_spliced_per_text_encoder(dev_gen):
  """The program's prompt encoding takes learned vectors per encoder (for learned FLUX.1
  concepts): a word's own table row at its id changes nothing, another vector in either
  encoder changes the images."""
  sd, prompts = dev_gen.sd, PROMPTS[:1] * 2  # 2 prompts: the program compiled above
  clip_ids, t5_ids, _ = flux_generation.flux_prompt_arrays(sd, prompts,
                                                           dev_gen.max_sequence_length)
  ids = (int(clip_ids[0, 1]), int(t5_ids[0, 0]))  # the first word's (first) piece in each
  rows = tuple(np.asarray(token_table(e.module, e.params))[i][None]
               for e, i in zip(sd.text_encoders, ids))
  plain = dev_gen.generate(prompts)
  own = tuple((r, [i]) for r, i in zip(rows, ids))
  np.testing.assert_array_equal(dev_gen.generate(prompts, learned=own), plain)
  for e in range(2):
    other = list(own)
    other[e] = (rows[e] + 1.0, [ids[e]])
    assert not np.array_equal(dev_gen.generate(prompts, learned=tuple(other)), plain), e


def test_sample_writes_the_generators_flux_pngs(dev_folder, dev_gen, tmp_path):
  # No guidance_scale: FLUX.1-dev's default, 3.5, the generator's (not SD's 7.5).
  paths = runner.run(prompts=["a photo of a red toy"], pretrained_model_name_or_path=dev_folder,
                     num_images=2, output_dir=str(tmp_path / "out"),
                     devices=jax.local_devices()[:1], **DEV)
  assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
  pixels = np.stack([np.asarray(Image.open(p)) for p in paths])
  np.testing.assert_array_equal(pixels, dev_gen.generate(["a photo of a red toy"] * 2, seed=0))
  text = Image.open(paths[0]).text
  assert text["scheduler"] == flux_generation.SAMPLER_NAME and text["steps"] == "3"
  assert text["guidance_scale"] == "3.5"
  assert any(f.endswith("_grid.png") for f in os.listdir(tmp_path / "out"))


def test_steps_and_guidance_default_to_each_models_own(dev_gen, schnell_folder):
  """As diffusers' pipelines: FLUX.1-dev 28 steps at guidance 3.5, schnell 4 steps, SD 50 at
  7.5; a value given is kept."""
  schnell = load_stable_diffusion(schnell_folder)
  assert runner.model_defaults(dev_gen.sd, None, None) == (28, 3.5)
  assert runner.model_defaults(schnell, None, None) == (4, 3.5)
  assert runner.model_defaults(dev_gen.sd, 7, 2.0) == (7, 2.0)
  sd = types.SimpleNamespace(is_flux=False)
  assert runner.model_defaults(sd, None, None) == (50, 7.5)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(negative_prompt="blurry"), "without classifier-free guidance"),
    (dict(height=40, width=40), "multiples of 16"),
    ("concept", "not yet with learned concepts"),
])
def test_what_flux_sampling_has_not_is_one_line(dev_folder, tmp_path, kwargs, needle):
  if kwargs == "concept":  # an embedding file of tiny-flux's widths (CLIP 32, T5 32)
    path = str(tmp_path / "toy.safetensors")
    made = embedding_io.Concept("<toy>", (np.ones((1, 32), np.float32),
                                          np.ones((1, 32), np.float32)), "")
    embedding_writer.write_embedding_file(path, made, "kohya")
    kwargs = dict(embedding_sources=[f"{path}:<toy>"])
  with pytest.raises(errors.UserError) as err:
    runner.run(**dict(dict(prompts=["a <toy>"], pretrained_model_name_or_path=dev_folder,
                           num_images=1, output_dir=str(tmp_path / "x"),
                           devices=jax.local_devices()[:1], **DEV), **kwargs))
  assert needle in str(err.value) and "\n" not in str(err.value)
