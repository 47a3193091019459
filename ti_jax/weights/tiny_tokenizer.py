"""A tiny, deterministic, CLIP-format BPE tokenizer for the tiny models and offline tests.

Stable Diffusion model folders keep their text tokenizer in a ``tokenizer/``
subfolder holding OpenAI CLIP's byte-level BPE files (``vocab.json`` and
``merges.txt``) plus two small JSON configs.  The real CLIP vocabulary has
49,408 entries and cannot be downloaded in an offline test environment, so
this module learns a small vocabulary from a built-in English corpus and
writes the same four files, in the same format and with the same vocabulary
layout as CLIP:

* ids ``0..255``: the 256 byte symbols of GPT-2's ``bytes_to_unicode`` table,
  in that table's order;
* ids ``256..511``: the same symbols followed by the end-of-word marker
  ``</w>``;
* one id per learned merge (the two halves concatenated), in merge order;
* ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids.

The resulting folder loads with ``transformers.CLIPTokenizer.from_pretrained``
(and ``AutoTokenizer``) without network access, tokenizes with CLIP's rules
(lower-casing, CLIP's pre-tokenizer split, byte-level symbols, ``</w>``),
and uses ``<|startoftext|>`` as bos and ``<|endoftext|>`` as eos, pad and unk
like the Stable Diffusion 1.x tokenizers.  The corpus is chosen so that the
words used by textual-inversion prompt templates and typical initializer
words (``painting``, ``sculpture``, ``cat``, ``dog``, ``toy``, ``style`` ...)
are single tokens, which the textual-inversion training code relies on.

Only the standard library is needed (no torch, no transformers).
"""

from __future__ import annotations

import collections
import json
import os
import re

