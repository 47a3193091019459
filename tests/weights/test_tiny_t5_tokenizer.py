"""Tests for ti_jax.weights.tiny_t5_tokenizer: a small T5-format SentencePiece Unigram tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ti_jax.embeddings import pseudo_words
from ti_jax.weights.presets import TINY_T5_CONFIG
from ti_jax.weights.tiny_t5_tokenizer import METASPACE, unigram_vocab, write_tiny_t5_tokenizer

transformers = pytest.importorskip("transformers")

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PROMPT = "a painting in the style of <cat-toy>"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
  out = tmp_path_factory.mktemp("t5_tokenizer")
  return out, write_tiny_t5_tokenizer(str(out))


@pytest.fixture()
def tokenizer(tok_dir):
  # Function-scoped: some tests add tokens, which mutates the tokenizer.
  return transformers.T5TokenizerFast.from_pretrained(str(tok_dir[0]), local_files_only=True)


def _pieces(tokenizer, text: str) -> list[str]:
  return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)


def test_writes_a_t5_folder_of_a_unigram_model(tok_dir):
  path, vocab_size = tok_dir
  for name in FILES:
    assert (path / name).is_file(), name
  spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
  assert spec["model"]["type"] == "Unigram" and spec["model"]["unk_id"] == 2
  assert [p for p, _ in spec["model"]["vocab"][:3]] == ["<pad>", "</s>", "<unk>"]
  assert len(spec["model"]["vocab"]) == vocab_size
  config = json.loads((path / "tokenizer_config.json").read_text())
  assert config["tokenizer_class"] == "T5Tokenizer" and config["model_max_length"] == 512


def test_loads_with_t5_tokenizer_fast_and_auto_tokenizer(tok_dir):
  path, vocab_size = tok_dir
  for cls in (transformers.T5TokenizerFast, transformers.AutoTokenizer):
    tok = cls.from_pretrained(str(path), local_files_only=True)
    assert isinstance(tok, transformers.T5TokenizerFast)
    assert len(tok) == vocab_size  # no <extra_id_N> sentinels added
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert tok.bos_token is None


def test_vocab_fits_the_tiny_t5_encoder_with_spare_rows(tok_dir):
  assert tok_dir[1] < TINY_T5_CONFIG["vocab_size"]


def test_write_is_deterministic(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  assert write_tiny_t5_tokenizer(str(a)) == write_tiny_t5_tokenizer(str(b))
  for name in FILES:
    assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_vocab_is_sorted_best_first_after_the_special_tokens():
  vocab = unigram_vocab()
  scores = [s for _, s in vocab[3:]]
  assert scores == sorted(scores, reverse=True)
  assert len({p for p, _ in vocab}) == len(vocab)


@pytest.mark.parametrize("word", ["painting", "sculpture", "cat", "toy", "dog", "style", "photo",
                                  "the", "of", "a", "teddy", "bear"])
def test_corpus_words_are_one_piece_with_the_metaspace(tokenizer, word):
  assert _pieces(tokenizer, word) == [METASPACE + word]


def test_eos_is_appended_and_no_bos(tokenizer):
  ids = tokenizer("a photo of a dog").input_ids
  assert _pieces(tokenizer, "a photo of a dog") == ["▁a", "▁photo", "▁of", "▁a", "▁dog"]
  assert ids[-1] == tokenizer.eos_token_id == 1 and ids.count(1) == 1
  assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a dog"


def test_other_words_encode_into_pieces(tokenizer):
  # The case T5 keeps, suffixes, compounds of corpus words and spelled-out unseen words.
  assert _pieces(tokenizer, "Cat") == ["▁C", "at"]  # not "▁cat"
  assert _pieces(tokenizer, "paintings") == ["▁painting", "s"]
  assert _pieces(tokenizer, "teddybear") == ["▁teddy", "bear"]
  assert _pieces(tokenizer, "zebra quokka, 42!") == [
      "▁z", "e", "b", "r", "a", "▁q", "u", "o", "k", "k", "a", ",", "▁4", "2", "!"]


def test_characters_outside_ascii_are_unk_and_do_not_crash(tokenizer):
  ids = tokenizer("a café ☕ cat").input_ids
  assert tokenizer.unk_token_id in ids
  assert ids[-1] == tokenizer.eos_token_id
  assert _pieces(tokenizer, "a café ☕ cat")[-1] == "▁cat"


def test_padding_to_a_fixed_length_with_the_mask(tokenizer):
  out = tokenizer(["a cat", "a photo of a red toy"], padding="max_length", max_length=12,
                  truncation=True, return_tensors="np")
  assert out.input_ids.shape == out.attention_mask.shape == (2, 12)
  lengths = out.attention_mask.sum(1)
  np.testing.assert_array_equal(lengths, [3, 7])  # the words and </s>
  for row, n in zip(out.input_ids, lengths):
    assert row[n - 1] == tokenizer.eos_token_id and (row[n:] == tokenizer.pad_token_id).all()
  long = tokenizer("cat " * 40, padding="max_length", max_length=12, truncation=True).input_ids
  assert len(long) == 12 and long[-1] == tokenizer.eos_token_id


def test_added_placeholder_token_is_one_id(tokenizer):
  assert len(_pieces(tokenizer, "<cat-toy>")) > 1  # spelled out before it is added
  n_before = len(tokenizer)
  ids = pseudo_words.add_placeholder_tokens(tokenizer, "<cat-toy>", 2)
  assert ids == [n_before, n_before + 1]
  assert tokenizer("<cat-toy>", add_special_tokens=False).input_ids == [ids[0]]
  prompt = pseudo_words.expand_placeholder(PROMPT, "<cat-toy>", 2)
  got = tokenizer(prompt).input_ids
  words = tokenizer.convert_tokens_to_ids([METASPACE + w for w in PROMPT.split()[:-1]])
  assert got == [*words, *ids, tokenizer.eos_token_id]
  pseudo_words.check_separable(tokenizer, {"<cat-toy>": ids})


def test_multi_piece_initializer_word_exposes_its_pieces(tokenizer):
  """T5 splits many initializer words; the tokenizer names the pieces, and ti_jax's existing
  rule (average them for one vector, cycle them over several) applies unchanged."""
  table = np.random.default_rng(0).standard_normal((len(tokenizer), 8)).astype(np.float32)
  init = pseudo_words.initializer_vectors(tokenizer, table, "teddybear", 1)
  ids = tokenizer("teddybear", add_special_tokens=False).input_ids
  assert tokenizer.convert_ids_to_tokens(ids) == ["▁teddy", "bear"]
  np.testing.assert_allclose(init.vectors, table[ids].mean(0, keepdims=True), rtol=1e-6)
  assert "2 tokens" in init.note and "'▁teddy', 'bear'" in init.note
  cycled = pseudo_words.initializer_vectors(tokenizer, table, "teddybear", 3)
  np.testing.assert_array_equal(cycled.vectors, table[[ids[0], ids[1], ids[0]]])
