"""Embedding files from other tools: which token they register, and the files ti_jax refuses."""

import os

import numpy as np
import pytest

from ti_jax.embeddings import embedding_io, embedding_writer, file_names, pseudo_words
from ti_jax.sampling import concepts as sampling_concepts
from ti_jax.weights import safetensors_io, tiny_tokenizer

DIM = 32


def _vectors(n=1, seed=0):
  return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _one(spec):
  (concept,) = embedding_io.load_concepts(str(spec))
  return concept


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tok"))
  tiny_tokenizer.write_tiny_clip_tokenizer(folder)
  return folder


@pytest.fixture
def tokenizer(tokenizer_dir):
  from transformers import CLIPTokenizer
  return CLIPTokenizer.from_pretrained(tokenizer_dir)


# --- which token a file registers --------------------------------------------------------

@pytest.mark.parametrize("fmt", ["a1111", "a1111-pt", "kohya"])
def test_a1111_and_kohya_files_register_their_file_name(tmp_path, fmt):
  """A1111, kohya and ComfyUI name an embedding after its file, not the name inside it."""
  if fmt == "a1111-pt":
    pytest.importorskip("torch")
  ext = ".pt" if fmt == "a1111-pt" else ".safetensors"
  path = tmp_path / f"<toy>{ext}"
  embedding_writer.write_embedding_file(str(path), embedding_io.Concept("<toy>", _vectors(2), ""),
                                        fmt)
  assert _one(path).token == "<toy>"
  renamed = tmp_path / f"my-rename{ext}"
  os.rename(path, renamed)
  concept = _one(renamed)
  assert concept.token == "my-rename" and "file name" in concept.token_from
  np.testing.assert_array_equal(concept.vectors[0], _vectors(2))


def test_diffusers_file_registers_its_key_as_diffusers_does(tmp_path):
  path = tmp_path / "renamed.safetensors"
  embedding_writer.write_embedding_file(str(path), embedding_io.Concept("<cat>", _vectors(), ""),
                                        "diffusers")
  concept = _one(path)
  assert concept.token == "<cat>" and "key" in concept.token_from
  assert _one(f"{path}:<kitty>").token == "<kitty>"  # a given token wins, as in diffusers


def test_path_token_picks_one_token_of_a_multi_token_file(tmp_path):
  path = tmp_path / "two.safetensors"
  safetensors_io.save(str(path), {"<a>": _vectors(1, 1), "<b>": _vectors(2, 2)})
  assert [c.token for c in embedding_io.load_concepts(str(path))] == ["<a>", "<b>"]
  chosen = _one(f"{path}:<b>")
  assert chosen.token == "<b>" and chosen.vectors[0].shape == (2, DIM)
  with pytest.raises(embedding_io.EmbeddingFileError) as err:
    embedding_io.load_concepts(f"{path}:<c>")
  assert "holds 2 tokens (<a>, <b>)" in str(err.value) and "\n" not in str(err.value)


def test_folder_with_learned_embeds_loads_as_diffusers_does(tmp_path):
  embedding_writer.write_embedding_file(str(tmp_path / "learned_embeds.safetensors"),
                                        embedding_io.Concept("<cat>", _vectors(), ""), "diffusers")
  assert _one(tmp_path).token == "<cat>"


def test_folder_without_embedding_files_is_refused(tmp_path):
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(embedding_io.EmbeddingFileError) as err:
    embedding_io.load_concepts(str(tmp_path))
  assert "not a ti_jax run directory" in str(err.value)
  assert "no learned_embeds.safetensors" in str(err.value)


# --- files that are refused, each with one line --------------------------------------------

def _refusal(path):
  with pytest.raises(embedding_io.EmbeddingFileError) as err:
    embedding_io.load_concepts(str(path))
  message = str(err.value)
  assert "\n" not in message and "\x1b" not in message
  return message


