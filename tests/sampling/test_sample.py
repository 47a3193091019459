"""Sampling from trained runs, several concepts at once, and embedding interop."""

import dataclasses
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from conftest import REPO, config_module, record_parity
from PIL import Image
from torch_reference import rel_err

from ti_jax import errors
from ti_jax.embeddings import embedding_io, embedding_writer, exporter, pseudo_words
from ti_jax.runtime import run_dir
from ti_jax.sampling import concepts as sampling_concepts
from ti_jax.sampling import generation, runner
from ti_jax.training import trainer
from ti_jax.training import config as training_config
from ti_jax.weights.loading import load_stable_diffusion

FAST = dict(num_inference_steps=3, scheduler="ddim", guidance_scale=5.0)


def _train(workdir, cache_dir, **overrides):
  object_config = config_module("object")
  c = object_config.get_config("tiny")
  c.train_data_dir = os.path.join(REPO, "examples", "toy")
  c.cache_dir = str(cache_dir)
  c.compilation_cache_dir = os.environ["JAX_COMPILATION_CACHE_DIR"]
  c.validation_prompt = ""
  c.max_train_steps = 3
  c.checkpointing_steps = 2
  for k, v in overrides.items():
    c[k] = v
  trainer.run(c, str(workdir), devices=jax.local_devices()[:1], progress=False)
  return str(workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two tiny runs: '<toy>' (1 vector) and '<style>' (2 vectors, style templates)."""
  root = tmp_path_factory.mktemp("runs")
  cache = root / "cache"
  toy = _train(root / "toy", cache)
  style = _train(root / "style", cache, placeholder_token="<style>", num_vectors=2,
                 learnable_property="style", initializer_token="painting",
                 train_data_dir=os.path.join(REPO, "examples", "style"))
  return {"toy": toy, "style": style, "cache": str(cache)}


def _sample(runs, tmp_path, name, **kw):
  args = dict(prompts=["a photo of a <toy>"], workdir=runs["toy"], num_images=2,
              output_dir=str(tmp_path / name), devices=jax.local_devices()[:1], **FAST)
  args.update(kw)
  return runner.run(**args)


def _pixels(paths):
  return np.stack([np.asarray(Image.open(p)) for p in paths])


def test_sampling_from_a_training_checkpoint_writes_images(runs, tmp_path):
  paths = _sample(runs, tmp_path, "a", seed=0)
  assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
  images = _pixels(paths)
  assert images.shape == (2, 64, 64, 3)
  assert not np.array_equal(images[0], images[1])  # image index changes the noise
  grid = [f for f in os.listdir(tmp_path / "a") if f.endswith("_grid.png")]
  assert len(grid) == 1
  text = Image.open(paths[0]).text
  assert "_step3_" in os.path.basename(paths[0]) and text["checkpoint_step"] == "3"
  assert text["prompt"] == "a photo of a <toy>" and text["seed"] == "0"
  assert text["steps"] == "3" and text["scheduler"] == "ddim"
  same = _pixels(_sample(runs, tmp_path, "b", seed=0))
  other = _pixels(_sample(runs, tmp_path, "c", seed=1))
  np.testing.assert_array_equal(same, images)
  assert not np.array_equal(other, images)


def test_four_devices_give_the_same_images_as_one(runs):
  sd = load_stable_diffusion("tiny-sd15", cache_dir=runs["cache"])
  concepts = embedding_io.load_concepts(runs["toy"])
  tokenizer, learned = sampling_concepts.tokenizer_with_concepts(sd.tokenizer, concepts)
  images = {}
  for n in (1, 4):
    gen = generation.ImageGenerator(sd, height=64, width=64, devices=jax.local_devices()[:n], **FAST)
    images[n] = gen.generate(["a photo of a <toy>"] * 4, seed=3, learned=learned,
                             tokenizers=(tokenizer,))
  # Same noise per image; only batch layout differs, so at most rounding of one level.
  assert np.abs(images[1].astype(int) - images[4].astype(int)).max() <= 1


def test_lower_gives_the_generators_program_from_weight_shapes_alone(runs):
  """What benchmarks/tpu_compile.py compiles: `lower` needs the weights' shapes, not their values."""
  sd = load_stable_diffusion("tiny-sd15", cache_dir=runs["cache"])
  devices = jax.local_devices()[:2]
  shapes = lambda tree: jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                               tree)
  abstract = dataclasses.replace(sd, unet_params=shapes(sd.unet_params),
                                 vae_params=shapes(sd.vae_params),
                                 text_encoders=tuple(dataclasses.replace(e, params=shapes(e.params))
                                                     for e in sd.text_encoders))
  lowered = generation.ImageGenerator(abstract, height=64, width=32, devices=devices,
                                      **FAST).lower(3)
  real = generation.ImageGenerator(sd, height=64, width=32, devices=devices, **FAST).lower(3)
  assert lowered.as_text() == real.as_text()
  out = jax.tree_util.tree_leaves(lowered.out_info)[0]
  assert out.shape == (2, 3, 64, 32, 3)  # [devices, per-device batch, H, W, RGB]
  # The learned-vector argument: one [1, D] vector per device, two with num_learned=2.
  assert "tensor<2x1x32xf32>" in lowered.as_text()
  wider = generation.ImageGenerator(abstract, height=64, width=32, devices=devices,
                                    **FAST).lower(3, num_learned=2)
  assert "tensor<2x2x32xf32>" in wider.as_text()
  # It compiles; per device, its output is the float32 images of that device's 3 prompts.
  assert lowered.compile().memory_analysis().output_size_in_bytes == 3 * 64 * 32 * 3 * 4


