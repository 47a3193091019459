"""SDXL training: both encoders' vectors learned, the loss equal to diffusers/transformers in
torch, devices, resume, the final pair, micro-conditioning, one-line refusals and the CLI."""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, config_module, offline_config, record_parity, xla_flags
from PIL import Image
from torch_reference import rel_err

from ti_jax.data import buckets, choices, image_loader
from ti_jax.embeddings import embedding_io, embedding_writer, pseudo_words
from ti_jax.runtime import parallel
from ti_jax.training import concept, dry_run, train_lib, trainer
from ti_jax.training import config as training_config
from ti_jax.training import inputs as run_inputs
from ti_jax.weights import safetensors_io

TOY = os.path.join(REPO, "examples", "toy")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


def _config(model, cache_dir, **overrides):
  return offline_config(config_module("object").get_config("tiny_sdxl"), cache_dir, **{
      "pretrained_model_name_or_path": model, "train_data_dir": TOY, "max_train_steps": 4,
      "checkpointing_steps": 2, "log_every_steps": 1, "validation_prompt": "", **overrides})


@pytest.fixture(scope="module")
def built(tiny_sdxl, cache_dir, tmp_path_factory):
  """(config, RunInputs, host Frozen, StepSettings) of a 1-device tiny-SDXL run, as the trainer
  builds them."""
  config = _config(tiny_sdxl, cache_dir)
  devices = jax.local_devices()[:1]
  inputs = run_inputs.build(config, str(tmp_path_factory.mktemp("unused") / "w"), devices)
  frozen, settings = trainer.step_inputs(config, inputs)
  return config, inputs, frozen, settings


def test_steps_train_both_vector_sets_and_nothing_else(built):
  config, inputs, frozen, settings = built
  devices = jax.local_devices()[:1]
  first, second = inputs.concepts
  assert set(inputs.state.params) == {"embeds", "embeds_2"} == {first.key, second.key}
  # Pooled at tokenizer_2's real end token, not transformers' legacy largest-id rule.
  assert settings.pool_eos_token_id == inputs.sd.text_encoders[1].tokenizer.eos_token_id
  # No optimizer state beyond Adam's moments of the two small vector sets (+ counts).
  sizes = [x.size for x in jax.tree_util.tree_leaves(inputs.state.opt_state)]
  assert max(sizes) == first.init.vectors.size
  step_fn = train_lib.make_pmapped_step(settings, inputs.optimizer, inputs.lr, devices)
  state = parallel.replicate(inputs.state, devices)
  rep_frozen = parallel.replicate(frozen, devices)
  for step in range(3):
    state, metrics = step_fn(state, rep_frozen, run_inputs.batch_for(config, inputs, step))
  assert np.isfinite(float(parallel.unreplicate(metrics["loss"])))
  for before, after in zip(jax.tree_util.tree_leaves(frozen),
                           jax.tree_util.tree_leaves(parallel.unreplicate(rep_frozen))):
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
  params = parallel.unreplicate(state).params
  for c, ids in zip(inputs.concepts, frozen.placeholder_ids):
    key, table = c.key, c.table
    learned = np.asarray(params[key])
    assert not np.allclose(learned, c.init.vectors), key  # both sets trained
    # What each encoder sees: only the placeholder rows differ from its frozen table.
    all_ids = np.arange(max(ids) + 1, dtype=np.int32)[None]  # [1, V + n]
    looked_up = np.asarray(pseudo_words.embed_tokens(
        jnp.asarray(table), jnp.asarray(learned), jnp.asarray(ids), jnp.asarray(all_ids)))[0]
    np.testing.assert_array_equal(looked_up[: table.shape[0]], table)
    np.testing.assert_array_equal(looked_up[ids], learned)