def test_pickle_with_code_is_refused_in_one_clean_line(tmp_path):
  torch = pytest.importorskip("torch")
  path = tmp_path / "evil.pt"
  torch.save({"string_to_param": {"*": torch.ones(1, DIM)}, "x": np.random.default_rng(0)},
             str(path))
  message = _refusal(path)
  assert "refused" in message and "weights_only" in message
  assert "numpy.random" in message  # the object it would have had to build
  assert "weights_only=False" not in message  # torch's advice to run the file's code is dropped


@pytest.mark.parametrize("name, array, needle", [
    ("nan", np.full((1, DIM), np.nan, np.float32), "vector 0 holds NaN or inf"),
    ("inf", np.concatenate([_vectors(), np.full((1, DIM), np.inf, np.float32)]),
     "vector 1 holds NaN or inf"),
    ("zero", np.zeros((2, DIM), np.float32), "vector 0 is all zeros"),
    ("int", np.ones((1, DIM), np.int32), "dtype int32"),
    ("empty", np.ones((0, DIM), np.float32), "got (0, 32)"),
    ("cube", np.ones((1, 2, DIM), np.float32), "got (1, 2, 32)"),
    ("long", np.ones((80, DIM), np.float32), "80 vectors cannot fit a 77-token prompt"),
])
def test_bad_vectors_are_refused(tmp_path, name, array, needle):
  path = tmp_path / f"{name}.safetensors"
  safetensors_io.save(str(path), {"<x>": array})
  assert needle in _refusal(path)


def test_huge_file_is_refused_before_reading(tmp_path):
  path = tmp_path / "model.safetensors"
  with open(path, "wb") as f:  # sparse: no disk space used
    f.truncate(embedding_io.MAX_FILE_BYTES + 1)
  assert "far more than an embedding" in _refusal(path)


def test_corrupt_header_is_one_line(tmp_path):
  path = tmp_path / "list.safetensors"
  header = b"[1, 2]"
  path.write_bytes(len(header).to_bytes(8, "little") + header)
  assert "cannot read embedding file" in _refusal(path)


def test_writing_non_finite_vectors_is_refused(tmp_path):
  bad = embedding_io.Concept("<x>", np.full((1, DIM), np.nan, np.float32), "run")
  with pytest.raises(embedding_io.EmbeddingFileError, match="NaN"):
    embedding_writer.write_embedding_file(str(tmp_path / "x.safetensors"), bad, "diffusers")
  assert not os.listdir(tmp_path)


def test_save_embedding_replaces_the_file_whole_or_not_at_all(tmp_path, monkeypatch):
  """The one writer of embedding files (final learned_embeds and every export)."""
  path = tmp_path / "learned_embeds.safetensors"
  embedding_writer.save_embedding(str(path), embedding_io.Concept("<toy>", _vectors(2), ""),
                                  "diffusers")
  np.testing.assert_array_equal(safetensors_io.load(str(path))["<toy>"], _vectors(2))
  assert embedding_writer.holds_embedding(str(path), "<toy>", (_vectors(2),))
  assert not embedding_writer.holds_embedding(str(path), "<toy>", (_vectors(2, seed=1),))
  assert not embedding_writer.holds_embedding(str(path), "<other>", (_vectors(2),))
  before = path.read_bytes()

  def dies_half_way(local, concept, fmt, step=0):
    del concept, fmt, step
    with open(local, "wb") as f:
      f.write(b"half")
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(embedding_writer, "write_embedding_file", dies_half_way)
  with pytest.raises(OSError, match="No space left"):
    embedding_writer.save_embedding(str(path),
                                    embedding_io.Concept("<toy>", _vectors(2, seed=1), ""),
                                    "diffusers")
  assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


# --- export file names --------------------------------------------------------------------

def test_default_export_names_are_distinct_per_format():
  names = {fmt: embedding_writer.default_filename("<toy>", fmt)
           for fmt in embedding_writer.FORMATS}
  assert len(set(names.values())) == len(names)
  assert names["a1111"] == "a1111/<toy>.safetensors"
  assert names["kohya"] == "kohya/<toy>.safetensors"
  assert names["diffusers"] == "diffusers/learned_embeds.safetensors"