def test_two_concepts_compose_in_one_prompt(runs, tmp_path):
  paths = _sample(runs, tmp_path, "mix", prompts=["a <toy> in the style of <style>"],
                  embedding_sources=[runs["style"]], num_images=1)
  assert len(paths) == 1
  assert Image.open(paths[0]).text["learned_tokens"] == "<toy>,<style>"


def test_multi_vector_token_is_expanded_in_prompts(runs):
  sd = load_stable_diffusion("tiny-sd15", cache_dir=runs["cache"])
  concepts = embedding_io.load_concepts(runs["style"])
  tokenizer, _ = sampling_concepts.tokenizer_with_concepts(sd.tokenizer, concepts)
  prompt, warnings = sampling_concepts.prepare_prompt("a cat in the style of <style>", concepts,
                                                      tokenizer)
  assert prompt == "a cat in the style of <style> <style>_1" and not warnings


def test_concept_tokens_go_into_a_new_tokenizer(runs):
  sd = load_stable_diffusion("tiny-sd15", cache_dir=runs["cache"])
  size = len(sd.tokenizer)
  concepts = embedding_io.load_concepts(runs["style"])
  tokenizer, learned = sampling_concepts.tokenizer_with_concepts(sd.tokenizer, concepts)
  assert len(sd.tokenizer) == size and "<style>" not in sd.tokenizer.get_vocab()
  assert len(tokenizer) == size + 2
  assert learned[0][1] == tokenizer.convert_tokens_to_ids(["<style>", "<style>_1"])
  # The model's tokenizer still takes the same names (e.g. the next run of one concept).
  again, _ = sampling_concepts.tokenizer_with_concepts(sd.tokenizer, concepts)
  assert again.get_vocab()["<style>_1"] == tokenizer.get_vocab()["<style>_1"]


def test_sampling_leaves_the_models_tokenizer_unchanged(runs, tmp_path, monkeypatch):
  loaded = []
  load = sampling_concepts.load_stable_diffusion

  def recording_load(*args, **kwargs):
    sd = load(*args, **kwargs)
    loaded.append((sd, len(sd.tokenizer)))
    return sd

  monkeypatch.setattr(sampling_concepts, "load_stable_diffusion", recording_load)
  _sample(runs, tmp_path, "untouched", embedding_sources=[runs["style"]], num_images=1,
          prompts=["a <toy> in the style of <style>"])
  (sd, size), = loaded
  assert len(sd.tokenizer) == size
  assert not {"<toy>", "<style>", "<style>_1"} & set(sd.tokenizer.get_vocab())


