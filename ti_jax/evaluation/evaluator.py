"""The paper's CLIP evaluation (Gal et al. 2022, section 5): `run(workdirs=...)`.

`python -m ti_jax.evaluate` is its command line; its docstring says what is
measured and written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Sequence

import jax
import numpy as np

from ti_jax import cli, errors
from ti_jax.data import image_loader
from ti_jax.embeddings import embedding_io
from ti_jax.evaluation import clip_io, clip_scores, plot, prompt_lists
from ti_jax.runtime import fileio, parallel
from ti_jax.sampling import concepts, generation, schedulers
from ti_jax.weights.loading import ModelLoadError


class EvaluateError(errors.UserError):
  """Bad evaluation input; one-line message."""



_log = cli.log


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How images are generated and scored (the paper's values are the defaults)."""
  num_samples: int = 64  # images per prompt
  num_inference_steps: int = 50
  guidance_scale: float = 5.0
  scheduler: str = "ddim"
  seed: int = 0
  batch_size: int = 0  # images per device per compiled call (0: generation.auto_batch_size)
  clip_model: str = "openai/clip-vit-base-patch32"


def _run_label(workdir: str, step: int | None, labels: dict[str, int]) -> str:
  """A short unique name for a run in the plot and the report."""
  base = os.path.basename(os.path.normpath(workdir)) or workdir
  label = f"{base}@{step}" if step is not None else base
  labels[label] = labels.get(label, 0) + 1
  return label if labels[label] == 1 else f"{label}#{labels[label]}"


class _Generators:
  """One image generator per base model, shared by the runs trained on it."""

  def __init__(self, protocol: Protocol, devices, dtype: str, cache_dir: str,
               allow_pickle: bool):
    self.protocol, self.devices, self.dtype = protocol, devices, dtype
    self.cache_dir, self.allow_pickle = cache_dir, allow_pickle
    self._by_model: dict[tuple, tuple] = {}

  def get(self, concept, run_config: dict, resolution: int):
    key = (concept.base_model, resolution, run_config.get("variant"), run_config.get("revision"))
    if key not in self._by_model:
      sd, model_id = concepts.load_base_model(
          [concept], run_config, dtype=self.dtype, platform=self.devices[0].platform,
          allow_pickle=self.allow_pickle, cache_dir=self.cache_dir)
      p = self.protocol
      try:
        generator = generation.ImageGenerator(
            sd, scheduler=p.scheduler, num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale, height=resolution, width=resolution,
            devices=self.devices)
      except ValueError as e:
        raise EvaluateError(str(e)) from None
      self._by_model[key] = (sd, model_id, generator)
    return self._by_model[key]


@dataclasses.dataclass
class _Run:
  """A run's checkpoint and training images, read before any model loads."""
  workdir: str
  label: str
  concept: embedding_io.Concept
  meta: dict
  images: image_loader.TrainingImages
  folder: str
  resolution: int


def prepare_run(workdir: str, step: int | None, train_data_dir: str, label: str) -> _Run:
  """Reads a run's vectors, metadata and training images (one-line errors for bad input)."""
  found, meta = concepts.gather_concepts(workdir, step, [])
  config = meta.get("config", {})
  resolution = int(meta.get("resolution") or config.get("resolution") or 512)
  folder = train_data_dir or meta.get("train_data_path") or config.get("train_data_dir", "")
  if not folder:
    raise EvaluateError(f"{workdir}: the run does not record its training images; "
                        "pass --train_data_dir")
  try:
    images = image_loader.load_images(folder, resolution, bool(config.get("center_crop", False)))
  except image_loader.DataError as e:
    raise EvaluateError(f"{workdir}: training images: {e} (pass --train_data_dir if they "
                        "moved)") from None
  return _Run(workdir, label, found[0], meta, images, folder, resolution)


