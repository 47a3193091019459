"""A dry run (`python -m ti_jax.train --dry_run`): every input of a run loaded and checked,
then described image by image, without training and without writing to the workdir.

Like kohya's `--debug_dataset`: for each image its size, the resolution it trains at,
its caption or the templates it draws from, and one of its prompts as the exact token
ids the text encoder gets, with the positions of the placeholder's tokens.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ti_jax.data import buckets, captions
from ti_jax.runtime import fileio, parallel
from ti_jax.training import checkpointing, concept, concepts_file, concepts_run
from ti_jax.training import inputs as run_inputs
from ti_jax.training.config import validate_config

# Token ids shown per prompt before the rest is elided (the padding is never shown).
_MAX_SHOWN_IDS = 40


def dry_run(config, workdir: str) -> list[str]:
  """Loads and checks every input of a training run and returns its report, one line each.

  The same checks as a run's start-up (config ranges, the workdir's run.json if
  there is one, images, caption and templates files, the base model and its
  scheduler config for the validation sampler, the placeholder, the initial
  vectors, the batch over the devices) with the same one-line errors; the
  workdir is not created, locked or written, and nothing is compiled or trained.

  Raises:
    errors.UserError: the input a real run would refuse, with its message.
  """
  validate_config(config)
  workdir = fileio.resolve(workdir)
  if config.concepts_file:
    return dry_run_concepts(config, workdir)
  # The run's own set-up (`inputs.prepare`), so a dry run checks exactly what a run would.
  devices = parallel.all_devices()
  setup = run_inputs.prepare(config, workdir, devices)
  images, sd, prompts, concepts = setup.images, setup.sd, setup.prompts, setup.concepts
  texts = prompts.texts
  lines = [
      f"dry run of {workdir} "
      f"({'resumes the run there' if setup.has_run_json else 'a new run'}): "
      f"base model {sd.path}, {setup.schedule.prediction_type} target",
      f"placeholder {prompts.tokens} = token ids {concepts[0].token_ids}"
      + "".join(f" (tokenizer{c.suffix}: {c.token_ids})" for c in concepts[1:])
      + (f", per-image tokens {prompts.image_tokens}" if prompts.image_tokens else ""),
      f"templates: {len(texts.templates)} from {texts.source}; captions: "
      + (f"{sum(c is not None for c in texts.captions)} of {images.num_images} images "
         f"({config.caption_extension} files)" if config.caption_extension else "off"),
      f"{images.num_images} image(s); global batch {setup.global_batch} on {len(devices)} "
      f"device(s), "
      f"flip_p {config.flip_p}, steps {config.max_train_steps}",
  ]
  if config.enable_bucket:
    lines.append(buckets.describe(images.buckets, run_inputs.bucket_sizes(images)))
  for i in range(images.num_images):
    lines += describe_image(i, images, prompts, concepts)
  lines.append("dry run: every input checked; nothing trained, nothing written")
  return lines


def dry_run_concepts(config, workdir: str) -> list[str]:
  """`dry_run` of a run of many concepts (config.concepts_file): the file, the workdir's
  run.json, the model (loaded once) and each concept's inputs checked as `concepts_run`
  checks them, and each concept's images described."""
  specs = concepts_file.read_concepts_file(config.concepts_file, config)
  has_run_json = checkpointing.check_identity(workdir, concepts_run.run_identity(config, specs))
  model = run_inputs.load_model(config)
  one = parallel.all_devices()[:1]  # each concept's batch is its batch on one device
  lines = [f"dry run of {workdir} ({'resumes the run there' if has_run_json else 'a new run'}):"
           f" {len(specs)} concepts from {config.concepts_file}, base model {model[0].path}, "
           f"steps {config.max_train_steps}"]
  for spec in specs:
    c = concepts_file.concept_config(config, spec)
    with concepts_file.concept_errors(config.concepts_file, spec):
      setup = run_inputs.prepare(c, workdir, one, model=model, has_run_json=has_run_json)
    first = setup.concepts[0]
    lines.append(f"concept {spec.name} (line {spec.line}): placeholder {setup.prompts.tokens} "
                 f"= token ids {first.token_ids}, {setup.images.num_images} image(s) in "
                 f"{spec.train_data_dir}, {spec.learnable_property}, learning rate "
                 f"{spec.learning_rate:g}, seed {spec.seed}, batch {setup.global_batch}")
    for i in range(setup.images.num_images):
      lines += describe_image(i, setup.images, setup.prompts, setup.concepts)
  lines.append("dry run: every input checked; nothing trained, nothing written")
  return lines


def describe_image(i: int, images, prompts: run_inputs.Prompts,
                   concepts: Sequence[concept.EncoderConcept]) -> list[str]:
  """The report lines of image `i`: file, sizes, caption or templates, an example prompt's ids
  from each text encoder's tokenizer (`concepts`; SDXL: two)."""
  texts = prompts.texts
  w, h = images.sizes[i]
  if images.buckets:
    bw, bh = images.buckets[images.bucket_index[i]]
    top, left = images.crop_top_left[i]
    trains = (f"trains at {bw}x{bh} (bucket {images.bucket_index[i] + 1} of "
              f"{len(images.buckets)}, crop top-left {top},{left})")
  else:
    r = images.pixels.shape[1]
    trains = f"trains at {r}x{r} (bucket: the square training resolution)"
  caption = texts.captions[i]
  where = os.path.basename(texts.caption_files[i]) if caption else ""
  source = (f"caption ({where}): {caption!r}" if caption
            else f"templates ({len(texts.templates)} from {texts.source})")
  n = len(prompts.tokens)
  lines = [f"image {i + 1}/{images.num_images} {images.paths[i]}: {w}x{h} px, {trains}; {source}",
           f"  example: {captions.fill(caption or texts.templates[0], ' '.join(prompts.tokens))!r}"]
  for c in concepts:  # the same prompt through each tokenizer, labelled when there are several
    ids = (c.caption_ids[n - 1][i] if caption
           else c.template_ids[n - 1][0])  # [T]; templates: the first one as the example
    label = f"{'tokenizer' + c.suffix + ':':<13}" if len(concepts) > 1 else ""
    lines.append("  " + label + token_line(ids, c.token_ids, c.encoder.tokenizer))
  return lines


def token_line(ids: np.ndarray, placeholder_ids: list[int], tokenizer) -> str:
  """`ids [...] (n of T tokens), placeholder at position(s) [...]` for one prompt's ids `[T]`."""
  ids = np.asarray(ids)
  pad = tokenizer.pad_token_id
  eos = tokenizer.eos_token_id
  # Up to the first end token (CLIP pads with it too), or to the first padding.
  ends = np.flatnonzero(ids == eos) if eos is not None else np.flatnonzero(ids == pad)
  used = int(ends[0]) + 1 if ends.size else len(ids)
  shown = ids[:used].tolist()
  text = (str(shown) if used <= _MAX_SHOWN_IDS
          else f"{shown[:_MAX_SHOWN_IDS]} ... {shown[-1]}")
  positions = np.flatnonzero(np.isin(ids, placeholder_ids)).tolist()
  return (f"token ids {text} ({used} of {len(ids)} tokens, the rest padding), "
          f"placeholder at position(s) {positions}")
