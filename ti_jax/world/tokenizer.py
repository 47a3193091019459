"""The world's CLIP-format BPE tokenizer: every caption word is one token.

Written with `ti_jax.weights.tiny_tokenizer`'s writer (the same files and
vocabulary layout as OpenAI CLIP's tokenizer), learned from that module's
corpus (the textual-inversion templates and common initializer words) plus
captions of the world, so the template words stay single tokens too.
"""

from __future__ import annotations

from ti_jax.weights import tiny_tokenizer
from ti_jax.world import scenes

NUM_MERGES = 700  # enough for every world and template word to be merged whole
_CORPUS_SEED = 12345  # the captions the merges are learned from (not the training world's)
_CORPUS_CAPTIONS = 400
# Prompt length (tokens, with start and end): the longest caption is 16 tokens and the
# textual-inversion templates fewer; Stable Diffusion's 77 would triple the text
# encoder's and the cross-attention's work for padding.
MAX_LENGTH = 24


def corpus() -> str:
  """The tokenizer corpus: the tiny tokenizer's, world captions, and the world's words."""
  captions = [scenes.caption(_CORPUS_SEED, i) for i in range(_CORPUS_CAPTIONS)]
  # The vocabulary listed as well, so rare words (e.g. "drawing") are frequent enough.
  words = " ".join(scenes.vocabulary())
  return "\n".join([tiny_tokenizer.CORPUS, ". ".join(captions) + ".", words, words, words])


def write_world_tokenizer(out_dir: str) -> int:
  """Writes the world's tokenizer folder (vocab.json, merges.txt, configs); returns its vocab size."""
  return tiny_tokenizer.write_tiny_clip_tokenizer(out_dir, NUM_MERGES, corpus=corpus(),
                                                  model_max_length=MAX_LENGTH)
