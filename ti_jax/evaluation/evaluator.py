"""The paper's evaluation (Gal et al. 2022, section 5): `run(workdirs=...)`.

Scored with CLIP, or, for a base model of the procedural world whose folder
carries a trained attribute classifier, with that checker
(`ti_jax.evaluation.world_scores`). `python -m ti_jax.evaluate` is its command
line; its docstring says what is measured and written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np

from ti_jax import errors
from ti_jax.data import image_loader
from ti_jax.embeddings import embedding_io
from ti_jax.evaluation import clip_io, clip_scores, plot, prompt_lists, world_scores
from ti_jax.runtime import console, fileio, parallel, run_dir
from ti_jax.sampling import concepts, generation, noise_schedule, schedulers
from ti_jax.weights import loading
from ti_jax.weights.loading import ModelLoadError
from ti_jax.world import checker as checker_lib
from ti_jax.world import scenes


class EvaluateError(errors.UserError):
  """Bad evaluation input; one-line message."""



_log = console.log


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
  # "clip", "checker" (the world's attribute classifier in the base model's folder), or
  # "auto": the checker when every run's base model folder carries one, else CLIP.
  scorer: str = "auto"


SCORERS = ("auto", "clip", "checker")
# The least extent of a checker plot's axes (shares): two runs a sample or two apart
# should look alike, not span the panel.
CHECKER_MIN_SPAN = 0.25


def _run_label(workdir: str, step: int | None, labels: dict[str, int],
               name: str | None = None) -> str:
  """A short unique name for a run (`name`: one concept of a many-concept run,
  `RUN/NAME`) in the plot and the report."""
  base = os.path.basename(os.path.normpath(workdir)) or workdir
  base = f"{base}/{name}" if name else base
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
      except noise_schedule.SchedulerConfigError as e:
        refusal = schedulers.sampler_refusal(e, sd.scheduler_config, p.num_inference_steps,
                                             "--scheduler")
        raise EvaluateError(f"{model_id}: {refusal}") from None
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


def prepare_run(workdir: str, step: int | None, train_data_dir: str, label: str,
                name: str | None = None) -> _Run:
  """Reads a run's vectors, metadata and training images (one-line errors for bad input).

  `name`: one concept of a many-concept run, read as a run of its own
  (`run_dir.concept_metadata`: its token, property and training images).
  """
  found, meta = concepts.gather_concepts(workdir, step, [], [name] if name else [])
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


def _many_concepts(workdir: str) -> bool:
  """Whether `workdir` is a run of many concepts (a missing or broken run is left to
  `prepare_run`'s messages)."""
  if not fileio.exists(fileio.join(workdir, "run.json")):
    return False
  return run_dir.concept_names(workdir) is not None


def prepare_runs(workdirs: Sequence[str], step: int | None, train_data_dir: str = "",
                 concept: str = "") -> tuple[list[_Run], str]:
  """Every run to evaluate, read before any model loads, and the checker's ground truth.

  When any of `workdirs` is a run of many concepts, `concept` names the concepts to
  evaluate in each such run (`run_dir.select_concepts`: names, comma lists, `all`),
  each its own run labelled RUN/NAME, and the checker's ground truth is each
  concept's concept.json; otherwise `concept` is that ground truth (see `run`), as
  it always was. Returns (runs, the ground truth to pass on).
  """
  many = any(_many_concepts(w) for w in workdirs)
  selection, truth = ([concept] if concept else [], "") if many else ([], concept)
  jobs = [(w, name) for w in workdirs
          for name in ((run_dir.select_concepts(w, selection) if _many_concepts(w) else None)
                       or [None])]
  if train_data_dir and sum(name is not None for _, name in jobs) > 1:
    raise EvaluateError("--train_data_dir gives one concept's images, but several concepts "
                        "are evaluated (each reads its own); evaluate them one at a time")
  labels: dict[str, int] = {}
  runs = [prepare_run(w, step, train_data_dir, _run_label(w, step, labels, name), name)
          for w, name in jobs]
  return runs, truth


def default_output_dir(workdirs: Sequence[str], runs: Sequence[_Run]) -> str:
  """WORKDIR/eval for one run (WORKDIR/<name>/eval for one concept of a many-concept
  run), ./eval for several."""
  if len(workdirs) != 1:
    return "eval"
  selected = runs[0].meta.get("selected_concepts") or []
  if len(runs) == 1 and len(selected) == 1:
    return fileio.join(run_dir.concept_dir(workdirs[0], selected[0]), "eval")
  return fileio.join(workdirs[0], "eval")


@dataclasses.dataclass(frozen=True)
class _Scorer:
  """What scores the samples: CLIP (`clip`) or a world checker (`checker`, `concept`)."""
  kind: str  # "clip" or "checker"
  clip: Any = None
  checker: Any = None
  concept: dict | None = None  # the ground truth of reconstruction, e.g. {"shape": "cross"}


def _templates(prop: str, scorer: _Scorer, prompts: Sequence[prompt_lists.EvalPrompt] | None
               ) -> tuple[str, list[prompt_lists.EvalPrompt]]:
  """The reconstruction template and the edit prompts for a run of `prop` under `scorer`."""
  if scorer.kind == "checker":
    recon = world_scores.reconstruction_prompt(scorer.concept)
    default = world_scores.prompts_for(scorer.concept)
  else:
    recon, default = prompt_lists.reconstruction_prompt(prop), prompt_lists.prompts_for(prop)
  return recon, list(prompts) if prompts is not None else default


def job_label(run_: _Run, word: str | None) -> str:
  """The report's and the plot's name for a run, or for a baseline word on its base model."""
  return f"word: {word}" if word is not None else run_.label


def evaluate_run(run_: _Run, *, protocol: Protocol, clip=None, generators,
                 prompts: Sequence[prompt_lists.EvalPrompt] | None, bar,
                 images_dir: str = "", scorer: _Scorer | None = None,
                 word: str | None = None) -> dict:
  """Scores one run's checkpoint, or with `word` the plain word in place of its pseudo-word.

  Returns its report dict (`clip_scores.report` or `world_scores.report`); {}
  on processes other than 0, which only generate.
  """
  scorer = scorer or _Scorer("clip", clip=clip)
  concept, meta, training = run_.concept, run_.meta, run_.images
  label = job_label(run_, word)
  config = meta.get("config", {})
  prop = meta.get("learnable_property", "object")
  sd, model_id, generator = generators.get(concept, config, run_.resolution)
  # A baseline word needs no vectors: the model's own tokenizer(s), copied.
  used = [] if word is not None else [concept]
  # Tokenizers of the run's own (both of SDXL's): other runs on this model may use the same
  # token names.
  learned = concepts.tokenizers_with_concepts(sd, used)
  tokenizer = learned["tokenizers"][0]
  token = word if word is not None else concept.token

  def images_for(template: str) -> np.ndarray:
    prompt, _ = concepts.prepare_prompt(prompt_lists.with_token(template, token), used,
                                        tokenizer)
    images = generation.generate_images(
        generator, prompt, protocol.num_samples, batch_size=protocol.batch_size,
        seed=protocol.seed, progress=bar.update, **learned)
    if images_dir and jax.process_index() == 0:
      path = fileio.join(images_dir, f"{generation.slug(label)}_{generation.slug(template)}.png")
      generation.save_png(path, generation.image_grid(images), {"prompt": prompt})
    return images

  is_main = jax.process_index() == 0
  recon_template, prompt_list = _templates(prop, scorer, prompts)
  recon = images_for(recon_template)
  generated = [(p, images_for(p.text)) for p in prompt_list]
  if not is_main:  # every process generates; process 0 scores and writes
    return {}
  extra = {
      "label": label, "workdir": run_.workdir, "step": None if word is not None else meta.get("step"),
      "token": token, "num_vectors": 0 if word is not None else concept.num_vectors,
      "learnable_property": prop, "base_model": model_id, "resolution": run_.resolution,
      "train_data_dir": run_.folder, "num_training_images": training.num_images,
      "reconstruction_prompt": recon_template,
      "config": {} if word is not None else {k: config.get(k) for k in (
          "learning_rate", "max_train_steps", "num_vectors", "progressive_words",
          "per_image_tokens", "embedding_reg_weight", "initializer_token")},
  }
  if word is not None:
    extra["word"] = word
  if scorer.kind == "checker":
    return world_scores.report(scorer.checker, scorer.concept, recon, generated, extra=extra)
  clip = scorer.clip
  image_sim = clip_scores.image_similarity(clip_io.image_features(clip, recon),
                                            clip_io.image_features(clip, training.pixels))
  texts = clip_io.text_features(clip, [prompt_lists.without_token(p.text) for p, _ in generated])
  scores = [clip_scores.prompt_score(p.text, p.category, clip_io.image_features(clip, images),
                                      texts[i])
            for i, (p, images) in enumerate(generated)]
  return clip_scores.report(image_sim, scores, extra={**extra, "scorer": "clip"})


def model_folder(run_: _Run, cache_dir: str = "", allow_pickle: bool = False) -> str:
  """The local folder of the base model `run_` was trained on (fetched or written if need be)."""
  config = run_.meta.get("config", {})
  model_id = concepts.resolve_base_model("", [run_.concept])
  return loading.resolve_model_dir(
      model_id, variant=config.get("variant") or None, revision=config.get("revision") or None,
      allow_pickle=allow_pickle or bool(config.get("allow_pickle")),
      cache_dir=cache_dir or config.get("cache_dir") or loading.DEFAULT_CACHE_DIR)


def choose_scorer(requested: str, model_dirs: Sequence[str]) -> str:
  """"clip" or "checker" for runs on the base models in `model_dirs` (see `Protocol.scorer`)."""
  if requested not in SCORERS:
    raise EvaluateError(f"--scorer must be one of {', '.join(SCORERS)}, got {requested!r}")
  if requested == "clip":
    return "clip"
  with_checker = [world_scores.has_checker(d) for d in model_dirs]
  if requested == "checker" and not all(with_checker):
    missing = model_dirs[with_checker.index(False)]
    raise EvaluateError(f"--scorer checker: base model folder {missing} carries no world "
                        f"checker ({checker_lib.CONFIG_FILE}, {checker_lib.WEIGHTS_FILE})")
  if all(with_checker):
    return "checker"
  if any(with_checker):
    raise EvaluateError("some runs' base models carry a world checker and some do not: one "
                        "plot cannot mix the two scores; pass --scorer clip or evaluate them "
                        "apart")
  return "clip"


def concept_of(run_: _Run, concept: str = "") -> dict[str, str]:
  """The ground truth of a run's reconstruction: `concept` if given, else its concept.json."""
  try:
    if concept:
      return checker_lib.parse_attributes(concept)
    found = world_scores.read_concept_file(run_.folder)
  except checker_lib.CheckerError as e:
    raise EvaluateError(f"--concept: {e}" if concept else f"{run_.workdir}: {e}") from None
  if found is None:
    raise EvaluateError(f"{run_.workdir}: no concept to check the samples against: pass "
                        f"--concept (e.g. --concept cross) or put {scenes.CONCEPT_FILE} "
                        f"in the training images' folder {run_.folder}")
  return found


def _check_word(word: str) -> str:
  word = " ".join(str(word).split())
  if not word or "{" in word or "}" in word:
    raise EvaluateError(f"--word must be a plain word (no braces), got {word!r}")
  return word


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
    schedulers.check_sampler_name(protocol.scheduler)  # the name, before loading anything
  except ValueError as e:
    raise EvaluateError(str(e)) from None


def run(*, workdirs: Sequence[str], step: int | None = None, protocol: Protocol = Protocol(),
        prompts_file: str = "", train_data_dir: str = "", output_dir: str = "",
        dtype: str = "auto", cache_dir: str = "", allow_pickle: bool = False,
        save_images: bool = False, devices: Sequence | None = None, concept: str = "",
        words: Sequence[str] = ()) -> dict:
  """Evaluates each run (and each baseline word); writes report.json and scatter.png.

  `concept` (checker scorer only): the ground truth of reconstruction in
  `checker.parse_attributes` syntax ("cross", "shape=cross"); default: each
  run's concept.json. When a workdir is a run of many concepts, `concept`
  instead names which of its concepts to evaluate (`prepare_runs`). `words`: baseline points scoring a plain word in place
  of the pseudo-word, on the first run's base model with the same seeds and
  prompts. Returns the report.
  """
  if not workdirs:
    raise EvaluateError("no run to evaluate: pass --workdir (repeatable)")
  check_protocol(protocol)
  words = [_check_word(w) for w in words]
  prompts = None
  if prompts_file:
    try:
      prompts = prompt_lists.load_prompt_file(prompts_file)
    except (OSError, ValueError) as e:
      raise EvaluateError(f"--prompts_file: {e}") from None
  # Every run is checked before any model loads, so a typo in the last
  # --workdir does not cost the evaluation of the others.
  runs, concept = prepare_runs(workdirs, step, train_data_dir, concept)
  model_dirs = ([] if protocol.scorer == "clip" else
                [model_folder(r, cache_dir, allow_pickle) for r in runs])
  kind = choose_scorer(protocol.scorer, model_dirs)
  run_concepts = [concept_of(r, concept) for r in runs] if kind == "checker" else [None] * len(runs)
  out_dir = output_dir or default_output_dir(workdirs, runs)
  is_main = jax.process_index() == 0
  devices = list(devices) if devices is not None else parallel.all_devices()
  # Process 0 alone writes and scores; the others must hear when it cannot,
  # instead of waiting for it in the first collective of generation.
  clip, checkers, failure = None, {}, None
  if is_main:
    try:
      fileio.makedirs(out_dir)
    except OSError as e:
      failure = EvaluateError(f"cannot write to --output_dir {out_dir}: {e.strerror or e}")
  if is_main and failure is None and kind == "checker":
    try:  # no CLIP model at all: the checker of each base model folder scores its runs
      checkers = {d: checker_lib.load(d) for d in dict.fromkeys(model_dirs)}
    except checker_lib.CheckerError as e:
      failure = e
  elif is_main and failure is None:
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
  # Every base model is loaded and its sampler built before the first image (the
  # generators keep them all anyway), so a scheduler config the sampler cannot use
  # is refused now, not after the runs on other base models have been evaluated.
  for r in runs:
    generators.get(r.concept, r.meta.get("config", {}), r.resolution)
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  report = {"protocol": dataclasses.asdict(protocol), "scorer": kind, "dtype": dtype,
            "devices": len(devices), "seconds": 0.0, "runs": []}

  def scatter(results: list[dict]) -> tuple[list, dict]:
    """The plot's points (label, x, y) and its titles; the checker's has a second panel."""
    if kind != "checker":
      return [(x["label"], x["text_similarity"], x["image_similarity"]) for x in results], {}
    editability = [(x["label"], x["editability"], x["reconstruction"]) for x in results]
    fidelity = [(x["label"], x["edit_fidelity"], x["reconstruction"]) for x in results]
    return editability, dict(
        title=plot.CHECKER_TITLE, x_title=plot.CHECKER_X_TITLE, y_title=plot.CHECKER_Y_TITLE,
        more=[(plot.CHECKER_FIDELITY_X_TITLE, fidelity)], size=(1500, 600),
        min_span=CHECKER_MIN_SPAN, bounds=(0.0, 1.0))

  started = time.perf_counter()

  def scorer_for(i: int) -> _Scorer:
    if kind == "checker":
      return _Scorer("checker", checker=checkers.get(model_dirs[i]), concept=run_concepts[i])
    return _Scorer("clip", clip=clip)

  # Each run, then each baseline word on the first run's base model (its scorer and concept).
  jobs = [(i, r, None) for i, r in enumerate(runs)] + [(0, runs[0], w) for w in words]
  for i, r, word in jobs:
    label = job_label(r, word)
    _log(f"evaluating {label} ({r.workdir})")
    scorer = scorer_for(i)
    _, prompt_list = _templates(r.meta.get("learnable_property", "object"), scorer, prompts)
    bar = tqdm(total=(len(prompt_list) + 1) * protocol.num_samples, desc=f"eval {label}",
               unit="img", file=sys.stderr, disable=not is_main, dynamic_ncols=True)
    try:
      result = evaluate_run(r, protocol=protocol, generators=generators, prompts=prompts,
                            bar=bar, images_dir=out_dir if save_images else "", scorer=scorer,
                            word=word)
    finally:
      bar.close()
    if not is_main:
      continue
    report["runs"].append(result)
    report["seconds"] = round(time.perf_counter() - started, 1)
    if kind == "checker":
      _log(f"{label}: reconstruction {result['reconstruction']:.3f} (share showing "
           f"{result['concept']}), editability {result['editability']:.3f} (share showing it "
           f"and the edit), edit fidelity {result['edit_fidelity']:.3f} (share showing the "
           "edit)")
    else:
      _log(f"{label}: image similarity {result['image_similarity']:.4f}, "
           f"text similarity {result['text_similarity']:.4f}")
    # Written after every run: a long evaluation keeps what it has finished.
    fileio.write_text(fileio.join(out_dir, "report.json"), json.dumps(report, indent=2) + "\n")
    points, titles = scatter(report["runs"])
    plot.scatter_png(points, fileio.join(out_dir, "scatter.png"), **titles)
  if is_main:
    _log(f"wrote report.json and scatter.png to {out_dir}")
  return report
