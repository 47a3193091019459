"""The concepts a sampling run uses: gathered, checked against the base model, tokenized.

`gather_concepts` reads a training run's vectors and any embedding files;
`load_base_model` loads the model they were trained on and checks they fit;
`tokenizer_with_concepts` returns a new tokenizer holding their tokens (the
model's own is never changed); `prepare_prompt` expands multi-vector tokens.
`ti_jax.sample` (`runner`) and `ti_jax.evaluate` both build on these.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from ti_jax import errors
from ti_jax.embeddings import embedding_io, pseudo_words
from ti_jax.models import layers
from ti_jax.runtime import fileio, run_dir
from ti_jax.weights.loading import DEFAULT_CACHE_DIR, load_stable_diffusion
from ti_jax.weights.pipeline import require_unet


class SampleError(errors.UserError):
  """Bad sampling input; one-line message."""


def _same_model(a: str, b: str) -> bool:
  norm = lambda s: os.path.abspath(os.path.expanduser(s)) if os.path.exists(os.path.expanduser(s)) else s
  return norm(a) == norm(b)


def _run_concepts(workdir: str, step: int | None, names: Sequence[str] | None
                  ) -> tuple[list[embedding_io.Concept], dict]:
  """The concept of a single run (`names` None), or the named concepts of a many-concept
  run, and the metadata of the (first) one; NaN/inf vectors refused."""
  if names is None:
    # One array of vectors per text encoder (an SDXL run's checkpoint holds two).
    read = [(*run_dir.encoder_vectors_from_workdir(workdir, step), workdir)]
  else:
    read = [(vectors, meta, f"{workdir} concept {meta['concept']}")
            for vectors, meta in run_dir.concept_vectors_from_workdir(workdir, names, step)]
  concepts = []
  for vectors, meta, source in read:
    what = f"{source} checkpoint {meta.get('step', '?')}"
    try:
      vectors = tuple(embedding_io.check_vectors(v, what) for v in vectors)
    except embedding_io.EmbeddingFileError as e:
      raise SampleError(f"{e}; pass --step of an earlier checkpoint") from None
    concepts.append(embedding_io.Concept(
        meta["placeholder_token"], vectors, source,
        base_model=meta.get("pretrained_model_name_or_path")))
  return concepts, read[0][1]


def gather_concepts(workdir: str | None, step: int | None, sources: Sequence[str],
                    concept: Sequence[str] = ()) -> tuple[list[embedding_io.Concept], dict]:
  """Concepts of the run in `workdir` (first) and of each `PATH[:TOKEN]` in `sources`.

  Also returns the run's checkpoint metadata ({} without a workdir), read
  with its vectors in one restore. Refuses NaN/inf vectors and two concepts
  with one token name (including the `tok_1`, ... names of extra vectors).
  `concept`: the `--concept` values naming which concepts of a many-concept
  run to use (`run_dir.select_concepts`: names, comma lists, `all`); the
  metadata is then the first one's (`run_dir.concept_metadata`: the shared
  fields are every concept's) with "selected_concepts" listing them all.
  """
  concepts, run_meta = [], {}
  if concept and not workdir:
    raise SampleError("--concept picks concepts of the --workdir run: pass --workdir")
  if workdir:
    if not fileio.is_dir(workdir):
      raise SampleError(f"run directory {workdir} is a file, not a folder"
                        if fileio.exists(workdir) else f"run directory {workdir} does not exist")
    names = run_dir.select_concepts(workdir, concept)
    concepts, run_meta = _run_concepts(workdir, step, names)
    if names is not None:
      run_meta = {**run_meta, "selected_concepts": list(names)}
  for spec in sources:
    concepts += embedding_io.load_concepts(spec)
  seen = {}
  for c in concepts:
    for i, name in enumerate(pseudo_words.placeholder_tokens(c.token, c.num_vectors)):
      if name in seen:
        other, j = seen[name]
        if i == j == 0:
          raise SampleError(f"token {c.token!r} comes from both {other.source} and {c.source}; "
                            "rename one with PATH:NEW_TOKEN")
        what = lambda k, t: f"{t!r}" if k == 0 else f"{name!r} (vector {k} of {t!r})"
        raise SampleError(f"token {what(i, c.token)} from {c.source} clashes with "
                          f"{what(j, other.token)} from {other.source}; "
                          "rename one with PATH:NEW_TOKEN")
      seen[name] = (c, i)
  return concepts, run_meta


def concepts_folder(workdir: str, run_meta: dict) -> str:
  """Where sample and edit write by default for a run (`gather_concepts`' metadata): the
  folder of its one selected concept (WORKDIR/<name> of a many-concept run), else the run
  directory."""
  selected = run_meta.get("selected_concepts") or []
  return run_dir.concept_dir(workdir, selected[0]) if len(selected) == 1 else workdir


def describe_concepts(concepts: Sequence[embedding_io.Concept]) -> list[str]:
  """One line per concept loaded from a file or another run: the token it registered and why."""
  lines = []
  for c in concepts:
    if not c.token_from:
      continue
    n = c.num_vectors
    vectors = f"{n} vectors, expanded in prompts" if n > 1 else "1 vector"
    lines.append(f"{c.source}: registered {c.token} ({vectors}; the token is "
                 f"{c.token_from})")
  return lines


def resolve_base_model(override: str, concepts: Sequence[embedding_io.Concept]) -> str:
  """The model to sample with: the override, else the first concept's (the run's) base model."""
  if override:
    return override
  for c in concepts:
    if c.base_model:
      return c.base_model
  raise SampleError("no base model: pass --workdir of a training run or "
                    "--pretrained_model_name_or_path")


def check_concepts_fit(concepts, model_id: str, widths: int | Sequence[int],
                       allow_mismatch: bool) -> None:
  """Refuses embeddings of another width or family or, unless allowed, trained on another base model.

  `widths` are the model's text-encoder widths: one for SD/LDM (an int will
  do), two for SDXL. An embedding of the other kind (SD 1.x/2.x or LDM vs
  SDXL) is refused naming both families (`embedding_io.check_fits`).
  """
  widths = (widths,) if isinstance(widths, int) else tuple(widths)
  for c in concepts:
    if len(c.widths) == len(widths) == 1 and c.widths != widths:
      raise SampleError(f"embedding {c.token!r} from {c.source} has width {c.widths[0]} "
                        f"but the model's text encoder has width {widths[0]} (another base model?)")
    try:
      embedding_io.check_fits(c, widths)
    except embedding_io.ModelFamilyError as e:
      raise SampleError(str(e)) from None
    if c.base_model and not allow_mismatch and not _same_model(c.base_model, model_id):
      raise SampleError(f"{c.source} was trained on {c.base_model!r} but sampling uses "
                        f"{model_id!r}; pass --allow_base_model_mismatch to use it anyway")


def text_encoder_widths(sd) -> tuple[int, ...]:
  """The widths of a loaded model's text encoders: one, or two for SDXL."""
  return tuple(e.width for e in sd.text_encoders)


