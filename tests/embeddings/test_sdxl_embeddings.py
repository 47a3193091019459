"""SDXL embedding files (clip_l/clip_g, diffusers' pair): read, written, refused for SD models,
and loaded by diffusers' own StableDiffusionXLPipeline.load_textual_inversion."""

import copy
import os

import numpy as np
import pytest

from ti_jax.embeddings import embedding_io, embedding_writer, exporter, file_names
from ti_jax.sampling import concepts as sampling_concepts
from ti_jax.weights import safetensors_io, tiny_tokenizer

# The tiny encoders' widths: different, so a swapped pair cannot pass.
WIDTH_1, WIDTH_2 = 32, 48


def _sdxl(token="<toy>", n=2, seed=0, widths=(WIDTH_1, WIDTH_2), source=""):
  rng = np.random.default_rng(seed)
  a, b = (rng.standard_normal((n, w)).astype(np.float32) for w in widths)
  return embedding_io.Concept(token, (a, b), source)


def _one(spec):
  (concept,) = embedding_io.load_concepts(str(spec))
  return concept


def _same_vectors(concept, expected):
  assert len(concept.vectors) == len(expected.vectors) == 2
  for got, want in zip(concept.vectors, expected.vectors):
    np.testing.assert_array_equal(got, want)


def _refusal(fn, *args, error=embedding_io.EmbeddingFileError):
  with pytest.raises(error) as err:
    fn(*args)
  message = str(err.value)
  assert "\n" not in message
  return message


# --- kohya / A1111 / ComfyUI: {"clip_l": [n, 768], "clip_g": [n, 1280]} -------------------

@pytest.mark.parametrize("fmt", ["a1111", "kohya", "a1111-pt"])
def test_sdxl_file_holds_clip_l_and_clip_g_and_registers_its_file_name(tmp_path, fmt):
  concept = _sdxl()
  ext = ".pt" if fmt == "a1111-pt" else ".safetensors"
  path = tmp_path / f"my-xl{ext}"
  embedding_writer.write_embedding_file(str(path), concept, fmt)
  if ext == ".pt":
    torch = pytest.importorskip("torch")
    tables = {k: v.numpy() for k, v in torch.load(str(path), weights_only=True).items()}
  else:
    tables = safetensors_io.load(str(path))
  assert set(tables) == {"clip_l", "clip_g"}  # what A1111, ComfyUI and kohya look up
  np.testing.assert_array_equal(tables["clip_l"], concept.vectors[0])
  np.testing.assert_array_equal(tables["clip_g"], concept.vectors[1])
  loaded = _one(path)
  assert loaded.token == "my-xl" and "file name" in loaded.token_from
  assert loaded.family == f"SDXL ({WIDTH_1} + {WIDTH_2})"
  _same_vectors(loaded, concept)
  assert _one(f"{path}:<other>").token == "<other>"


def test_kohya_pt_sdxl_file_is_read(tmp_path):
  """kohya's sdxl_train_textual_inversion saves this plain dict for a .pt name."""
  torch = pytest.importorskip("torch")
  concept = _sdxl(n=1)
  path = tmp_path / "kohya-xl.pt"
  torch.save({"clip_g": torch.from_numpy(concept.vectors[1]),
              "clip_l": torch.from_numpy(concept.vectors[0])}, str(path))
  loaded = _one(path)
  assert loaded.token == "kohya-xl"
  _same_vectors(loaded, concept)


@pytest.mark.parametrize("tables, needle", [
    ({"clip_l": np.ones((2, WIDTH_1), np.float32)}, "holds clip_l but not clip_g"),
    ({"clip_l": np.ones((2, WIDTH_1), np.float32), "clip_g": np.ones((1, WIDTH_2), np.float32)},
     "2 vectors for the first text encoder but 1 for the second"),
    ({"clip_l": np.ones((1, WIDTH_1), np.float32),
      "clip_g": np.full((1, WIDTH_2), np.nan, np.float32)},
     "(second text encoder): vector 0 holds NaN"),
])
def test_broken_sdxl_files_are_refused_in_one_line(tmp_path, tables, needle):
  path = tmp_path / "broken.safetensors"
  safetensors_io.save(str(path), tables)
  assert needle in _refusal(embedding_io.load_concepts, str(path))


# --- diffusers: learned_embeds.safetensors + learned_embeds_2.safetensors ------------------