def evaluate_run(run_: _Run, *, protocol: Protocol, clip, generators,
                 prompts: Sequence[prompt_lists.EvalPrompt] | None, bar,
                 images_dir: str = "") -> dict:
  """Scores one run's checkpoint; returns its report dict (see `clip_scores.report`)."""
  concept, meta, label, training = run_.concept, run_.meta, run_.label, run_.images
  config = meta.get("config", {})
  prop = meta.get("learnable_property", "object")
  sd, model_id, generator = generators.get(concept, config, run_.resolution)
  # Tokenizers of the run's own (both of SDXL's): other runs on this model may use the same
  # token names.
  learned = concepts.tokenizers_with_concepts(sd, [concept])
  tokenizer = learned["tokenizer"]
  token = concept.token

  def images_for(template: str) -> np.ndarray:
    prompt, _ = concepts.prepare_prompt(prompt_lists.with_token(template, token), [concept],
                                        tokenizer)
    images = generation.generate_images(
        generator, prompt, protocol.num_samples, batch_size=protocol.batch_size,
        seed=protocol.seed, progress=bar.update, **learned)
    if images_dir and jax.process_index() == 0:
      path = fileio.join(images_dir, f"{generation.slug(label)}_{generation.slug(template)}.png")
      generation.save_png(path, generation.image_grid(images), {"prompt": prompt})
    return images

  is_main = jax.process_index() == 0
  recon_template = prompt_lists.reconstruction_prompt(prop)
  recon = images_for(recon_template)
  prompt_list = list(prompts) if prompts is not None else prompt_lists.prompts_for(prop)
  generated = [(p, images_for(p.text)) for p in prompt_list]
  if not is_main:  # every process generates; process 0 scores and writes
    return {}
  image_sim = clip_scores.image_similarity(clip_io.image_features(clip, recon),
                                            clip_io.image_features(clip, training.pixels))
  texts = clip_io.text_features(clip, [prompt_lists.without_token(p.text) for p, _ in generated])
  scores = [clip_scores.prompt_score(p.text, p.category, clip_io.image_features(clip, images),
                                      texts[i])
            for i, (p, images) in enumerate(generated)]
  return clip_scores.report(image_sim, scores, extra={
      "label": label, "workdir": run_.workdir, "step": meta.get("step"), "token": token,
      "num_vectors": int(concept.vectors.shape[0]), "learnable_property": prop,
      "base_model": model_id, "resolution": run_.resolution, "train_data_dir": run_.folder,
      "num_training_images": training.num_images, "reconstruction_prompt": recon_template,
      "config": {k: config.get(k) for k in (
          "learning_rate", "max_train_steps", "num_vectors", "progressive_words",
          "per_image_tokens", "embedding_reg_weight", "initializer_token")},
  })


def check_protocol(protocol: Protocol) -> None:
  """Refuses a protocol that cannot run with a one-line `EvaluateError`; warns of a noisy one."""
  if protocol.num_samples < 1 or protocol.num_inference_steps < 1 or protocol.batch_size < 0:
    raise EvaluateError("num_samples and num_inference_steps must be >= 1, batch_size >= 0 "
                        "(0: chosen to fit device memory)")
  if not 0 <= protocol.seed < 2**32:
    raise EvaluateError(f"seed must be in [0, 2**32), got {protocol.seed}")
  if not math.isfinite(protocol.guidance_scale):
    raise EvaluateError(f"guidance_scale must be a finite number, got {protocol.guidance_scale}")
  if protocol.num_samples < 2:
    _log("warning: one sample per prompt gives very noisy scores (the paper uses 64)")
  try:
    schedulers.make_sampler(protocol.scheduler, {}, 2)  # checks the name before loading
  except ValueError as e:
    raise EvaluateError(str(e)) from None


