"""A tiny, deterministic, T5-format SentencePiece Unigram tokenizer for the tiny Flux model.

FLUX.1 reads prompts with T5's tokenizer (``tokenizer_2/``: a SentencePiece
Unigram model of 32,000 pieces plus 100 sentinels, in a ``tokenizer.json``).
It cannot be downloaded in an offline test environment, so this module builds
a small Unigram vocabulary from ``tiny_tokenizer.CORPUS`` and writes the same
kind of folder with the ``tokenizers`` library, in T5's layout:

* ids 0, 1, 2: ``<pad>``, ``</s>``, ``<unk>`` (T5's pad, eos and unk);
* then the pieces, best score first: every corpus word with the metaspace
  ``▁`` that marks a word start (``▁painting``), the same words without it
  (so a compound such as ``teddybear`` is ``▁teddy`` + ``bear``), a few
  suffixes (``paintings`` is ``▁painting`` + ``s``), and every ASCII letter,
  digit and punctuation mark with and without ``▁``, so any ASCII word
  encodes into pieces; other characters are ``<unk>``.

Scores are log-probabilities: a word's from its corpus count, the
continuations, suffixes and characters below every word, so Viterbi picks a
known word whole and spells the rest from the largest pieces it can.
Tokenization follows T5: split on whitespace, ``▁`` prepended to every word,
case kept, ``</s>`` appended (no bos). There are no ``<extra_id_N>``
sentinels (span-corruption markers a prompt encoder never sees), so an added
placeholder takes the id right after the pieces.

The folder (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``) loads with ``transformers.T5TokenizerFast`` and
``AutoTokenizer`` without network access or ``sentencepiece``.
"""

from __future__ import annotations

import json
import math
import os
import re
import string

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram

from ti_jax.weights.tiny_tokenizer import CORPUS

__all__ = ["write_tiny_t5_tokenizer", "unigram_vocab", "PAD_TOKEN", "EOS_TOKEN", "UNK_TOKEN"]

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
METASPACE = "\u2581"  # "▁", SentencePiece's word-start marker
MODEL_MAX_LENGTH = 512  # T5's (FLUX.1-dev's max_sequence_length)
SUFFIXES = ("s", "es", "ed", "er", "ing", "ly")

# Scores below every word's log-probability (the rarest word of CORPUS is about -7.6).
_CONTINUATION_PENALTY = 3.0  # a word inside another: below the same word at a word start
_SUFFIX_SCORE = -9.0
_CHAR_SCORES = (-10.0, -11.0)  # with and without "▁"
_METASPACE_SCORE = -12.0


def unigram_vocab(corpus: str = CORPUS) -> list[tuple[str, float]]:
  """T5's special tokens, then `(piece, log-probability)` best first (ties by piece).

  Deterministic for a given corpus; see the module docstring for the pieces.
  """
  words = re.findall(r"[A-Za-z]+", corpus)
  counts: dict[str, int] = {}
  for w in words:
    counts[w] = counts.get(w, 0) + 1
  total = len(words)
  scores: dict[str, float] = {}

  def put(piece: str, score: float) -> None:
    scores[piece] = max(score, scores.get(piece, -math.inf))

  for w, n in counts.items():
    put(METASPACE + w, math.log(n / total))
    put(w, math.log(n / total) - _CONTINUATION_PENALTY)
  for s in SUFFIXES:
    put(s, _SUFFIX_SCORE)
  for c in string.ascii_letters + string.digits + string.punctuation:
    put(METASPACE + c, _CHAR_SCORES[0])
    put(c, _CHAR_SCORES[1])
  put(METASPACE, _METASPACE_SCORE)
  pieces = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
  return [(PAD_TOKEN, 0.0), (EOS_TOKEN, 0.0), (UNK_TOKEN, 0.0)] + pieces


def _tokenizer(vocab: list[tuple[str, float]]) -> Tokenizer:
  """The `tokenizers` Unigram tokenizer with T5's pre-tokenizer, decoder and `</s>` template."""
  tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)])
  tok.decoder = decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
  tok.post_processor = processors.TemplateProcessing(
      single=["$A", EOS_TOKEN], pair=["$A", EOS_TOKEN, "$B", EOS_TOKEN],
      special_tokens=[(EOS_TOKEN, 1)])
  tok.add_special_tokens([PAD_TOKEN, EOS_TOKEN, UNK_TOKEN])
  return tok


def write_tiny_t5_tokenizer(out_dir: str, corpus: str = CORPUS,
                            model_max_length: int = MODEL_MAX_LENGTH) -> int:
  """Write a small T5-format Unigram tokenizer folder and return its vocab size.

  Args:
    out_dir: Folder to write into (created if missing), e.g. the
      ``tokenizer_2/`` subfolder of a diffusers Flux model folder.
      Existing files of the same names are overwritten.
    corpus: the text whose words become whole pieces (default: the CLIP
      tiny tokenizer's ``CORPUS``, so both tokenizers know the same words).
    model_max_length: the length prompts are padded to by default.

  Returns:
    The number of ids, special tokens included: the tiny T5 encoder's
    ``vocab_size`` must be at least this.
  """
  vocab = unigram_vocab(corpus)
  assert len({p for p, _ in vocab}) == len(vocab), "duplicate piece"
  os.makedirs(out_dir, exist_ok=True)
  _tokenizer(vocab).save(os.path.join(out_dir, "tokenizer.json"))
  special = {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN}
  config = {
      "tokenizer_class": "T5Tokenizer",
      "model_max_length": model_max_length,
      # No sentinels: without this, transformers would add 100 <extra_id_N> tokens.
      "extra_ids": 0,
      "additional_special_tokens": [],
      **special,
  }
  for name, obj in (("special_tokens_map.json", special), ("tokenizer_config.json", config)):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as f:
      f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
  return len(vocab)
