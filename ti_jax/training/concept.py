"""The concept in each text encoder: the placeholder's tokens, prompt ids and initial vectors.

`concepts` returns one `EncoderConcept` per text encoder of the model
(`sd.text_encoders`, in the pipeline's order: SD 1.x/2.x and the LDM have one,
SDXL two), each from one `encoder_concept` call: the placeholder's num_vectors
tokens added to that encoder's tokenizer, every training prompt tokenized with it
(the tables of all encoders match row for row, so one set of choices picks a
batch's prompts in each), its token table, and where its vectors start (the
initializer word's embedding in its own table, or its part of
config.init_embedding). A third kind of encoder is one more record; the step
learns encoder e's vectors as params["embeds" + suffix] (`EncoderConcept.key`,
the checkpoints' keys "embeds" and "embeds_2").

`inputs.prepare` calls `concepts` once, after the prompts' texts are known.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ti_jax import errors
from ti_jax.data import captions
from ti_jax.embeddings import embedding_io, pseudo_words
from ti_jax.runtime import console, run_dir
from ti_jax.training.config import ConfigError
from ti_jax.weights import pipeline

_log = console.log

# How the initial vectors' log line names each encoder of a model with several.
_ORDINALS = ("first", "second", "third", "fourth")


@dataclasses.dataclass(frozen=True)
class EncoderConcept:
  """The pseudo-word in one text encoder."""
  encoder: pipeline.TextEncoder  # module, frozen params, tokenizer (now holding the tokens)
  token_ids: list[int]  # the num_vectors tokens' ids in encoder.tokenizer
  table: np.ndarray  # [V, D] float32, the encoder's token table
  init: pseudo_words.Initializer  # init.vectors [n, D]: where the vectors start
  template_ids: np.ndarray  # [n, num_templates, T], see captions.prompt_tables
  caption_ids: np.ndarray | None = None  # [n, N, T] (captions.caption_tables); None without any
  # Per-image-token ablation (one-encoder models only; else empty/None): each image's
  # S_i, and the prompts naming "S* with S_i".
  image_token_ids: list[int] = dataclasses.field(default_factory=list)
  image_template_ids: np.ndarray | None = None  # [n, N, num_templates, T]
  image_caption_ids: np.ndarray | None = None  # [n, N, T]

  @property
  def suffix(self) -> str:
    """"" for the first encoder, "_2" for SDXL's second (`TextEncoder.suffix`)."""
    return self.encoder.suffix

  @property
  def key(self) -> str:
    """The vectors' key in the train state's params and in checkpoints ("embeds", "embeds_2")."""
    return "embeds" + self.suffix

  @property
  def image_key(self) -> str:
    """The per-image vectors' key ("image_embeds"), present with image_token_ids."""
    return "image_embeds" + self.suffix

  @property
  def placeholder_ids(self) -> np.ndarray:
    """[n (+ N)] int32: the id of each learned vector, then of each per-image token."""
    return np.asarray(self.token_ids + self.image_token_ids, np.int32)


def concepts(config, sd, texts: captions.PromptTexts, tokens: list[str],
             image_tokens: list[str]) -> tuple[EncoderConcept, ...]:
  """The placeholder `tokens` (and per-image `image_tokens`) in each of `sd.text_encoders`,
  whose tokenizers get them (in place), with every prompt of `texts` tokenized."""
  encoders = sd.text_encoders
  if len(encoders) > 1 and image_tokens:
    raise ConfigError("config.per_image_tokens is not supported for SDXL models (the paper's "
                      "ablation is for one text encoder); set it to False")
  tables = [np.asarray(pseudo_words.token_table(e.module, e.params), np.float32)
            for e in encoders]  # [V, D] each
  starts = (_init_embedding(config, tuple(t.shape[1] for t in tables))
            if config.init_embedding else [None] * len(encoders))
  made = tuple(encoder_concept(config, encoder, table, texts, tokens, image_tokens, start,
                               several=len(encoders) > 1)
               for encoder, table, start in zip(encoders, tables, starts))
  for i, c in enumerate(made):
    if config.init_embedding and i:  # one line for the whole embedding
      continue
    _log(c.init.note + (f" ({_ORDINALS[i]} text encoder)"
                        if len(made) > 1 and not config.init_embedding else ""))
  return made