def test_diffusers_pair_is_written_as_two_files_and_read_from_the_first_or_the_folder(tmp_path):
  concept = _sdxl()
  first = tmp_path / "learned_embeds.safetensors"
  embedding_writer.save_embedding(str(first), concept, "diffusers")
  second = tmp_path / "learned_embeds_2.safetensors"
  assert sorted(os.listdir(tmp_path)) == [first.name, second.name]  # no temporary files left
  np.testing.assert_array_equal(safetensors_io.load(str(first))["<toy>"], concept.vectors[0])
  np.testing.assert_array_equal(safetensors_io.load(str(second))["<toy>"], concept.vectors[1])
  for spec in (first, tmp_path):
    loaded = _one(spec)
    assert loaded.token == "<toy>" and "SDXL pair" in loaded.token_from
    _same_vectors(loaded, concept)
  message = _refusal(embedding_io.load_concepts, str(second))
  assert f"pass {first}" in message and "second file" in message
  assert embedding_writer.holds_embedding(str(first), "<toy>", concept.vectors)
  assert not embedding_writer.holds_embedding(str(first), "<toy>",
                                              (concept.vectors[0], concept.vectors[1] + 1))


def test_a_file_named_like_a_second_file_is_its_own_embedding(tmp_path):
  """style_2.pt beside style.pt (two A1111 files), or diffusers files of other tokens."""
  one = embedding_io.Concept("<a>", np.ones((1, WIDTH_1), np.float32), "")
  other = embedding_io.Concept("<b>", np.full((1, WIDTH_2), 2, np.float32), "")
  for fmt, name in (("kohya", "style"), ("diffusers", "file")):
    embedding_writer.write_embedding_file(str(tmp_path / f"{name}.safetensors"), one, fmt)
    embedding_writer.write_embedding_file(str(tmp_path / f"{name}_2.safetensors"), other, fmt)
    assert len(_one(tmp_path / f"{name}.safetensors").vectors) == 1
    assert len(_one(tmp_path / f"{name}_2.safetensors").vectors) == 1


def test_pair_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
  first = tmp_path / "learned_embeds.safetensors"
  embedding_writer.save_embedding(str(first), _sdxl(seed=0), "diffusers")
  before = {p: p.read_bytes() for p in tmp_path.iterdir()}
  write_part = embedding_writer._write_part  # pylint: disable=protected-access

  def second_file_dies(path, concept, fmt, part, step):
    write_part(path, concept, fmt, part, step)
    if part == 1:
      raise OSError(28, "No space left on device")
  monkeypatch.setattr(embedding_writer, "_write_part", second_file_dies)
  with pytest.raises(OSError, match="No space left"):
    embedding_writer.save_embedding(str(first), _sdxl(seed=1), "diffusers")
  assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_export_refuses_an_existing_second_file_without_overwrite(tmp_path):
  concept = _sdxl()
  path = str(tmp_path / "out" / "learned_embeds.safetensors")
  os.makedirs(os.path.dirname(path))
  open(file_names.second_file(path), "wb").close()
  message = _refusal(exporter.write_export, path, concept, "diffusers", False)
  assert "learned_embeds_2.safetensors already exists" in message and "--overwrite" in message
  assert not os.path.exists(path)  # neither file written
  assert exporter.write_export(path, concept, "diffusers", True) == path
  _same_vectors(_one(path), concept)


def test_usage_line_names_both_encoders_for_sdxl():
  line = file_names.prompt_usage("x/learned_embeds.safetensors", "<toy>", "diffusers", sdxl=True)
  assert "'x/learned_embeds_2.safetensors', text_encoder=pipe.text_encoder_2" in line
  line = file_names.prompt_usage("x/<toy>.safetensors", "<toy>", "a1111", sdxl=True)
  assert "'clip_l' and 'clip_g'" in line and "embedding:<toy>" in line


# --- model families ----------------------------------------------------------------------

def test_families_are_named_from_the_widths():
  assert embedding_io.family((768,)) == "SD 1.x (768)"
  assert embedding_io.family((1024,)) == "SD 2.x (1024)"
  assert embedding_io.family((1280,)) == "LDM (1280)"
  assert embedding_io.family((768, 1280)) == "SDXL (768 + 1280)"