def test_generator_refuses_learned_ids_its_tokenizer_lacks(runs):
  sd = load_stable_diffusion("tiny-sd15", cache_dir=runs["cache"])
  concepts = embedding_io.load_concepts(runs["toy"])
  _, learned = sampling_concepts.tokenizer_with_concepts(sd.tokenizer, concepts)
  gen = generation.ImageGenerator(sd, height=64, width=64, devices=jax.local_devices()[:1], **FAST)
  # The model's own tokenizer would split "<toy>" into pieces and splice nothing.
  with pytest.raises(ValueError, match="tokenizer_with_concepts"):
    gen.generate(["a photo of a <toy>"], learned=learned)


def test_token_clash_is_refused(runs, tmp_path):
  with pytest.raises(sampling_concepts.SampleError, match="comes from both"):
    _sample(runs, tmp_path, "x", embedding_sources=[runs["toy"]])


def test_embedding_of_another_width_is_refused(runs, tmp_path):
  path = str(tmp_path / "wide.safetensors")
  embedding_writer.write_embedding_file(path, embedding_io.Concept("<wide>", np.ones((1, 48)),
                                                                   ""), "diffusers")
  with pytest.raises(sampling_concepts.SampleError, match="width 48 but the model's text encoder has width 32"):
    _sample(runs, tmp_path, "x", embedding_sources=[path])


def test_checkpoint_from_another_base_model_is_refused(runs, tmp_path):
  with pytest.raises(sampling_concepts.SampleError) as err:
    _sample(runs, tmp_path, "x", pretrained_model_name_or_path="tiny-sd21", cache_dir=runs["cache"])
  assert "'tiny-sd15'" in str(err.value) and "'tiny-sd21'" in str(err.value)
  paths = _sample(runs, tmp_path, "y", pretrained_model_name_or_path="tiny-sd21",
                  cache_dir=runs["cache"], allow_base_model_mismatch=True, num_images=1)
  assert len(paths) == 1


def test_prompt_warnings_for_missing_token_and_truncation(runs, capsys):
  sd = load_stable_diffusion("tiny-sd15", cache_dir=runs["cache"])
  concepts = embedding_io.load_concepts(runs["toy"])
  tokenizer, _ = sampling_concepts.tokenizer_with_concepts(sd.tokenizer, concepts)
  _, warnings = sampling_concepts.prepare_prompt("a red car", concepts, tokenizer)
  assert any("uses none of the learned tokens" in w for w in warnings)
  _, warnings = sampling_concepts.prepare_prompt("a <toy> " + "very " * 100, concepts, tokenizer)
  assert any("truncated to 77" in w for w in warnings)
  # 75 words and <toy> as one id each fit; counted in the model's own pieces they would not.
  _, warnings = sampling_concepts.prepare_prompt("<toy> " + "a " * 74, concepts, tokenizer)
  assert not warnings


@pytest.mark.parametrize("kwargs, needle", [
    (dict(step=999), "no checkpoint at step 999"),
    (dict(workdir="/no/such/run"), "run directory /no/such/run does not exist"),
    (dict(workdir=REPO), "not a ti_jax run directory"),
    (dict(prompts=[]), "no prompt"),
    (dict(scheduler="heun"), "heun"),
    (dict(seed=-1), "seed must be in"),
    (dict(pretrained_model_name_or_path="tiny-flux"), "not yet with learned concepts"),
])
def test_bad_sampling_input_is_one_line(runs, tmp_path, kwargs, needle):
  with pytest.raises(errors.UserError) as err:
    _sample(runs, tmp_path, "x", **kwargs)
  assert needle in str(err.value) and "\n" not in str(err.value)