def encoder_concept(config, encoder: pipeline.TextEncoder, table: np.ndarray,
                    texts: captions.PromptTexts, tokens: list[str], image_tokens: list[str],
                    start: pseudo_words.Initializer | None, several: bool) -> EncoderConcept:
  """The pseudo-word in `encoder` (token table `table` [V, D]): `tokens` and `image_tokens`
  added to its tokenizer, every training prompt tokenized, and its initial vectors (`start`,
  its part of config.init_embedding, else the initializer word's embedding). `several`: the
  model has other encoders, whose tokenizers may number the placeholder differently."""
  tokenizer = encoder.tokenizer
  token_ids = pseudo_words.add_placeholder_tokens(tokenizer, config.placeholder_token,
                                                  config.num_vectors)
  # Paper ablation: a token per training image, mixed into some prompts.
  image_token_ids = pseudo_words.add_new_tokens(tokenizer, image_tokens) if image_tokens else []
  if several:
    pseudo_words.check_separable(tokenizer, {config.placeholder_token: token_ids})
  _check_prompts_fit(tokenizer, texts.templates, tokens, image_tokens, texts)
  template_ids, image_template_ids = captions.prompt_tables(tokenizer, texts.templates, tokens,
                                                            image_tokens)
  caption_ids, image_caption_ids = (
      captions.caption_tables(tokenizer, texts.captions, tokens, image_tokens)
      if any(c is not None for c in texts.captions) else (None, None))
  init = (start if start is not None else pseudo_words.initializer_vectors(
      tokenizer, table, config.initializer_token, config.num_vectors))
  _check_finite(config, init)
  return EncoderConcept(encoder=encoder, token_ids=token_ids, table=table, init=init,
                        template_ids=template_ids, caption_ids=caption_ids,
                        image_token_ids=image_token_ids, image_template_ids=image_template_ids,
                        image_caption_ids=image_caption_ids)


def _check_prompts_fit(tokenizer, templates, tokens: list[str], image_tokens: list[str],
                       texts: captions.PromptTexts | None = None) -> None:
  """Refuses a vector count whose prompts would be cut off by the text encoder's token limit."""
  limit = int(tokenizer.model_max_length)

  def count(text):
    return len(tokenizer(text).input_ids)  # with the start/end tokens
  # Tokens the longest template or caption takes besides the placeholder (one token for "x";
  # a slot written more than once holds the vectors each time).
  sources = [(t, "template") for t in templates]
  if texts:
    sources += [(c, f"caption {f}") for c, f in zip(texts.captions, texts.caption_files) if c]
  extra = (max(count(captions.with_image_token("x", t)) - count("x") for t in image_tokens)
           if image_tokens else 0)

  def fit(text):  # (vectors that fit, tokens the text takes besides them)
    slots = text.count(captions.SLOT)
    other = count(captions.fill(text, "x")) - slots + extra
    return (limit - other) // slots, other
  room, overhead, where = min((*fit(t), w) for t, w in sources)  # the tightest text
  if len(tokens) > room:
    raise ConfigError(
        f"config.num_vectors {len(tokens)} does not fit the prompts: the longest training "
        f"{where} takes {overhead} of the text encoder's {limit} tokens, leaving room for "
        f"at most {max(room, 0)} vectors")


def _check_finite(config, init: pseudo_words.Initializer) -> None:
  if not np.all(np.isfinite(init.vectors)):
    raise ConfigError("the initial vectors are not finite (NaN or inf): "
                      + (f"config.init_embedding {config.init_embedding} holds such values"
                         if config.init_embedding else "the model's token table holds them"))


def _init_embedding(config, widths: tuple[int, ...]) -> list[pseudo_words.Initializer]:
  """config.init_embedding's vectors for each text encoder (of `widths`), checked.

  A one-encoder model takes an embedding of its own width; SDXL needs an SDXL
  embedding (both encoders' vectors). Another family's is refused in one line.
  """
  spec, n = config.init_embedding, config.num_vectors
  concept = _load_init_concept(spec)
  parts = list(concept.vectors)  # [n, D_e] per text encoder of the embedding
  if len(widths) == 1:
    if len(parts) > 1:  # an SDXL pair for a one-encoder model
      _check_init_fits(concept, widths)
    if parts[0].shape != (n, widths[0]):
      raise ConfigError(f"config.init_embedding: {spec} has shape {tuple(parts[0].shape)}, "
                        f"but this run needs ({n}, {widths[0]}) (num_vectors, model width)")
    return [pseudo_words.Initializer(parts[0], f"initialised {n} vector(s) from {spec}")]
  _check_init_fits(concept, widths)
  if parts[0].shape[0] != n:
    raise ConfigError(f"config.init_embedding: {spec} has {parts[0].shape[0]} vector(s), this "
                      f"run needs {n} (num_vectors)")
  note = f"initialised {n} vector(s) per text encoder from {spec}"
  return [pseudo_words.Initializer(np.asarray(v, np.float32), note) for v in parts]


def _load_init_concept(spec: str) -> embedding_io.Concept:
  """The one concept of an existing embedding (run dir or file, `PATH[:TOKEN]`); one-line
  errors for an unreadable source or one holding several tokens."""
  try:
    found = embedding_io.load_concepts(spec)
  except (embedding_io.EmbeddingFileError, run_dir.WorkdirError) as e:
    raise ConfigError(f"config.init_embedding: {e}") from None
  if len(found) != 1:  # PATH:TOKEN picks one of them (embedding_io.load_concepts)
    raise ConfigError(f"config.init_embedding: {spec} holds {len(found)} tokens "
                      f"({', '.join(c.token for c in found)}); pick one as "
                      f"{spec}:{found[0].token}")
  return found[0]


def _check_init_fits(concept: embedding_io.Concept, widths: tuple[int, ...]) -> None:
  """Refuses, in one line, an init_embedding of another model family (`embedding_io.check_fits`)."""
  try:
    embedding_io.check_fits(concept, widths)
  except errors.UserError as e:
    raise ConfigError(f"config.init_embedding: {e}") from None
