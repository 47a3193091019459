"""The paper's CLIP evaluation of learned pseudo-words (Gal et al. 2022, section 5).

  python -m ti_jax.evaluate --workdir runs/paper/cat --workdir runs/paper/cat-two-words

For each run (its newest checkpoint, or --step):
  * image similarity (reconstruction): images generated from "a photo of S*"
    ("a painting in the style of S*" for styles) against the run's training
    images: the mean pairwise cosine of their CLIP image embeddings;
  * text similarity (editability): for every prompt of a list of varying
    difficulty (new backgrounds, styles, compositions, properties), the mean
    cosine between each generated image's CLIP embedding and the CLIP text
    embedding of the prompt with S* left out ("a photo of on the moon").
The paper's protocol is the default: CLIP ViT-B/32, 64 samples per prompt,
50 DDIM steps, guidance scale 5. Generation runs over all devices (pmap);
the same seeds are used for every run, so runs differ only by their vectors.

Writes to --output_dir (default WORKDIR/eval for one run, ./eval for several):
  report.json   settings and, per run, both scores, per-category and
                per-prompt text similarity;
  scatter.png   text vs image similarity, one point per run, like the
                paper's quantitative figure.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from typing import Sequence

import jax
import numpy as np

from ti_jax import (checkpointing, cli, clip_io, data, embedding_io, embeddings, eval_metrics,
                    eval_plot, eval_prompts, fileio, parallel, sample, sampling, schedulers, train)
from ti_jax.loading import ModelLoadError


class EvaluateError(ValueError):
  """Bad evaluation input; one-line message."""


USER_ERRORS = (EvaluateError, ModelLoadError, data.DataError, embedding_io.EmbeddingFileError,
               embeddings.EmbeddingError, checkpointing.WorkdirError, sample.SampleError)

_log = cli.log


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How images are generated and scored (the paper's values are the defaults)."""
  num_samples: int = 64  # images per prompt
  num_inference_steps: int = 50
  guidance_scale: float = 5.0
  scheduler: str = "ddim"
  seed: int = 0
  batch_size: int = 0  # images per device per compiled call (0: sampling.auto_batch_size)
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
      sd, model_id = sample.load_base_model(
          [concept], run_config, dtype=self.dtype, platform=self.devices[0].platform,
          allow_pickle=self.allow_pickle, cache_dir=self.cache_dir)
      p = self.protocol
      try:
        generator = sampling.ImageGenerator(
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
  images: data.TrainingImages
  folder: str
  resolution: int


def prepare_run(workdir: str, step: int | None, train_data_dir: str, label: str) -> _Run:
  """Reads a run's vectors, metadata and training images (one-line errors for bad input)."""
  concepts, meta = sample.gather_concepts(workdir, step, [])
  config = meta.get("config", {})
  resolution = int(meta.get("resolution") or config.get("resolution") or 512)
  folder = train_data_dir or meta.get("train_data_path") or config.get("train_data_dir", "")
  if not folder:
    raise EvaluateError(f"{workdir}: the run does not record its training images; "
                        "pass --train_data_dir")
  try:
    images = train.load_images(folder, resolution, bool(config.get("center_crop", False)))
  except data.DataError as e:
    raise EvaluateError(f"{workdir}: training images: {e} (pass --train_data_dir if they "
                        "moved)") from None
  return _Run(workdir, label, concepts[0], meta, images, folder, resolution)


def evaluate_run(run_: _Run, *, protocol: Protocol, clip, generators,
                 prompts: Sequence[eval_prompts.EvalPrompt] | None, bar,
                 images_dir: str = "") -> dict:
  """Scores one run's checkpoint; returns its report dict (see `eval_metrics.report`)."""
  concept, meta, label, training = run_.concept, run_.meta, run_.label, run_.images
  config = meta.get("config", {})
  prop = meta.get("learnable_property", "object")
  sd, model_id, generator = generators.get(concept, config, run_.resolution)
  # The run's own tokens go into a copy: other runs on this model may use the same names.
  tokenizer = copy.deepcopy(sd.tokenizer)
  learned = sample.add_concepts(tokenizer, [concept])
  token = concept.token

  def images_for(template: str) -> np.ndarray:
    prompt, _ = sample.prepare_prompt(eval_prompts.with_token(template, token), [concept],
                                      tokenizer)
    images = sampling.generate_images(
        generator, prompt, protocol.num_samples, batch_size=protocol.batch_size,
        seed=protocol.seed, learned=learned, tokenizer=tokenizer, progress=bar.update)
    if images_dir and jax.process_index() == 0:
      path = fileio.join(images_dir, f"{sample.slug(label)}_{sample.slug(template)}.png")
      sampling.save_png(path, sampling.image_grid(images), {"prompt": prompt})
    return images

  is_main = jax.process_index() == 0
  recon_template = eval_prompts.reconstruction_prompt(prop)
  recon = images_for(recon_template)
  prompt_list = list(prompts) if prompts is not None else eval_prompts.prompts_for(prop)
  generated = [(p, images_for(p.text)) for p in prompt_list]
  if not is_main:  # every process generates; process 0 scores and writes
    return {}
  image_sim = eval_metrics.image_similarity(clip_io.image_features(clip, recon),
                                            clip_io.image_features(clip, training.pixels))
  texts = clip_io.text_features(clip, [eval_prompts.without_token(p.text) for p, _ in generated])
  scores = [eval_metrics.prompt_score(p.text, p.category, clip_io.image_features(clip, images),
                                      texts[i])
            for i, (p, images) in enumerate(generated)]
  return eval_metrics.report(image_sim, scores, extra={
      "label": label, "workdir": run_.workdir, "step": meta.get("step"), "token": token,
      "num_vectors": int(concept.vectors.shape[0]), "learnable_property": prop,
      "base_model": model_id, "resolution": run_.resolution, "train_data_dir": run_.folder,
      "num_training_images": training.num_images, "reconstruction_prompt": recon_template,
      "config": {k: config.get(k) for k in (
          "learning_rate", "max_train_steps", "num_vectors", "progressive_words",
          "per_image_tokens", "embedding_reg_weight", "initializer_token")},
  })


def run(*, workdirs: Sequence[str], step: int | None = None, protocol: Protocol = Protocol(),
        prompts_file: str = "", train_data_dir: str = "", output_dir: str = "",
        dtype: str = "auto", cache_dir: str = "", allow_pickle: bool = False,
        save_images: bool = False, devices: Sequence | None = None) -> dict:
  """Evaluates each run; writes report.json and scatter.png; returns the report."""
  if not workdirs:
    raise EvaluateError("no run to evaluate: pass --workdir (repeatable)")
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
  prompts = None
  if prompts_file:
    try:
      prompts = eval_prompts.load_prompt_file(prompts_file)
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
    count = len(prompts if prompts is not None else eval_prompts.prompts_for(prop)) + 1
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
    eval_plot.scatter_png([(x["label"], x["text_similarity"], x["image_similarity"])
                           for x in report["runs"]], fileio.join(out_dir, "scatter.png"))
  if is_main:
    _log(f"wrote report.json and scatter.png to {out_dir}")
  return report


def main(argv: Sequence[str]) -> None:
  f = cli.start(argv)
  from ti_jax import distributed  # pylint: disable=import-outside-toplevel
  distributed.maybe_initialize(f.coordinator_address, f.num_processes, f.process_id)
  protocol = Protocol(num_samples=f.num_samples, num_inference_steps=f.num_inference_steps,
                      guidance_scale=f.guidance_scale, scheduler=f.scheduler, seed=f.seed,
                      batch_size=f.batch_size, clip_model=f.clip_model)
  try:
    run(workdirs=f.workdir or [], step=f.step, protocol=protocol, prompts_file=f.prompts_file,
        train_data_dir=f.train_data_dir, output_dir=f.output_dir, dtype=f.dtype,
        cache_dir=f.cache_dir, allow_pickle=f.allow_pickle, save_images=f.save_images)
  except USER_ERRORS as e:
    raise SystemExit(f"error: {e}") from None
  except OSError as e:  # the file system refused: a path flag names something unusable
    raise SystemExit(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}") from None


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  defaults = Protocol()
  flags.DEFINE_multi_string("workdir", [], "Training run to evaluate (its newest checkpoint). "
                            "Repeat to compare runs: each is a point of the scatter plot.")
  flags.DEFINE_integer("step", None, "Evaluate every run's checkpoint of this step instead.")
  flags.DEFINE_string("clip_model", defaults.clip_model, "CLIP model (hub id or local "
                      "transformers folder) that scores the images; the paper's is ViT-B/32. "
                      "'tiny-clip' is a random offline model for tests.")
  flags.DEFINE_integer("num_samples", defaults.num_samples, "Images per prompt (paper: 64).")
  flags.DEFINE_integer("num_inference_steps", defaults.num_inference_steps,
                       "Denoising steps (paper: 50).")
  flags.DEFINE_float("guidance_scale", defaults.guidance_scale, "Classifier-free guidance "
                     "(paper: 5).")
  flags.DEFINE_string("scheduler", defaults.scheduler, "Sampler: ddim (paper), pndm, euler "
                      "or dpm++2m.")
  flags.DEFINE_integer("seed", defaults.seed, "Image i of every prompt starts from noise "
                       "(seed, i), the same for every run.")
  flags.DEFINE_integer("batch_size", defaults.batch_size, "Images per device per compiled "
                       "call (0: as many as the samples need, capped by device memory; 4 on CPU).")
  flags.DEFINE_string("prompts_file", "", "Editability prompts instead of the shipped list: "
                      "one per line with {} for the pseudo-word, optionally CATEGORY<TAB>PROMPT; "
                      "# starts a comment.")
  flags.DEFINE_string("train_data_dir", "", "The concept images, if not where the run "
                      "recorded them.")
  flags.DEFINE_string("output_dir", "", "Where report.json and scatter.png go (default: "
                      "WORKDIR/eval for one run, ./eval for several).")
  flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "UNet/text encoder "
                    "dtype (auto: float32 on CPU, bfloat16 on GPU/TPU).")
  flags.DEFINE_bool("save_images", False, "Also write a grid PNG of each prompt's images.")
  flags.DEFINE_bool("allow_pickle", False, "Permit .bin pickles (they can run code) for the "
                    "base model and CLIP when they have no safetensors weights.")
  flags.DEFINE_string("cache_dir", "", "Where tiny test models live (default: the run's).")
  from ti_jax import distributed  # pylint: disable=import-outside-toplevel
  distributed.define_flags()
  from ti_jax.cli import flags_parser  # pylint: disable=import-outside-toplevel
  app.run(main, flags_parser=flags_parser)