__all__ = ["write_tiny_clip_tokenizer", "write_tiny_bert_tokenizer", "bytes_to_unicode", "CORPUS"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# The object and style prompt templates of the textual-inversion paper,
# written here as plain phrases (the placeholder left out) so that every word
# a training prompt uses is in the corpus, plus original sentences that make
# the common initializer / subject words frequent enough to be learned as
# whole tokens.  Repetition is deliberate: BPE merges the most frequent pairs
# first, so the words we need as single tokens must be the frequent ones.
CORPUS: str = """
a photo of a. a rendering of a. a cropped photo of the. the photo of a.
a photo of a clean. a photo of a dirty. a dark photo of the. a photo of my.
a photo of the cool. a close-up photo of a. a bright photo of the.
a cropped photo of a. a photo of the. a good photo of the. a photo of one.
a close-up photo of the. a rendition of the. a photo of the clean.
a rendition of a. a photo of a nice. a good photo of a. a photo of the nice.
a photo of the small. a photo of the weird. a photo of the large.
a photo of a cool. a photo of a small.
a painting in the style of. a rendering in the style of.
a cropped painting in the style of. the painting in the style of.
a clean painting in the style of. a dirty painting in the style of.
a dark painting in the style of. a picture in the style of.
a cool painting in the style of. a close-up painting in the style of.
a bright painting in the style of. a good painting in the style of.
a rendition in the style of. a nice painting in the style of.
a small painting in the style of. a weird painting in the style of.
a large painting in the style of.
a cat sits on a red chair. the dog plays with a blue toy. a toy cat and a toy dog.
a painting of a cat. a painting of a dog. a painting of a toy.
a sculpture of a cat. a sculpture of a dog. a sculpture of a fox.
the sculpture is a statue. a statue of a fox in the garden.
a cartoon of a cat. a cartoon of a dog. a watercolor painting of a fox.
a portrait of a dog. a portrait of a cat in the style of a painting.
an oil painting in the style of a sculpture. a drawing in the style of a cartoon.
a sketch of a toy. a toy robot and a toy car on a wooden table.
the cat and the dog and the fox are friends. my cat likes my dog.
a green tree. a yellow flower. a white house. a black bird. an orange cup.
the sun is bright. the night is dark. the sky is blue. the apple is red.
a painting with a style. a sculpture with a style. a toy with a style.
style, painting, sculpture, cat, dog, toy, fox, statue, cartoon, watercolor.
portrait, photo, picture, drawing, sketch, art, artwork, object, figure.
a teddy bear. a plush toy. a ceramic mug. a metal robot. a clay pot.
an abstract painting. a landscape painting. a still life painting.
the style of the artist. in the style of van gogh. in the style of monet.
a high quality photo. a detailed painting. a colorful cartoon.
a small cat. a large dog. a cute toy. a happy dog. a sleepy cat.
red, blue, green, yellow, black, white, orange, purple, brown, pink.
one, two, three cats. 1 2 3 4 5 6 7 8 9 0.
a photograph of a mountain lake at sunset, with soft light and long shadows.
a digital illustration of a castle on a hill under a cloudy winter sky.
an old man reading a book by the window while it rains outside.
a young woman walking through a busy city street at night.
a bowl of fruit on a kitchen counter next to a glass of water.
a wooden boat floating on a calm river surrounded by green forest.
a futuristic spaceship flying over a desert planet with two moons.
a children's book illustration of a rabbit wearing a tiny hat.
a macro shot of a butterfly resting on a purple flower petal.
a marble bust in a museum, lit from above, highly detailed, trending.
a pencil sketch of a horse running across an open field.
a vintage poster of a train station, printed in faded colors.
an ink drawing of a dragon coiled around an ancient tower.
a bronze figure of a dancer, photographed against a plain background.
"""


def bytes_to_unicode() -> dict[int, str]:
  """Return GPT-2 / CLIP's reversible byte -> printable-unicode table.

  BPE works on strings, so every byte must map to a visible character that
  is not whitespace or a control character (those would be split or
  normalized away).  Printable Latin-1 bytes map to themselves; the other 68
  bytes are shifted to code points 256 and up.  The dict's insertion order
  (printable bytes first, then the shifted ones) is the order CLIP uses for
  the first 256 vocabulary ids, so callers rely on it.
  """
  bs = (
      list(range(ord("!"), ord("~") + 1))
      + list(range(ord("¡"), ord("¬") + 1))
      + list(range(ord("®"), ord("ÿ") + 1))
  )
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


# CLIP's pre-tokenizer pattern with \p{L} / \p{N} replaced by ASCII classes:
# the corpus is ASCII-only (checked below), so this splits it exactly as
# CLIP's regex would, without depending on the third-party ``regex`` module.
_PRETOKENIZE = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+"""
)


def _word_counts(corpus: str) -> dict[tuple[str, ...], int]:
  """Split ``corpus`` like CLIP and return symbol tuples with their counts.

  Each word becomes its byte symbols with ``</w>`` glued to the last one,
  which is how CLIP's ``bpe()`` starts every word.
  """
  if not corpus.isascii():
    raise ValueError("the tokenizer corpus must be ASCII (see _PRETOKENIZE)")
  byte_encoder = bytes_to_unicode()
  counts: collections.Counter[tuple[str, ...]] = collections.Counter()
  text = " ".join(corpus.split()).lower()  # CLIP: whitespace_clean + lower
  for word in _PRETOKENIZE.findall(text):
    symbols = [byte_encoder[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    counts[tuple(symbols)] += 1
  return dict(counts)


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
  """Replace every non-overlapping occurrence of ``pair`` in ``word``."""
  first, second = pair
  out: list[str] = []
  i = 0
  while i < len(word):
    if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
      out.append(first + second)
      i += 2
    else:
      out.append(word[i])
      i += 1
  return tuple(out)


def _learn_merges(corpus: str, num_merges: int, taken: set[str]) -> list[tuple[str, str]]:
  """Learn up to ``num_merges`` BPE merges from ``corpus``, deterministically.

  Classic greedy BPE: repeatedly merge the most frequent adjacent pair.
  Ties are broken by the smallest ``(first, second)`` string pair, so the
  result never depends on dict/set iteration order.  A pair whose
  concatenation is already a token (``taken``, grown as merges are made) is
  skipped: CLIP's layout gives every merge its own vocab id, and a duplicate
  string would collapse two ids into one in ``vocab.json``.  Stops early if
  every word has become a single symbol.
  """
  words = _word_counts(corpus)
  taken = set(taken)
  merges: list[tuple[str, str]] = []
  while len(merges) < num_merges:
    pair_counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:]):
        pair_counts[pair] += count
    candidates = [(-c, p) for p, c in pair_counts.items() if p[0] + p[1] not in taken]
    if not candidates:
      break
    best = min(candidates)[1]  # highest count, then smallest pair
    merges.append(best)
    taken.add(best[0] + best[1])
    words = {_merge_word(w, best): c for w, c in words.items()}
  return merges


def write_tiny_clip_tokenizer(out_dir: str, num_merges: int = 400, corpus: str = CORPUS,
                              model_max_length: int = MODEL_MAX_LENGTH) -> int:
  """Write a small CLIP-format BPE tokenizer folder and return its vocab size.

  Args:
    out_dir: Folder to write into (created if missing), e.g. the
      ``tokenizer/`` subfolder of a diffusers Stable Diffusion model
      folder.  Existing files of the same names are overwritten.
    num_merges: Maximum number of BPE merges to learn from the built-in
      corpus.  Fewer are learned if the corpus runs out of pairs.  The
      default gives a ~900-entry vocab in which the textual-inversion
      template words and common initializer words are single tokens.
    corpus: ASCII text to learn the merges from (default: the built-in
      ``CORPUS``); a caller with its own vocabulary (``ti_jax.world``) passes
      ``CORPUS`` plus its own sentences.
    model_max_length: the prompt length every prompt is padded to (the text
      encoder's ``max_position_embeddings``).

  Returns:
    The vocabulary size: ``512 + number_of_merges + 2``.

  Writes ``vocab.json``, ``merges.txt`` (first line ``#version: 0.2``),
  ``special_tokens_map.json`` and ``tokenizer_config.json``.  The output is
  byte-for-byte deterministic for a given ``num_merges`` and ``corpus``.
  """
  if num_merges < 0:
    raise ValueError(f"num_merges must be >= 0, got {num_merges}")

  byte_symbols = list(bytes_to_unicode().values())
  base = byte_symbols + [s + END_OF_WORD for s in byte_symbols]
  merges = _learn_merges(corpus, num_merges, taken=set(base))
  tokens = base + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  assert len(vocab) == len(tokens), "duplicate vocab entry"

  os.makedirs(out_dir, exist_ok=True)

  def write(name: str, text: str) -> None:
      # Explicit encoding and "\n" newlines so files are identical on every
      # platform (byte-identical outputs are part of the contract).
    with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as f:
      f.write(text)

  # ensure_ascii=False keeps the byte symbols readable, as in CLIP's file.
  write("vocab.json", json.dumps(vocab, ensure_ascii=False, indent=2) + "\n")
  write("merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

  # Same special-token roles as Stable Diffusion 1.x's tokenizer folder:
  # eos doubles as pad and unk (CLIP has no dedicated pad/unk token).
  special = {
      "bos_token": BOS_TOKEN,
      "eos_token": EOS_TOKEN,
      "pad_token": EOS_TOKEN,
      "unk_token": EOS_TOKEN,
  }
  config = {
      # Without tokenizer_class, AutoTokenizer cannot tell which class to
      # build (there is no config.json next to a diffusers tokenizer folder).
      "tokenizer_class": "CLIPTokenizer",
      # Without model_max_length the tokenizer reports a huge sentinel and
      # padding="max_length" with max_length=model_max_length breaks.
      "model_max_length": model_max_length,
      "do_lower_case": True,
      "add_prefix_space": False,
      "errors": "replace",
      **special,
  }
  write("special_tokens_map.json", json.dumps(special, indent=2, sort_keys=True) + "\n")
  write("tokenizer_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
  return len(vocab)


BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_tiny_bert_tokenizer(out_dir: str) -> int:
  """Write a small uncased BERT WordPiece tokenizer folder; return its vocab size.

  The paper's LDM-1.4B reads prompts with a BERT tokenizer (bert-base-uncased's
  30,522 WordPieces). This writes the same kind of folder (``vocab.txt`` with
  ``[PAD]`` as id 0, as LDMBert's ``pad_token_id`` expects, plus
  ``tokenizer_config.json``) whose vocabulary is every whole word of
  ``CORPUS`` and single characters with their ``##`` continuations, so any
  lower-case ASCII text tokenizes and the template words are one token each.
  It loads with ``transformers.BertTokenizer.from_pretrained``.
  """
  words = sorted(set(re.findall(r"[a-z]+|[0-9]", CORPUS.lower())))
  chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789"))
  punctuation = list(".,'-!?:;()<>_*\"/&")
  tokens = list(BERT_SPECIAL_TOKENS) + punctuation
  tokens += [c for c in chars if c not in words] + words + ["##" + c for c in chars]
  assert len(set(tokens)) == len(tokens), "duplicate vocab entry"
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8", newline="\n") as f:
    f.write("".join(t + "\n" for t in tokens))
  config = {
      "tokenizer_class": "BertTokenizer",
      "do_lower_case": True,
      "model_max_length": MODEL_MAX_LENGTH,
      "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
      "sep_token": "[SEP]", "mask_token": "[MASK]",
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8",
            newline="\n") as f:
    f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
  return len(tokens)