def tokenizer_with_concepts(tokenizer, concepts, *, encoder: int = 0
                            ) -> tuple[Any, list[tuple[np.ndarray, list[int]]]]:
  """A copy of `tokenizer` holding every concept's tokens, and (vectors, token ids) per concept.

  The caller's tokenizer is left as it was, so one loaded model can serve
  runs whose tokens share names (the evaluation of several runs of one
  concept). Refuses tokens the tokenizer cannot split apart
  (`pseudo_words.check_separable`). `encoder`: which text encoder's vectors of
  each concept (`Concept.vectors[encoder]`); `tokenizer` is that encoder's.
  """
  tokenizer = copy.deepcopy(tokenizer)
  learned = []
  for c in concepts:
    if encoder >= len(c.vectors):
      raise SampleError(f"{c.source}: {c.token!r} has no vectors for text encoder "
                        f"{encoder + 1} (an SD embedding for SDXL?)")
    vectors = c.vectors[encoder]
    try:
      ids = pseudo_words.add_placeholder_tokens(tokenizer, c.token, vectors.shape[0])
    except pseudo_words.EmbeddingError as e:
      raise SampleError(f"{c.source}: {e}") from None
    learned.append((vectors, ids))
  try:
    pseudo_words.check_separable(tokenizer, {c.token: ids for c, (_, ids) in zip(concepts, learned)})
  except pseudo_words.EmbeddingError as e:
    raise SampleError(str(e)) from None
  return tokenizer, learned


