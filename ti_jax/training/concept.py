"""The concept: the placeholder's tokens and where its vectors start, per text encoder.

`trainer.run` (through `inputs.build`) ...
"""

from __future__ import annotations

import numpy as np

from ti_jax import errors
from ti_jax.embeddings import embedding_io, pseudo_words
from ti_jax.runtime import console, run_dir
from ti_jax.training.config import ConfigError

_log = console.log


def second_table(sd) -> np.ndarray | None:
  """SDXL's second text encoder's token table `[V2, D2]` (float32), None for other models."""
  if not sd.is_sdxl:
    return None
  return np.asarray(pseudo_words.token_table(sd.text_encoder_2, sd.text_encoder_2_params),
                    np.float32)


def initial_vectors(config, tokenizer, table: np.ndarray) -> pseudo_words.Initializer:
  """Where the vectors start: config.init_embedding, else the initializer token's embedding."""
  if config.init_embedding:
    init = _init_from_embedding(config.init_embedding, config.num_vectors, table.shape[1])
  else:
    init = pseudo_words.initializer_vectors(tokenizer, table, config.initializer_token,
                                            config.num_vectors)
  _check_finite(config, init)
  _log(init.note)
  return init


def _check_finite(config, init: pseudo_words.Initializer) -> None:
  if not np.all(np.isfinite(init.vectors)):
    raise ConfigError("the initial vectors are not finite (NaN or inf): "
                      + (f"config.init_embedding {config.init_embedding} holds such values"
                         if config.init_embedding else "the model's token table holds them"))


def initial_vector_pair(config, sd, table: np.ndarray, table_2: np.ndarray | None
                        ) -> tuple[pseudo_words.Initializer, pseudo_words.Initializer | None]:
  """Where the vectors start, for each text encoder: (first, second or None without SDXL).

  SDXL: config.init_embedding must be an SDXL embedding (both encoders' vectors; another
  family's is refused in one line), else each encoder starts from the initializer word
  in its own tokenizer and token table.
  """
  if table_2 is None:
    return initial_vectors(config, sd.tokenizer, table), None
  if config.init_embedding:
    concept = _init_concept(config.init_embedding, (table.shape[1], table_2.shape[1]))
    n = config.num_vectors
    if concept.vectors.shape[0] != n:
      raise ConfigError(f"config.init_embedding: {config.init_embedding} has "
                        f"{concept.vectors.shape[0]} vector(s), this run needs {n} (num_vectors)")
    note = f"initialised {n} vector(s) per text encoder from {config.init_embedding}"
    pair = (pseudo_words.Initializer(np.asarray(concept.vectors, np.float32), note),
            pseudo_words.Initializer(np.asarray(concept.vectors_2, np.float32), note))
  else:
    pair = tuple(pseudo_words.initializer_vectors(tok, t, config.initializer_token,
                                                  config.num_vectors)
                 for tok, t in ((sd.tokenizer, table), (sd.tokenizer_2, table_2)))
  for init in pair:
    _check_finite(config, init)
  _log(pair[0].note + (" (first text encoder)" if not config.init_embedding else ""))
  if not config.init_embedding:
    _log(pair[1].note + " (second text encoder)")
  return pair


def _load_init_concept(spec: str) -> embedding_io.Concept:
  """The one concept of an existing embedding (run dir or file, `PATH[:TOKEN]`); one-line
  errors for an unreadable source or one holding several tokens."""
  try:
    concepts = embedding_io.load_concepts(spec)
  except (embedding_io.EmbeddingFileError, run_dir.WorkdirError) as e:
    raise ConfigError(f"config.init_embedding: {e}") from None
  if len(concepts) != 1:  # PATH:TOKEN picks one of them (embedding_io.load_concepts)
    raise ConfigError(f"config.init_embedding: {spec} holds {len(concepts)} tokens "
                      f"({', '.join(c.token for c in concepts)}); pick one as "
                      f"{spec}:{concepts[0].token}")
  return concepts[0]


def _check_init_fits(concept: embedding_io.Concept, widths: tuple[int, ...]) -> None:
  """Refuses, in one line, an init_embedding of another model family (`embedding_io.check_fits`)."""
  try:
    embedding_io.check_fits(concept, widths)
  except errors.UserError as e:
    raise ConfigError(f"config.init_embedding: {e}") from None


def _init_concept(spec: str, widths: tuple[int, ...]) -> embedding_io.Concept:
  """The one concept of an existing embedding that fits a model whose text encoders have
  `widths` (one-line errors)."""
  concept = _load_init_concept(spec)
  _check_init_fits(concept, widths)
  return concept


def _init_from_embedding(spec: str, num_vectors: int, dim: int) -> pseudo_words.Initializer:
  """The vectors of an existing embedding (run dir or file, `PATH[:TOKEN]`), checked."""
  concept = _load_init_concept(spec)
  if concept.vectors_2 is not None:  # an SDXL pair for a one-encoder model
    _check_init_fits(concept, (dim,))
  vectors = concept.vectors
  if vectors.shape != (num_vectors, dim):
    raise ConfigError(f"config.init_embedding: {spec} has shape {tuple(vectors.shape)}, "
                      f"but this run needs ({num_vectors}, {dim}) (num_vectors, model width)")
  return pseudo_words.Initializer(vectors, f"initialised {num_vectors} vector(s) from {spec}")