def test_sd_embedding_for_sdxl_model_and_the_reverse_are_refused_naming_both_families():
  sd15 = embedding_io.Concept("<a>", np.ones((1, 768), np.float32), "a.safetensors")
  xl = _sdxl(widths=(768, 1280), source="xl.safetensors")
  assert (_refusal(embedding_io.check_fits, sd15, (768, 1280))
          == "a.safetensors is an SD 1.x (768) embedding; the model is SDXL (768 + 1280)")
  assert (_refusal(embedding_io.check_fits, xl, (1024,))
          == "xl.safetensors is an SDXL (768 + 1280) embedding; the model is SD 2.x (1024)")
  embedding_io.check_fits(xl, (768, 1280))
  # Sampling refuses them the same way, before loading anything else.
  for concept, widths in ((sd15, (768, 1280)), (xl, 768)):
    message = _refusal(sampling_concepts.check_concepts_fit, [concept], "m", widths, False,
                       error=sampling_concepts.SampleError)
    assert "SD 1.x (768)" in message and "SDXL (768 + 1280)" in message


# --- diffusers' StableDiffusionXLPipeline.load_textual_inversion -----------------------------

@pytest.fixture(scope="module")
def sdxl_parts(tmp_path_factory):
  """The pieces of a tiny diffusers SDXL pipeline (random weights), built once."""
  torch = pytest.importorskip("torch")
  import transformers
  from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
  folder = str(tmp_path_factory.mktemp("sdxl_tok"))
  vocab = tiny_tokenizer.write_tiny_clip_tokenizer(folder)
  torch.manual_seed(0)

  def encoder_config(width, projection):
    return transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=2, projection_dim=projection,
                          max_position_embeddings=77, bos_token_id=vocab - 2,
                          eos_token_id=vocab - 1, pad_token_id=vocab - 1, hidden_act="gelu")
  projection = 16
  unet = UNet2DConditionModel(
      block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
      out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
      projection_class_embeddings_input_dim=6 * 4 + projection, norm_num_groups=4,
      cross_attention_dim=WIDTH_1 + WIDTH_2)
  vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                      up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)
  return {
      "unet": unet, "vae": vae, "scheduler": EulerDiscreteScheduler(),
      "text_encoder": transformers.CLIPTextModel(encoder_config(WIDTH_1, WIDTH_1)).eval(),
      "text_encoder_2": transformers.CLIPTextModelWithProjection(
          encoder_config(WIDTH_2, projection)).eval(),
      "tokenizer": transformers.CLIPTokenizer.from_pretrained(folder),
      "tokenizer_2": transformers.CLIPTokenizer.from_pretrained(folder)}


def _pipeline(parts):
  """A fresh pipeline (its own encoders and tokenizers: loading an embedding changes them)."""
  from diffusers import StableDiffusionXLPipeline
  own = {k: copy.deepcopy(v) if "text" in k or "tokenizer" in k else v for k, v in parts.items()}
  return StableDiffusionXLPipeline(**own)