def tokenizers_with_concepts(sd, concepts) -> dict[str, tuple]:
  """The concepts in copies of the model's tokenizers: `ImageGenerator.generate`'s keywords.

  {"tokenizers", "learned"}, each a tuple with one entry per text encoder
  (`sd.text_encoders`): a copy of the encoder's tokenizer holding every concept's
  tokens (`tokenizer_with_concepts`), and (all concepts' vectors for that encoder
  `[m, D_e]`, their ids `[m]` in that copy). The model's own tokenizers are left
  as they were.
  """
  tokenizers, learned = [], []
  for e, encoder in enumerate(sd.text_encoders):
    tokenizer, per_concept = tokenizer_with_concepts(encoder.tokenizer, concepts, encoder=e)
    tokenizers.append(tokenizer)
    learned.append(_joined(per_concept, encoder.width))
  return {"tokenizers": tuple(tokenizers), "learned": tuple(learned)}


def _joined(per_concept: Sequence[tuple[np.ndarray, Sequence[int]]], width: int
            ) -> tuple[np.ndarray, np.ndarray]:
  """Concepts' (vectors, ids) as one (vectors `[m, D]` float32, ids `[m]` int32)."""
  vectors = [np.asarray(v, np.float32).reshape(-1, width) for v, _ in per_concept]
  ids = [np.asarray(i, np.int32).reshape(-1) for _, i in per_concept]
  return (np.concatenate(vectors) if vectors else np.zeros((0, width), np.float32),
          np.concatenate(ids) if ids else np.zeros((0,), np.int32))


def prepare_prompt(prompt: str, concepts, tokenizer) -> tuple[str, list[str]]:
  """Expands multi-vector tokens; returns the prompt and warnings (no token, truncation).

  `tokenizer` is the one from `tokenizer_with_concepts` (the truncation
  warning counts the concepts' tokens as one id each). Tokens match whole, as
  the tokenizer splits them (`pseudo_words.expand_placeholders`).
  """
  warnings = []
  counts = {c.token: c.num_vectors for c in concepts}
  ignore_case = pseudo_words.lowercases(tokenizer)
  if concepts and not pseudo_words.used_tokens(prompt, counts, ignore_case):
    warnings.append(f"prompt {prompt!r} uses none of the learned tokens "
                    f"({', '.join(c.token for c in concepts)})")
  prompt = pseudo_words.expand_placeholders(prompt, counts, ignore_case)
  length = len(tokenizer(prompt).input_ids)
  if length > tokenizer.model_max_length:
    warnings.append(f"prompt {prompt[:40]!r}... is {length} tokens; truncated to "
                    f"{tokenizer.model_max_length} (the text encoder's limit)")
  return prompt, warnings


def load_base_model(concepts, run_config: dict, *, override: str = "", dtype: str = "auto",
                    platform: str = "cpu", allow_pickle: bool = False, cache_dir: str = "",
                    allow_base_model_mismatch: bool = False, allow_flux: bool = False):
  """Loads the base model the concepts were trained on (or `override`); returns (sd, model id).

  A FLUX.1 model is refused in one line unless `allow_flux` (`ti_jax.sample`, which
  samples it with plain prompts); with concepts it is refused either way (learned FLUX.1
  vectors are not spliced into its prompts yet).

  The run's weight files (variant, revision) and settings apply when the base
  model is the run's own. `dtype` "auto" is float32 on CPU, else bfloat16; the
  VAE always decodes in float32.
  """
  model_id = resolve_base_model(override, concepts)
  same_files = not override or _same_model(
      override, run_config.get("pretrained_model_name_or_path", ""))
  if dtype == "auto":
    dtype = "float32" if platform == "cpu" else "bfloat16"
  jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  attention_impl = run_config.get("attention_impl") or None
  if attention_impl == layers.PALLAS_TPU and platform != "tpu":
    attention_impl = None  # a run trained with the TPU kernel still samples elsewhere
  sd = load_stable_diffusion(
      model_id, dtype=jdtype, param_dtype=jdtype, vae_dtype=jnp.float32,
      variant=(run_config.get("variant") or None) if same_files else None,
      revision=(run_config.get("revision") or None) if same_files else None,
      allow_pickle=allow_pickle or bool(run_config.get("allow_pickle")),
      attention_impl=attention_impl,
      cache_dir=cache_dir or run_config.get("cache_dir", DEFAULT_CACHE_DIR),
      tokenizer=(run_config.get("tokenizer_name_or_path") or None) if same_files else None)
  if not allow_flux:
    require_unet(sd, "sample")
  if sd.is_flux and concepts:
    raise SampleError(
        f"{model_id}: a FLUX.1 model: ti_jax samples it with plain prompts but not yet with "
        f"learned concepts ({', '.join(c.token for c in concepts)}); pass no run or embeddings")
  check_concepts_fit(concepts, model_id, text_encoder_widths(sd), allow_base_model_mismatch)
  return sd, model_id
