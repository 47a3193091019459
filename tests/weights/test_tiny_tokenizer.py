"""Tests for ti_jax.weights.tiny_tokenizer: a small CLIP-format BPE tokenizer folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from ti_jax.weights.tiny_tokenizer import bytes_to_unicode, write_tiny_clip_tokenizer

transformers = pytest.importorskip("transformers")

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")
PROMPT = "a painting in the style of <cat-toy>"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
  out = tmp_path_factory.mktemp("tokenizer")
  return out, write_tiny_clip_tokenizer(str(out))


@pytest.fixture()
def tokenizer(tok_dir: tuple[Path, int]):
    # Function-scoped: some tests add tokens, which mutates the tokenizer.
  return transformers.CLIPTokenizer.from_pretrained(str(tok_dir[0]))


def _vocab(path: Path) -> dict[str, int]:
  return json.loads((path / "vocab.json").read_text(encoding="utf-8"))


def _merges(path: Path) -> list[tuple[str, str]]:
  lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
  return [tuple(line.split(" ")) for line in lines[1:]]


def _reference_clip_encode(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
  """OpenAI CLIP's SimpleTokenizer.encode algorithm, for ASCII text.

  CLIP's regex uses \\p{L}/\\p{N}; for ASCII input these are [a-z]/[0-9]
  after lower-casing, so the stdlib ``re`` suffices.
  """
  pat = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")
  ranks = {pair: i for i, pair in enumerate(merges)}
  byte_encoder = bytes_to_unicode()

  def bpe(token: str) -> list[str]:
    word = list(token[:-1]) + [token[-1] + "</w>"]
    while len(word) > 1:
      pairs = set(zip(word, word[1:]))
      best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
      if best not in ranks:
        break
      new, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          new.append(word[i] + word[i + 1])
          i += 2
        else:
          new.append(word[i])
          i += 1
      word = new
    return word

  ids = []
  for token in pat.findall(" ".join(text.split()).lower()):
    token = "".join(byte_encoder[b] for b in token.encode("utf-8"))
    ids.extend(vocab[t] for t in bpe(token))
  return ids


def test_writes_the_four_clip_tokenizer_files(tok_dir):
  path, _ = tok_dir
  for name in FILES:
    assert (path / name).is_file(), name
  assert (path / "merges.txt").read_text(encoding="utf-8").splitlines()[0] == "#version: 0.2"
  config = json.loads((path / "tokenizer_config.json").read_text())
  assert config["tokenizer_class"] == "CLIPTokenizer"
  assert config["model_max_length"] == 77


def test_loads_with_clip_tokenizer_and_auto_tokenizer(tok_dir):
  path, vocab_size = tok_dir
  for cls in (transformers.CLIPTokenizer, transformers.AutoTokenizer):
    tok = cls.from_pretrained(str(path), local_files_only=True)
    assert isinstance(tok, transformers.CLIPTokenizer)
    assert tok.model_max_length == 77
    assert len(tok) == vocab_size
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, EOS)


def test_default_vocab_size_is_under_1000(tok_dir):
  _, vocab_size = tok_dir
  assert vocab_size == 512 + 400 + 2


def test_vocab_order_matches_clip_layout(tok_dir):
  path, vocab_size = tok_dir
  vocab = _vocab(path)
  merges = _merges(path)
  by_id = sorted(vocab, key=vocab.__getitem__)
  assert [vocab[t] for t in by_id] == list(range(vocab_size))  # contiguous ids
  symbols = list(bytes_to_unicode().values())
  assert by_id[:256] == symbols
  assert by_id[256:512] == [s + "</w>" for s in symbols]
  assert by_id[512:-2] == [a + b for a, b in merges]
  assert by_id[-2:] == [BOS, EOS]
  assert by_id[0] == "!"  # CLIP's id 0


def test_bytes_to_unicode_is_gpt2_table():
  table = bytes_to_unicode()
  assert len(table) == 256 and len(set(table.values())) == 256
  assert sorted(table) == list(range(256))
  assert table[ord("a")] == "a" and table[ord(" ")] == "\u0120"  # "Ġ"
  assert table[0] == "\u0100" and table[ord("\n")] == "\u010a"
  assert not any(c.isspace() for c in table.values())


def test_write_is_deterministic(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  assert write_tiny_clip_tokenizer(str(a)) == write_tiny_clip_tokenizer(str(b))
  for name in FILES:
    assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_num_merges_sets_vocab_size(tmp_path):
  assert write_tiny_clip_tokenizer(str(tmp_path / "m0"), num_merges=0) == 514
  assert write_tiny_clip_tokenizer(str(tmp_path / "m50"), num_merges=50) == 564
  with pytest.raises(ValueError):
    write_tiny_clip_tokenizer(str(tmp_path / "bad"), num_merges=-1)


def test_fewer_merges_are_a_prefix_of_more(tmp_path, tok_dir):
  write_tiny_clip_tokenizer(str(tmp_path), num_merges=50)
  assert _merges(tmp_path) == _merges(tok_dir[0])[:50]


@pytest.mark.parametrize(
    "word",
    ["painting", "sculpture", "cat", "toy", "dog", "style", "fox", "statue", "cartoon",
     "watercolor", "portrait", "red", "blue", "photo", "rendering", "rendition", "cropped",
     "picture", "clean", "dirty", "dark", "bright", "good", "cool", "nice", "small",
     "large", "weird", "the", "of", "in", "a", "my", "one"],
)
def test_template_and_initializer_words_are_single_tokens(tokenizer, word):
  ids = tokenizer(word, add_special_tokens=False).input_ids
  assert len(ids) == 1
  assert tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"]


def test_encoding_matches_reference_clip_bpe(tok_dir, tokenizer):
  path, _ = tok_dir
  vocab, merges = _vocab(path), _merges(path)
  texts = [
      PROMPT,
      "A Close-Up  Photo of the CAT's toy, 42 dogs!!",
      "an impressionist painting of a mountain lake\nat sunset",
      "zebra quokka xylophone 2024 -- we're done; it'll be ok?",
  ]
  for text in texts:
    got = tokenizer(text, add_special_tokens=False).input_ids
    assert got == _reference_clip_encode(text, vocab, merges), text


def test_prompt_encodes_to_77_ids_with_bos_eos_pad(tokenizer):
  ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
  body = tokenizer(PROMPT, add_special_tokens=False).input_ids
  assert len(ids) == 77
  assert tokenizer.pad_token_id == tokenizer.eos_token_id
  assert ids[0] == tokenizer.bos_token_id
  assert ids[1 : 1 + len(body)] == body
  assert ids[1 + len(body) :] == [tokenizer.eos_token_id] * (76 - len(body))


def test_long_prompt_truncates_to_77_and_keeps_eos(tokenizer):
  ids = tokenizer("cat " * 200, padding="max_length", max_length=77, truncation=True).input_ids
  assert len(ids) == 77
  assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_added_placeholder_token_is_single_id(tokenizer):
    # Before adding, CLIP's pre-tokenizer splits it into "<", "cat", "-", "toy", ">".
  assert len(tokenizer(PROMPT, add_special_tokens=False).input_ids) == 11
  n_before = len(tokenizer)
  assert tokenizer.add_tokens(["<cat-toy>"]) == 1
  placeholder_id = tokenizer.convert_tokens_to_ids("<cat-toy>")
  assert placeholder_id == n_before  # appended after <|endoftext|>
  assert len(tokenizer) == n_before + 1
  assert tokenizer("<cat-toy>", add_special_tokens=False).input_ids == [placeholder_id]
  ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
  words = tokenizer.convert_tokens_to_ids([w + "</w>" for w in PROMPT.split()[:-1]])
  expected = [tokenizer.bos_token_id, *words, placeholder_id, tokenizer.eos_token_id]
  assert ids[: len(expected)] == expected
  assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT


def test_diffusers_style_call_returns_numpy_batch(tokenizer):
    # The exact call diffusers' StableDiffusionPipeline makes.
  out = tokenizer(
      [PROMPT, "a photo of a dog"],
      padding="max_length",
      max_length=tokenizer.model_max_length,
      truncation=True,
      return_tensors="np",
  )
  assert isinstance(out.input_ids, np.ndarray)
  assert out.input_ids.shape == (2, 77)
  assert np.issubdtype(out.input_ids.dtype, np.integer)
  assert (out.input_ids[:, 0] == tokenizer.bos_token_id).all()
  assert out.input_ids.max() < len(tokenizer)


def test_writer_does_not_import_torch_or_transformers(tmp_path):
    # Load the module file directly so the check covers this module's own
    # imports, not whatever the ti_jax package __init__ may pull in.
  module_path = Path(REPO) / "ti_jax" / "weights" / "tiny_tokenizer.py"
  code = (
      "import importlib.util, sys\n"
      f"spec = importlib.util.spec_from_file_location('tiny_tokenizer', {str(module_path)!r})\n"
      "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
      f"mod.write_tiny_clip_tokenizer({str(tmp_path)!r})\n"
      "bad = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]\n"
      "assert not bad, bad\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
  assert (tmp_path / "vocab.json").is_file()
