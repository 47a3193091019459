"""Pseudo-word tokens: adding them to the tokenizer, initialising and splicing their vectors."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from ti_jax import errors


class EmbeddingError(errors.UserError):
  """Bad placeholder or initializer token; the message is one line."""


def placeholder_tokens(placeholder_token: str, num_vectors: int) -> list[str]:
  """`tok` and, for more vectors, `tok_1`, `tok_2`, ... (diffusers' multi-vector naming)."""
  if num_vectors < 1:
    raise EmbeddingError(f"num_vectors must be >= 1, got {num_vectors}")
  return [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]


def add_placeholder_tokens(tokenizer, placeholder_token: str, num_vectors: int) -> list[int]:
  """Adds the placeholder tokens to `tokenizer` (in place); returns their ids.

  Raises:
    EmbeddingError: if a token is empty, contains whitespace, or already exists
      in the vocabulary (training would silently overwrite a real word).
  """
  if not placeholder_token or any(c.isspace() for c in placeholder_token):
    raise EmbeddingError(f"placeholder_token {placeholder_token!r} must be one word without spaces")
  return add_new_tokens(tokenizer, placeholder_tokens(placeholder_token, num_vectors))


def _normalized(tokenizer, text: str) -> str:
  """`text` as the tokenizer's normalizer sees it (lower-cased for CLIP and uncased BERT)."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  normalizer = getattr(backend, "normalizer", None)
  if normalizer is not None:
    return normalizer.normalize_str(text)
  return text.lower() if getattr(tokenizer, "do_lower_case", False) else text


def per_image_tokens(placeholder_token: str, num_images: int) -> list[str]:
  """`tok_image0`, `tok_image1`, ...: one extra pseudo-word per training image (paper ablation)."""
  return [f"{placeholder_token}_image{i}" for i in range(num_images)]


def add_new_tokens(tokenizer, tokens: list[str]) -> list[int]:
  """Adds `tokens` to `tokenizer` (in place), refusing any that already exist; returns their ids."""
  vocab = tokenizer.get_vocab()
  for tok in tokens:
    # Tokenizers lower-case their input: "Toy" would take over the word "toy".
    norm = _normalized(tokenizer, tok)
    if any(t in vocab for t in (tok, f"{tok}</w>", norm, f"{norm}</w>")):
      raise EmbeddingError(
          f"placeholder token {tok!r} is already in the tokenizer's vocabulary; pick a new "
          "string such as '<my-concept>'")
  added = tokenizer.add_tokens(tokens)
  if added != len(tokens):
    raise EmbeddingError(f"tokenizer added {added} of the {len(tokens)} placeholder tokens")
  ids = tokenizer.convert_tokens_to_ids(tokens)
  return [int(i) for i in ids]


def lowercases(tokenizer) -> bool:
  """Whether the tokenizer's normalizer lower-cases (CLIP, uncased BERT): tokens match any case."""
  return _normalized(tokenizer, "A") == "a"


def _token_matches(text: str, counts: dict[str, int], ignore_case: bool):
  """Occurrences of the pseudo-words' token strings in `text`, as the tokenizer splits them.

  Tokenizers split added tokens out of a text leftmost-longest: at the first
  position where any added token starts, the longest one wins. So `<mystyle>`
  is one token even when `mystyle` is also added, and only whole tokens match.
  Yields (match, owner token, vector index) for every `tok`, `tok_1`, ... of
  `counts` (token -> number of vectors).
  """
  fold = (lambda x: x.lower()) if ignore_case else (lambda x: x)
  owners = {}
  for tok, n in counts.items():
    for i, name in enumerate(placeholder_tokens(tok, n)):
      owners[fold(name)] = (tok, i)
  if not owners:
    return
  # Python tries alternatives in order: longest first gives leftmost-longest.
  pattern = re.compile("|".join(re.escape(n) for n in sorted(owners, key=len, reverse=True)),
                       re.IGNORECASE if ignore_case else 0)
  for m in pattern.finditer(text):
    tok, i = owners[fold(m.group(0))]
    yield m, tok, i


def used_tokens(text: str, counts: dict[str, int], ignore_case: bool = False) -> set[str]:
  """The pseudo-words of `counts` that `text` uses as whole tokens (any of their vectors)."""
  return {tok for _, tok, _ in _token_matches(text, counts, ignore_case)}


def expand_placeholders(text: str, counts: dict[str, int], ignore_case: bool = False) -> str:
  """Replaces each whole multi-vector token `tok` with `tok tok_1 ... tok_{n-1}`.

  `counts` maps every loaded token to its number of vectors; all of them take
  part in the matching, so a token inside a longer one (`mystyle` in
  `<mystyle>`) is left alone, as the tokenizer leaves it. A token whose extra
  vectors the prompt already names (`tok_1`) is not expanded again.
  """
  matches = list(_token_matches(text, counts, ignore_case))
  spelled_out = {tok for _, tok, i in matches if i > 0}
  out, pos = [], 0
  for m, tok, i in matches:
    if i == 0 and counts[tok] > 1 and tok not in spelled_out:
      out += [text[pos:m.start()], " ".join(placeholder_tokens(tok, counts[tok]))]
      pos = m.end()
  return "".join(out) + text[pos:]


def expand_placeholder(text: str, placeholder_token: str, num_vectors: int) -> str:
  """Replaces the whole token `tok` with `tok tok_1 ... tok_{n-1}` so a prompt uses every vector."""
  return expand_placeholders(text, {placeholder_token: num_vectors})


def check_separable(tokenizer, token_ids: dict[str, list[int]]) -> None:
  """Refuses pseudo-words the tokenizer cannot tell apart (after all were added).

  Each token, and the expansion of a multi-vector one, must tokenize to
  exactly its own ids; otherwise a prompt would silently use another
  token's vectors (e.g. one token inside another that the tokenizer splits).
  """
  for tok, ids in token_ids.items():
    text = " ".join(placeholder_tokens(tok, len(ids)))
    got = list(tokenizer(text, add_special_tokens=False).input_ids)
    if got == list(ids):
      continue
    pieces = tokenizer.convert_ids_to_tokens(got)
    inside = [o for o in token_ids if o != tok and o.lower() in tok.lower()]
    why = f" (it contains {inside[0]!r})" if inside else ""
    raise EmbeddingError(f"token {tok!r}{why} is split by the tokenizer into {pieces}, not into "
                         "its own token(s), so prompts could not use its vectors; give it "
                         "another name with PATH:NEW_TOKEN")


@dataclasses.dataclass(frozen=True)
class Initializer:
  """Initial vectors `[num_vectors, D]` and a one-line description of how they were made."""
  vectors: np.ndarray
  note: str


def initializer_vectors(tokenizer, token_table: np.ndarray, initializer_token: str,
                        num_vectors: int) -> Initializer:
  """Initial values of the learned vectors from the embedding(s) of `initializer_token`.

  A single-token initializer is copied to every vector. A multi-token one
  (e.g. "teddy bear") is averaged for one vector and cycled over several.
  """
  ids = tokenizer(initializer_token, add_special_tokens=False).input_ids
  if not ids:
    raise EmbeddingError(f"initializer_token {initializer_token!r} tokenizes to nothing")
  pieces = tokenizer.convert_ids_to_tokens(ids)
  table = np.asarray(token_table, np.float32)  # [V, D]
  if len(ids) == 1:
    vectors = np.repeat(table[ids], num_vectors, axis=0)
    note = f"initialised {num_vectors} vector(s) from {initializer_token!r} (token id {ids[0]})"
  elif num_vectors == 1:
    vectors = table[ids].mean(axis=0, keepdims=True)
    note = (f"initializer {initializer_token!r} is {len(ids)} tokens {pieces}; "
            "initialised the vector from their average")
  else:
    vectors = table[[ids[i % len(ids)] for i in range(num_vectors)]]
    note = (f"initializer {initializer_token!r} is {len(ids)} tokens {pieces}; "
            f"cycled them over the {num_vectors} vectors")
  return Initializer(vectors.astype(np.float32), note)


def token_table(text_encoder, params):
  """The token table `[V, D]` inside a text encoder's params (CLIP or LDMBert).

  Each text-encoder module names where its table lives (`TOKEN_TABLE_PATH`),
  so training and sampling splice vectors the same way for every model.
  """
  for name in text_encoder.TOKEN_TABLE_PATH:
    params = params[name]
  return params


def embed_tokens(token_table: jax.Array, learned: jax.Array, placeholder_ids: jax.Array,
                 input_ids: jax.Array) -> jax.Array:
  """Token embeddings with the learned vectors spliced in at placeholder positions.

  Args:
    token_table: the frozen table `[V, D]` (placeholder ids may be >= V).
    learned: the trainable vectors `[n, D]`.
    placeholder_ids: `[n]` ids of the placeholder tokens, in vector order.
    input_ids: `[B, T]`.

  Returns:
    `[B, T, D]` in the table's dtype. Only the gather from `learned` depends on
    it, so its gradient costs `B*T*D`, never a `[V, D]` table.
  """
  base = jnp.take(token_table, jnp.clip(input_ids, 0, token_table.shape[0] - 1), axis=0)
  match = input_ids[..., None] == placeholder_ids  # [B, T, n]
  slot = jnp.argmax(match, axis=-1)  # [B, T]
  spliced = jnp.take(learned, slot, axis=0).astype(base.dtype)  # [B, T, D]
  return jnp.where(match.any(-1)[..., None], spliced, base)


def merged_token_table(token_table: np.ndarray, learned: np.ndarray,
                       placeholder_ids) -> np.ndarray:
  """The full token table a diffusers user gets: the original rows plus the learned ones.

  Rows at placeholder ids beyond the table are appended (ids must be contiguous).
  """
  table = np.asarray(token_table, np.float32)
  ids = [int(i) for i in placeholder_ids]
  size = max(table.shape[0], max(ids) + 1)
  merged = np.zeros((size, table.shape[1]), np.float32)
  merged[: table.shape[0]] = table
  merged[ids] = np.asarray(learned, np.float32)
  return merged