def _torch_loss(model_dir, batch, step, frozen, settings, params, prompts, view_sizes):
  """The step's loss computed with diffusers' UNet2DConditionModel and transformers' CLIP
  encoders (the pseudo-word as a new row of each token table, as diffusers' script trains)."""
  import torch
  import transformers
  from diffusers import DDPMScheduler, UNet2DConditionModel
  encoders, ids = [], []
  for sub, cls, key in (("text_encoder", transformers.CLIPTextModel, "embeds"),
                        ("text_encoder_2", transformers.CLIPTextModelWithProjection, "embeds_2")):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        os.path.join(model_dir, sub.replace("text_encoder", "tokenizer")))
    tokenizer.add_tokens(["<toy>"])
    encoder = cls.from_pretrained(os.path.join(model_dir, sub)).eval()
    encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
      encoder.get_input_embeddings().weight[-1] = torch.from_numpy(np.asarray(params[key][0]))
    encoders.append(encoder)
    ids.append(torch.from_numpy(tokenizer(prompts, padding="max_length", max_length=77,
                                          truncation=True, return_tensors="np").input_ids))
  np.testing.assert_array_equal(ids[0].numpy(), batch["input_ids"])  # the same prompts
  np.testing.assert_array_equal(ids[1].numpy(), batch["input_ids_2"])
  unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet")).eval()
  scheduler = DDPMScheduler.from_pretrained(os.path.join(model_dir, "scheduler"))
  mean = np.asarray(frozen.latent_mean)[batch["view_index"]]  # [b, h, w, C]
  std = np.asarray(frozen.latent_std)[batch["view_index"]]
  post, noise, t = jax.vmap(lambda i: train_lib._example_noise(
      settings.seed, step, i, mean.shape[1:], scheduler.config.num_train_timesteps))(
          jnp.asarray(batch["example_index"]))
  nchw = lambda x: torch.from_numpy(np.array(x, np.float32).transpose(0, 3, 1, 2).copy())
  latents = nchw((mean + std * np.asarray(post)) * settings.scaling_factor)
  noise = nchw(noise)
  t = torch.from_numpy(np.array(t)).long()
  # diffusers' add_time_ids: (original h, w, crop top, left, target h, w); the toy images
  # are squashed whole to 64 px (center_crop False): crop (0, 0).
  time_ids = torch.tensor([[h, w, 0, 0, 64, 64] for h, w in view_sizes], dtype=torch.float32)
  with torch.no_grad():
    out_1 = encoders[0](ids[0], output_hidden_states=True)
    out_2 = encoders[1](ids[1], output_hidden_states=True)
    context = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    pred = unet(scheduler.add_noise(latents, noise, t), t, context,
                added_cond_kwargs={"text_embeds": out_2.text_embeds, "time_ids": time_ids}).sample
  return float(torch.mean((pred - noise) ** 2))


def test_step_loss_equals_diffusers_and_transformers_in_torch(built, tiny_sdxl):
  pytest.importorskip("torch")
  config, inputs, frozen, settings = built
  step, size = 3, 4
  index = np.arange(size)
  view, tmpl = choices.example_choices(config.seed, step, index, global_batch_size=size,
                                       num_images=inputs.images.num_images, flip_p=config.flip_p,
                                       num_templates=inputs.prompts.num_templates)
  batch = {"input_ids": inputs.concepts[0].template_ids[0][tmpl],
           "input_ids_2": inputs.concepts[1].template_ids[0][tmpl], "view_index": view,
           "example_index": index.astype(np.int32)}
  # Different random vectors per encoder: a swapped pair would not pass.
  rng = np.random.default_rng(0)
  params = {k: (0.5 * rng.standard_normal(inputs.state.params[k].shape)).astype(np.float32)
            for k in ("embeds", "embeds_2")}
  ours = float(jax.jit(train_lib.loss_fn, static_argnums=(4,))(params, frozen, batch, step,
                                                               settings))
  prompts = [inputs.prompts.texts.templates[i].replace("{}", "<toy>") for i in tmpl]
  sizes = []
  for v in view:  # each view's file's size as read (views N.. mirror images 0..)
    w, h = Image.open(inputs.images.paths[v % inputs.images.num_images]).size
    sizes.append((h, w))
  reference = _torch_loss(tiny_sdxl, batch, step, frozen, settings, params, prompts, sizes)
  record_parity("SDXL training loss (fp32)", rel_err(ours, reference), 1e-4)


def test_two_devices_equal_one_resume_continues_exactly_and_the_pair_is_written(
    built, tiny_sdxl, cache_dir, tmp_path):
  del built  # the tiny model is written; its compiled programs are cached
  one = trainer.run(_config(tiny_sdxl, cache_dir, train_batch_size=2), str(tmp_path / "one"),
                    devices=jax.local_devices()[:1], progress=False)
  two = trainer.run(_config(tiny_sdxl, cache_dir, global_batch_size=2), str(tmp_path / "two"),
                    devices=jax.local_devices()[:2], progress=False)
  for key in ("embeds", "embeds_2"):
    np.testing.assert_allclose(two[key], one[key], rtol=0, atol=1e-5)
  # A run killed after checkpoint 2: its later checkpoint and outputs never written.
  killed = tmp_path / "killed"
  shutil.copytree(tmp_path / "one", killed)
  shutil.rmtree(killed / "checkpoints" / "4")
  for name in ("learned_embeds.safetensors", "learned_embeds_2.safetensors"):
    os.unlink(killed / name)
  resumed = trainer.run(_config(tiny_sdxl, cache_dir, train_batch_size=2), str(killed),
                        devices=jax.local_devices()[:1], progress=False)
  assert resumed["step"] == 4
  for key in ("embeds", "embeds_2"):
    np.testing.assert_array_equal(resumed[key], one[key])
  # The final diffusers pair, and the run directory, read back as one SDXL concept.
  (from_file,) = embedding_io.load_concepts(str(tmp_path / "one" / "learned_embeds.safetensors"))
  (from_run,) = embedding_io.load_concepts(str(tmp_path / "one"))
  for read in (from_file, from_run):
    assert read.token == "<toy>"
    np.testing.assert_array_equal(read.vectors[0], one["embeds"])
    np.testing.assert_array_equal(read.vectors[1], one["embeds_2"])