def test_file_stem_keeps_the_token_and_never_becomes_a_plain_word():
  assert file_names.file_stem("<toy>", windows=False) == "<toy>"
  assert file_names.file_stem("<toy>", windows=True) == "_toy_"  # Windows forbids <>
  assert file_names.file_stem("a/b", windows=False) == "a_b"
  assert file_names.file_stem("..", windows=False) == "_."
  assert file_names.file_stem("<x?>.", windows=True) == "_x__"


# --- prompt expansion ---------------------------------------------------------------------

def test_token_inside_another_token_is_not_expanded(tokenizer):
  """The issue's case: a 2-vector `mystyle` beside the run's `<mystyle>`."""
  concepts = [embedding_io.Concept("<mystyle>", _vectors(1), "run"),
              embedding_io.Concept("mystyle", _vectors(2), "file")]
  tokenizer, _ = sampling_concepts.tokenizer_with_concepts(tokenizer, concepts)
  prompt, warnings = sampling_concepts.prepare_prompt("a photo of <mystyle>", concepts, tokenizer)
  assert prompt == "a photo of <mystyle>" and not warnings
  prompt, _ = sampling_concepts.prepare_prompt("a mystyle cat and <mystyle>", concepts, tokenizer)
  assert prompt == "a mystyle mystyle_1 cat and <mystyle>"
  ids = tokenizer(prompt, add_special_tokens=False).input_ids
  assert tokenizer.convert_ids_to_tokens(ids)[1:4] == ["mystyle", "mystyle_1", "cat</w>"]


def test_spelled_out_vectors_are_not_expanded_again():
  counts = {"<s>": 3}
  assert pseudo_words.expand_placeholders("a <s> <s>_1 <s>_2", counts) == "a <s> <s>_1 <s>_2"
  assert pseudo_words.expand_placeholders("a <s>, b", counts) == "a <s> <s>_1 <s>_2, b"


def test_expansion_follows_the_tokenizers_case_folding():
  assert (pseudo_words.expand_placeholders("a <Style>", {"<style>": 2}, ignore_case=True)
          == "a <style> <style>_1")
  assert pseudo_words.expand_placeholders("a <Style>", {"<style>": 2}) == "a <Style>"


def test_tokens_the_tokenizer_cannot_separate_are_refused(tokenizer):
  # Tokenizers split special tokens out first, so this token can never be one token.
  concepts = [embedding_io.Concept("x<|endoftext|>", _vectors(), "file")]
  with pytest.raises(sampling_concepts.SampleError) as err:
    sampling_concepts.tokenizer_with_concepts(tokenizer, concepts)
  assert "split by the tokenizer" in str(err.value) and "PATH:NEW_TOKEN" in str(err.value)


def test_extra_vector_name_clashing_with_another_token_is_refused(tmp_path):
  a = tmp_path / "a.safetensors"
  b = tmp_path / "b.safetensors"
  safetensors_io.save(str(a), {"<s>": _vectors(2)})
  safetensors_io.save(str(b), {"<s>_1": _vectors(1)})
  with pytest.raises(sampling_concepts.SampleError) as err:
    sampling_concepts.gather_concepts(None, None, [str(a), str(b)])
  assert "clashes with '<s>_1' (vector 1 of '<s>')" in str(err.value)
  with pytest.raises(sampling_concepts.SampleError, match="comes from both"):
    sampling_concepts.gather_concepts(None, None, [str(a), str(a)])


def test_registered_tokens_are_reported(tmp_path):
  path = tmp_path / "renamed.safetensors"
  embedding_writer.write_embedding_file(str(path), embedding_io.Concept("<toy>", _vectors(2), ""),
                                        "kohya")
  concepts, _ = sampling_concepts.gather_concepts(None, None, [str(path)])
  (line,) = sampling_concepts.describe_concepts(concepts)
  assert line.startswith(f"{path}: registered renamed (2 vectors")
  assert "file name" in line