def test_unreadable_embedding_file_is_one_line(tmp_path):
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x00\x01not a safetensors file")
  with pytest.raises(embedding_io.EmbeddingFileError) as err:
    embedding_io.load_concepts(str(bad))
  assert "bad.safetensors" in str(err.value) and "\n" not in str(err.value)
  pt = tmp_path / "bad.pt"
  pt.write_bytes(b"garbage")
  with pytest.raises(embedding_io.EmbeddingFileError, match="cannot read"):
    embedding_io.load_concepts(str(pt))


@pytest.mark.parametrize("fmt", embedding_writer.FORMATS)
def test_export_then_import_round_trips(runs, tmp_path, fmt):
  vectors, _ = run_dir.learned_from_workdir(runs["style"])
  path = exporter.export(runs["style"], fmt,
                         str(tmp_path / embedding_writer.default_filename("<style>", fmt)))
  (concept,) = embedding_io.load_concepts(path)
  np.testing.assert_array_equal(concept.vectors[0], vectors)
  assert concept.vectors[0].shape == (2, 32)
  # Every format's default file registers the run's token: A1111 and kohya files by
  # their file name, which keeps the token's characters; diffusers files by their key.
  assert concept.token == "<style>"
  (renamed,) = embedding_io.load_concepts(f"{path}:<s2>")
  assert renamed.token == "<s2>"


def test_a1111_pt_has_the_webui_fields(runs, tmp_path):
  torch = pytest.importorskip("torch")
  path = exporter.export(runs["toy"], "a1111-pt", str(tmp_path / "toy.pt"))
  data = torch.load(path, weights_only=True)
  assert set(data) >= {"string_to_param", "string_to_token", "name", "step"}
  assert data["name"] == "<toy>" and data["step"] == 3
  assert tuple(data["string_to_param"]["*"].shape) == (1, 32)


@pytest.mark.parametrize("run_name, fmt", [("toy", "diffusers"), ("style", "diffusers"),
                                           ("style", "a1111-pt")])
def test_diffusers_load_textual_inversion_matches_ti_jax(runs, tmp_path, run_name, fmt):
  """The exported file in diffusers' own loader gives ti_jax's text-encoder output."""
  torch = pytest.importorskip("torch")
  from diffusers import StableDiffusionPipeline
  workdir = runs[run_name]
  token = "<toy>" if run_name == "toy" else "<style>"
  path = exporter.export(workdir, fmt,
                         str(tmp_path / embedding_writer.default_filename(token, fmt)))
  sd = load_stable_diffusion("tiny-sd15", cache_dir=runs["cache"])
  pipe = StableDiffusionPipeline.from_pretrained(sd.path, safety_checker=None)
  pipe.load_textual_inversion(path, token=token)
  prompt = f"a photo of {token} on a table"
  expanded = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
  ids = pipe.tokenizer(expanded, padding="max_length", max_length=77,
                       return_tensors="pt").input_ids
  with torch.no_grad():
    ref = pipe.text_encoder(ids).last_hidden_state.numpy()
  concepts = embedding_io.load_concepts(workdir)
  tokenizer, ((vectors, token_ids),) = sampling_concepts.tokenizer_with_concepts(sd.tokenizer,
                                                                                concepts)
  ours_prompt, _ = sampling_concepts.prepare_prompt(prompt, concepts, tokenizer)
  our_ids = np.asarray(tokenizer(ours_prompt, padding="max_length", max_length=77,
                                 return_tensors="np").input_ids)
  table = sd.text_encoder_params["embeddings"]["token_embedding"]["embedding"]
  embeds = pseudo_words.embed_tokens(table, vectors, np.asarray(token_ids), our_ids)
  ours = sd.text_encoder.apply({"params": sd.text_encoder_params}, our_ids, inputs_embeds=embeds)
  record_parity(f"load_textual_inversion ({fmt}, {vectors.shape[0]} vector) vs ti_jax",
                rel_err(ours, ref), 1e-4)