def test_init_embedding_of_another_family_is_refused_in_one_line_and_sdxl_is_used(
    built, tmp_path):
  config, inputs, _, _ = built
  sd_file = tmp_path / "sd.safetensors"
  embedding_writer.save_embedding(str(sd_file), embedding_io.Concept(
      "<old>", np.ones((1, inputs.concepts[0].table.shape[1]), np.float32), ""), "diffusers")
  c = config.copy_and_resolve_references()
  c.init_embedding = str(sd_file)
  with pytest.raises(training_config.ConfigError) as err:
    _concepts(c, inputs)
  message = str(err.value)
  assert "\n" not in message and "SDXL" in message and "SD (32)" in message
  rng = np.random.default_rng(1)
  pair = embedding_io.Concept("<old>", (rng.standard_normal((1, 32)).astype(np.float32),
                                       rng.standard_normal((1, 32)).astype(np.float32)), "")
  xl_file = tmp_path / "xl.safetensors"
  embedding_writer.save_embedding(str(xl_file), pair, "diffusers")
  c = config.copy_and_resolve_references()
  c.init_embedding = str(xl_file)
  first, second = _concepts(c, inputs)
  np.testing.assert_array_equal(first.init.vectors, pair.vectors[0])
  np.testing.assert_array_equal(second.init.vectors, pair.vectors[1])


def _concepts(config, inputs):
  """`concept.concepts` of `config` on the model loaded afresh (the tokenizers of
  `inputs.sd` already hold the placeholder)."""
  sd, _ = run_inputs.load_model(config)
  p = inputs.prompts
  return concept.concepts(config, sd, p.texts, p.tokens, p.image_tokens)


def test_per_image_tokens_are_refused_for_sdxl_in_one_line(built):
  config, inputs, _, _ = built
  c = config.copy_and_resolve_references()
  c.per_image_tokens = True
  p = run_inputs.make_prompts(c, inputs.prompts.texts, inputs.images.num_images)
  with pytest.raises(training_config.ConfigError, match="per_image_tokens") as err:
    concept.concepts(c, inputs.sd, p.texts, p.tokens, p.image_tokens)
  assert "\n" not in str(err.value)


def test_time_ids_are_each_views_original_size_crop_and_bucket(tmp_path):
  for name, size in (("wide.png", (250, 60)), ("tall.png", (70, 260))):
    Image.new("RGB", size, (90, 20, 200)).save(tmp_path / name)
  shapes = buckets.bucket_shapes(64, 32, 128, 32)
  images = image_loader.load_training_images(str(tmp_path), 64, False, bucket_shapes=shapes)
  per_bucket = run_inputs.view_time_ids(images, flip=True)
  assert len(per_bucket) == len(images.buckets) == 2
  for b, ids in enumerate(per_bucket):
    (i,) = images.bucket_members(b)
    w, h = images.sizes[i]
    bw, bh = images.buckets[b]
    placement = buckets.place((w, h), (bw, bh))
    expected = [h, w, *placement.crop_top_left, bh, bw]
    np.testing.assert_array_equal(ids, [expected, expected])  # the image, then its mirror
  assert {tuple(images.sizes[i]) for i in range(2)} == {(250, 60), (70, 260)}


def test_dry_run_shows_both_tokenizers_ids(tiny_sdxl, cache_dir, tmp_path):
  lines = dry_run.dry_run(_config(tiny_sdxl, cache_dir), str(tmp_path / "w"))
  text = "\n".join(lines)
  assert "(tokenizer_2: [" in text
  assert sum(line.lstrip().startswith("tokenizer_2: token ids [") for line in lines) == 4
  assert not (tmp_path / "w").exists()


def test_cli_trains_tiny_sdxl_and_exports_clip_l_clip_g(cache_dir, tmp_path):
  # One device and a batch of 2: the step program of the 1-device run above, which the CLI
  # then loads from the session's compilation cache instead of compiling one for 8 devices.
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS=xla_flags(1))
  workdir = tmp_path / "run"
  train = subprocess.run(
      [sys.executable, "-m", "ti_jax.train", "--config",
       os.path.join(REPO, "configs/object.py:tiny_sdxl"), "--workdir", str(workdir),
       "--config.max_train_steps=4", "--config.train_batch_size=2",
       f"--config.cache_dir={cache_dir}",
       f"--config.train_data_dir={TOY}", "--config.validation_prompt=",
       f"--config.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"],
      check=False, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert train.returncode == 0, train.stderr[-2000:]
  assert (workdir / "learned_embeds.safetensors").is_file()
  assert (workdir / "learned_embeds_2.safetensors").is_file()
  export = subprocess.run([sys.executable, "-m", "ti_jax.export", "--workdir", str(workdir),
                           "--format", "kohya"], check=False, capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)
  assert export.returncode == 0, export.stderr[-2000:]
  (path,) = (workdir / "export" / "kohya").glob("*.safetensors")
  tables = safetensors_io.load(str(path))
  assert set(tables) == {"clip_l", "clip_g"}
  (pair,) = embedding_io.load_concepts(str(workdir))
  np.testing.assert_array_equal(tables["clip_l"], pair.vectors[0])
  np.testing.assert_array_equal(tables["clip_g"], pair.vectors[1])