def _encode(pipe, prompt):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu",
                                              do_classifier_free_guidance=False)
  return embeds.numpy(), pooled.numpy()  # [1, 77, WIDTH_1 + WIDTH_2], [1, projection]


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "a1111-pt"])
def test_diffusers_sdxl_pipeline_loads_the_export_into_both_encoders(sdxl_parts, tmp_path, fmt):
  """The exported file, loaded as diffusers documents, gives each encoder its vectors."""
  torch = pytest.importorskip("torch")
  concept = _sdxl(token="<toy>", n=2)
  path = exporter.write_export(str(tmp_path / embedding_writer.default_filename("<toy>", fmt)),
                               concept, fmt, False)
  pipe = _pipeline(sdxl_parts)
  prompt = "a photo of <toy>"
  base, base_pooled = _encode(pipe, prompt)
  first = {"text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}
  second = {"text_encoder": pipe.text_encoder_2, "tokenizer": pipe.tokenizer_2}
  if fmt == "diffusers":
    pipe.load_textual_inversion(path, **first)
    pipe.load_textual_inversion(file_names.second_file(path), **second)
    token = "<toy>"  # the files' key
  else:
    tables = (safetensors_io.load(path) if fmt == "kohya"
              else {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()})
    token = os.path.splitext(os.path.basename(path))[0]  # as A1111 and ComfyUI name it
    pipe.load_textual_inversion(torch.from_numpy(np.array(tables["clip_l"])), token=token,
                                **first)
    pipe.load_textual_inversion(torch.from_numpy(np.array(tables["clip_g"])), token=token,
                                **second)
  for encoder, expected in zip((first, second), concept.vectors, strict=True):
    ids = encoder["tokenizer"].convert_tokens_to_ids([token, f"{token}_1"])
    rows = encoder["text_encoder"].get_input_embeddings().weight.detach().numpy()[ids]
    np.testing.assert_array_equal(rows, expected)
  embeds, pooled = _encode(pipe, prompt)
  # Both encoders' halves of the prompt embedding change, and the pooled one (encoder 2).
  assert not np.allclose(embeds[..., :WIDTH_1], base[..., :WIDTH_1])
  assert not np.allclose(embeds[..., WIDTH_1:], base[..., WIDTH_1:])
  assert not np.allclose(pooled, base_pooled)


# --- diffusers' encode_prompt equals ti_jax's SDXL conditioning with the exported pair -------

def test_diffusers_encode_prompt_with_the_export_equals_ti_jax_conditioning(tmp_path_factory,
                                                                            tmp_path):
  """The tiny-sdxl preset in both libraries, the same exported pair: the same UNet inputs."""
  torch = pytest.importorskip("torch")
  from conftest import record_parity
  from diffusers import StableDiffusionXLPipeline
  from torch_reference import rel_err

  from ti_jax.embeddings import pseudo_words
  from ti_jax.models import sdxl
  from ti_jax.weights import tiny_models
  from ti_jax.weights.loading import load_stable_diffusion
  folder = tiny_models.ensure_tiny_model(str(tmp_path_factory.mktemp("tiny_sdxl")), "tiny-sdxl")
  sd = load_stable_diffusion(folder)
  widths = sampling_concepts.text_encoder_widths(sd)
  assert len(widths) == 2
  path = exporter.write_export(str(tmp_path / "learned_embeds.safetensors"),
                               _sdxl(n=2, seed=3, widths=widths), "diffusers", False)
  pipe = StableDiffusionXLPipeline.from_pretrained(folder)
  pipe.load_textual_inversion(path, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
  pipe.load_textual_inversion(file_names.second_file(path), text_encoder=pipe.text_encoder_2,
                              tokenizer=pipe.tokenizer_2)
  prompt = "a photo of <toy> on a table"
  with torch.no_grad():
    ref_context, _, ref_pooled, _ = pipe.encode_prompt(prompt, device="cpu",
                                                       do_classifier_free_guidance=False)

  concepts = embedding_io.load_concepts(path)
  sampling_concepts.check_concepts_fit(concepts, folder, widths, False)
  sd_file = embedding_io.Concept("<sd>", np.ones((1, widths[0]), np.float32), "sd.safetensors")
  with pytest.raises(sampling_concepts.SampleError, match="an SD .* embedding; the model is SDXL"):
    sampling_concepts.check_concepts_fit([sd_file], folder, widths, False)
  embeds, ids = [], []
  for e, encoder in enumerate(sd.text_encoders):
    tokenizer, params = encoder.tokenizer, encoder.params
    per_encoder = [embedding_io.Concept(c.token, c.vectors[e], c.source) for c in concepts]
    tok, ((vectors, token_ids),) = sampling_concepts.tokenizer_with_concepts(tokenizer,
                                                                             per_encoder)
    text, _ = sampling_concepts.prepare_prompt(prompt, per_encoder, tok)
    prompt_ids = np.asarray(tok(text, padding="max_length", max_length=77, truncation=True,
                                return_tensors="np").input_ids)  # [1, 77]
    table = params["embeddings"]["token_embedding"]["embedding"]
    embeds.append(pseudo_words.embed_tokens(table, vectors, np.asarray(token_ids), prompt_ids))
    ids.append(prompt_ids)
  context, pooled = sdxl.text_conditioning(tuple(e.module for e in sd.text_encoders),
                                           tuple(e.params for e in sd.text_encoders), ids, embeds)
  record_parity("SDXL pair export: encode_prompt context vs ti_jax", rel_err(context, ref_context),
                1e-4)
  record_parity("SDXL pair export: encode_prompt pooled vs ti_jax", rel_err(pooled, ref_pooled),
                1e-4)