def test_export_cli_writes_file(runs, tmp_path):
  out = tmp_path / "cli" / "toy.safetensors"
  proc = subprocess.run([sys.executable, "-m", "ti_jax.export", "--workdir", runs["toy"],
                         "--format", "kohya", "--output", str(out)],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "emb_params" in embedding_io.safetensors_io.read_shapes(str(out))
  into_folder = subprocess.run([sys.executable, "-m", "ti_jax.export", "--workdir", runs["toy"],
                                "--output", str(tmp_path)], capture_output=True, text=True,
                               timeout=120)
  assert into_folder.returncode != 0
  assert into_folder.stderr.strip().splitlines() == [f"error: --output {tmp_path} is a folder; "
                                                     "give a file name"]
  bad = subprocess.run([sys.executable, "-m", "ti_jax.export", "--workdir", str(tmp_path),
                        "--format", "kohya"], capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_init_embedding_starts_training_from_an_exported_file(runs, tmp_path):
  path = exporter.export(runs["toy"], "a1111", str(tmp_path / "toy.safetensors"))
  vectors, _ = run_dir.learned_from_workdir(runs["toy"])
  workdir = _train(tmp_path / "again", runs["cache"], placeholder_token="<toy2>",
                   init_embedding=path, max_train_steps=1, checkpointing_steps=1)
  meta_vectors, _ = run_dir.learned_from_workdir(workdir)
  # One step moves the vectors a little from where the file left them.
  assert np.abs(meta_vectors - vectors).max() < 0.1


def _export_cli(workdir, *args):
  return subprocess.run([sys.executable, "-m", "ti_jax.export", "--workdir", workdir, *args],
                        capture_output=True, text=True, timeout=120)


def test_export_formats_never_replace_each_other(runs, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path / "toy")
  shutil.copytree(runs["toy"], workdir)
  paths = {fmt: exporter.export(workdir, fmt) for fmt in ("a1111", "kohya", "diffusers")}
  assert len(set(paths.values())) == 3
  assert paths["a1111"].endswith(os.path.join("export", "a1111", "<toy>.safetensors"))
  assert paths["kohya"].endswith(os.path.join("export", "kohya", "<toy>.safetensors"))
  assert "emb_params" in embedding_io.safetensors_io.read_shapes(paths["a1111"])
  assert "emb_params" in embedding_io.safetensors_io.read_shapes(paths["kohya"])
  # A second export to an existing file is refused and leaves it as it was.
  before = open(paths["kohya"], "rb").read()
  again = _export_cli(workdir, "--format", "kohya")
  assert again.returncode == 1
  assert again.stderr.strip().splitlines() == [
      f"error: {paths['kohya']} already exists; pass --overwrite to replace it "
      "(or --output another file)"]
  assert open(paths["kohya"], "rb").read() == before
  forced = _export_cli(workdir, "--format", "kohya", "--overwrite")
  assert forced.returncode == 0, forced.stderr
  # The CLI says what to type in each tool: the file name for kohya and ComfyUI.
  assert "kohya sd-scripts: type <toy> in prompts; ComfyUI: type embedding:<toy>" in forced.stderr
  leftovers = [f for f in os.listdir(os.path.dirname(paths["kohya"])) if ".tmp-" in f]
  assert leftovers == []


def test_interrupted_export_leaves_no_file(runs, tmp_path, monkeypatch):
  def write_half_then_fail(path, concept, fmt, step=0):
    del concept, fmt, step
    with open(path, "wb") as f:
      f.write(b"half a file")
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(embedding_writer, "write_embedding_file", write_half_then_fail)
  out = tmp_path / "out" / "toy.safetensors"
  with pytest.raises(OSError):
    exporter.export(runs["toy"], "kohya", str(out))
  assert os.listdir(tmp_path / "out") == []


def test_non_finite_vectors_are_never_exported_or_sampled(runs, tmp_path, monkeypatch):
  real = run_dir.encoder_vectors_from_workdir

  def diverged(workdir, step=None):
    vectors, meta = real(workdir, step)
    return (np.full_like(vectors[0], np.nan),) + vectors[1:], meta
  monkeypatch.setattr(run_dir, "encoder_vectors_from_workdir", diverged)
  out = tmp_path / "nan.safetensors"
  with pytest.raises(embedding_io.EmbeddingFileError) as err:
    exporter.export(runs["toy"], "diffusers", str(out))
  assert "holds NaN or inf" in str(err.value) and "nothing exported" in str(err.value)
  assert not out.exists()
  with pytest.raises(sampling_concepts.SampleError, match="holds NaN or inf"):
    _sample(runs, tmp_path, "nan")
  assert not (tmp_path / "nan").exists()


def test_token_inside_the_runs_token_leaves_its_images_unchanged(runs, tmp_path):
  """A 2-vector file for `toy>` beside the run's `<toy>`: the run's prompt keeps its vectors."""
  style_file = exporter.export(runs["style"], "diffusers", str(tmp_path / "style.safetensors"))
  alone = _pixels(_sample(runs, tmp_path, "alone", num_images=1))
  both = _pixels(_sample(runs, tmp_path, "both", num_images=1,
                         embedding_sources=[f"{style_file}:toy>"]))
  np.testing.assert_array_equal(both, alone)


def test_init_embedding_of_a_two_token_file_follows_its_own_advice(runs, tmp_path):
  two = str(tmp_path / "two.safetensors")
  vectors, _ = run_dir.learned_from_workdir(runs["toy"])
  embedding_io.safetensors_io.save(two, {"<a>": vectors, "<b>": vectors * 2})
  with pytest.raises(training_config.ConfigError) as err:
    _train(tmp_path / "x", runs["cache"], placeholder_token="<toy3>", init_embedding=two,
           max_train_steps=1, checkpointing_steps=1)
  assert f"pick one as {two}:<a>" in str(err.value)
  workdir = _train(tmp_path / "y", runs["cache"], placeholder_token="<toy3>",
                   init_embedding=f"{two}:<b>", max_train_steps=1, checkpointing_steps=1)
  trained, _ = run_dir.learned_from_workdir(workdir)
  assert np.abs(trained - vectors * 2).max() < 0.1  # started from <b>, not <a>


def test_evaluate_without_the_hub_suggests_tiny_clip(runs, tmp_path):
  from ti_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
  protocol = evaluator.Protocol(num_samples=1, num_inference_steps=1,
                               clip_model="openai/clip-vit-base-patch32")
  with pytest.raises(errors.UserError) as err:
    # conftest sets HF_HUB_OFFLINE: the hub id cannot be fetched.
    evaluator.run(workdirs=[runs["toy"]], protocol=protocol, output_dir=str(tmp_path / "e"),
                 cache_dir=runs["cache"], devices=jax.local_devices()[:1])
  assert "--clip_model tiny-clip" in str(err.value) and "\n" not in str(err.value)


# --- per-device batches and streamed writing ---------------------------------


@pytest.mark.parametrize("devices, batch_size", [(1, 3), (4, 1), (4, 2)])
def test_batch_size_and_device_count_do_not_change_the_images(runs, devices, batch_size):
  """Image i starts from noise (seed, i) however the images are batched over calls and devices."""
  sd = load_stable_diffusion("tiny-sd15", cache_dir=runs["cache"])
  tokenizer, learned = sampling_concepts.tokenizer_with_concepts(
      sd.tokenizer, embedding_io.load_concepts(runs["toy"]))
  images = {}
  for n, b in ((1, 1), (devices, batch_size)):
    gen = generation.ImageGenerator(sd, height=64, width=64, devices=jax.local_devices()[:n], **FAST)
    images[n, b] = generation.generate_images(gen, "a photo of a <toy>", 5, batch_size=b, seed=3,
                                              learned=learned, tokenizers=(tokenizer,))
  ref, other = images[1, 1], images[devices, batch_size]
  assert ref.shape == other.shape == (5, 64, 64, 3)
  # Same noise per image; only the batch layout differs, so at most rounding of one level.
  assert np.abs(ref.astype(int) - other.astype(int)).max() <= 1
  assert not np.array_equal(ref[0], ref[1])


def test_sample_writes_each_batch_before_generating_the_next(runs, tmp_path, monkeypatch):
  out = tmp_path / "stream"
  on_disk = []
  generate = generation.ImageGenerator.generate

  def counting_generate(self, *args, **kwargs):
    on_disk.append(len([f for f in os.listdir(out) if not f.endswith("_grid.png")]))
    return generate(self, *args, **kwargs)

  monkeypatch.setattr(generation.ImageGenerator, "generate", counting_generate)
  paths = _sample(runs, tmp_path, "stream", num_images=5, batch_size=2)
  # Three calls of 2 images on one device; before each, every earlier image is a PNG.
  assert on_disk == [0, 2, 4]
  assert len(paths) == 5 and all(os.path.exists(p) for p in paths)


def test_sample_grid_holds_at_most_grid_max_images(runs, tmp_path, monkeypatch):
  monkeypatch.setattr(runner, "GRID_MAX", 2)
  paths = _sample(runs, tmp_path, "grid", num_images=3, batch_size=2)
  assert len(paths) == 3
  grid_path = [f for f in os.listdir(tmp_path / "grid") if f.endswith("_grid.png")]
  grid = Image.open(tmp_path / "grid" / grid_path[0])
  assert grid.size == (128, 64)  # two 64 px tiles side by side
  assert grid.text["images"] == "0-1 of 3"


class _FakeDevice:
  def __init__(self, platform, limit=None):
    self.platform, self._limit = platform, limit

  def memory_stats(self):
    return {"bytes_limit": self._limit} if self._limit else None


def test_auto_batch_size_covers_the_images_within_the_device_memory(runs):
  sd = load_stable_diffusion("tiny-sd15", cache_dir=runs["cache"])
  weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(
      (sd.unet_params, sd.text_encoder_params, sd.vae_params)))
  per_image = generation.image_bytes(sd, 64, 64)
  assert per_image == 8 * 64 * 64 * sd.vae.config.block_out_channels[0] * 4

  def auto(devices, num_images):
    gen = types.SimpleNamespace(devices=devices, sd=sd, image_size=(64, 64))
    return generation.auto_batch_size(gen, num_images)

  cpu = [_FakeDevice("cpu")] * 2
  assert auto(cpu, 3) == 2  # ceil(3 / 2 devices): one call
  assert auto(cpu, 64) == generation.CPU_AUTO_BATCH
  # Room for exactly 5 images after the weights, of which half may be used: 2.
  small = [_FakeDevice("gpu", weights + 5 * per_image)]
  assert auto(small, 64) == 2
  assert auto([_FakeDevice("gpu", weights)], 64) == 1  # never below one
  big = [_FakeDevice("tpu", 2**40)]
  assert auto(big, 64) == 16 and auto(big, 5) == 5
  assert auto([_FakeDevice("gpu")], 64) == generation.CPU_AUTO_BATCH  # no stats: the CPU cap


def test_validation_writes_every_image_in_per_device_batches(runs, tmp_path):
  workdir = _train(tmp_path / "val", runs["cache"], max_train_steps=1, checkpointing_steps=1,
                   validation_prompt="a photo of {}", validation_steps=1,
                   num_validation_images=3, validation_batch_size=2,
                   validation_inference_steps=2)
  pngs = sorted(os.listdir(os.path.join(workdir, "validation")))
  assert pngs == ["step000001_0.png", "step000001_1.png", "step000001_2.png"]