def run(*, workdirs: Sequence[str], step: int | None = None, protocol: Protocol = Protocol(),
        prompts_file: str = "", train_data_dir: str = "", output_dir: str = "",
        dtype: str = "auto", cache_dir: str = "", allow_pickle: bool = False,
        save_images: bool = False, devices: Sequence | None = None) -> dict:
  """Evaluates each run; writes report.json and scatter.png; returns the report."""
  if not workdirs:
    raise EvaluateError("no run to evaluate: pass --workdir (repeatable)")
  check_protocol(protocol)
  prompts = None
  if prompts_file:
    try:
      prompts = prompt_lists.load_prompt_file(prompts_file)
    except (OSError, ValueError) as e:
      raise EvaluateError(f"--prompts_file: {e}") from None
  # Every run is checked before any model loads, so a typo in the last
  # --workdir does not cost the evaluation of the others.
  labels: dict[str, int] = {}
  runs = [prepare_run(w, step, train_data_dir, _run_label(w, step, labels)) for w in workdirs]
  out_dir = output_dir or (fileio.join(workdirs[0], "eval") if len(workdirs) == 1 else "eval")
  is_main = jax.process_index() == 0
  devices = list(devices) if devices is not None else parallel.all_devices()
  # Process 0 alone writes and scores; the others must hear when it cannot,
  # instead of waiting for it in the first collective of generation.
  clip, failure = None, None
  if is_main:
    try:
      fileio.makedirs(out_dir)
    except OSError as e:
      failure = EvaluateError(f"cannot write to --output_dir {out_dir}: {e.strerror or e}")
  if is_main and failure is None:
    cache = cache_dir or os.path.expanduser("~/.cache/ti_jax")
    try:
      clip = clip_io.load_clip(protocol.clip_model, cache_dir=cache, allow_pickle=allow_pickle)
    except OSError as e:  # e.g. --cache_dir names a file, or the cache is read-only
      failure = EvaluateError(f"cannot load CLIP model {protocol.clip_model!r} with cache "
                              f"{cache}: {e.strerror or e}")
    except ModelLoadError as e:
      failure = e
      if "hub" in str(e) and protocol.clip_model != clip_io.TINY_CLIP:  # most often: offline
        failure = EvaluateError(f"{e}; to try the evaluation offline, pass --clip_model "
                                f"{clip_io.TINY_CLIP} (a random-weight CLIP: the pipeline "
                                "runs, the scores mean nothing)")
  if parallel.any_process(failure is not None):
    raise failure or EvaluateError("process 0 could not start the evaluation; see its log")
  generators = _Generators(protocol, devices, dtype, cache_dir, allow_pickle)
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  report = {"protocol": dataclasses.asdict(protocol), "dtype": dtype, "devices": len(devices),
            "seconds": 0.0, "runs": []}
  started = time.perf_counter()
  for r in runs:
    _log(f"evaluating {r.label} ({r.workdir})")
    prop = r.meta.get("learnable_property", "object")
    count = len(prompts if prompts is not None else prompt_lists.prompts_for(prop)) + 1
    bar = tqdm(total=count * protocol.num_samples, desc=f"eval {r.label}", unit="img",
               file=sys.stderr, disable=not is_main, dynamic_ncols=True)
    try:
      result = evaluate_run(r, protocol=protocol, clip=clip, generators=generators,
                            prompts=prompts, bar=bar, images_dir=out_dir if save_images else "")
    finally:
      bar.close()
    if not is_main:
      continue
    report["runs"].append(result)
    report["seconds"] = round(time.perf_counter() - started, 1)
    _log(f"{r.label}: image similarity {result['image_similarity']:.4f}, "
         f"text similarity {result['text_similarity']:.4f}")
    # Written after every run: a long evaluation keeps what it has finished.
    fileio.write_text(fileio.join(out_dir, "report.json"), json.dumps(report, indent=2) + "\n")
    plot.scatter_png([(x["label"], x["text_similarity"], x["image_similarity"])
                           for x in report["runs"]], fileio.join(out_dir, "scatter.png"))
  if is_main:
    _log(f"wrote report.json and scatter.png to {out_dir}")
  return report
