"""The paper's evaluation of learned pseudo-words (Gal et al. 2022, section 5).

  python -m ti_jax.evaluate --workdir runs/paper/cat --workdir runs/paper/cat-two-words
  python -m ti_jax.evaluate --workdir runs/world/cross --word object   # tiny-world: checker

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

World mode (--scorer checker; --scorer auto picks it when the runs' base
model folder, e.g. tiny-world, carries the world's checker.json and
checker.safetensors): no CLIP model is loaded; the attribute classifier of the
procedural world scores the samples as shares. Reconstruction: the share of
"a photo of S*" samples showing the concept (--concept, e.g. "cross", or the
"concept" entry of concept.json in the training-image folder). Editability:
per world edit prompt ("a photo of S* on a green background"), the share of
samples showing the concept and every attribute the prompt names, averaged.
Edit fidelity: the same without the concept (the share showing what the
prompt names), the counterpart of the paper's text similarity.
A run of many concepts (config.concepts_file) is evaluated concept by concept:
--concept names them (repeat it, separate names with commas, or 'all'), each a point
labelled RUN/NAME; the checker then reads each concept's own concept.json:
  python -m ti_jax.evaluate --workdir runs/many --concept all
--word object adds a baseline point: the plain word in place of S* on the
first run's base model, same seeds and prompts (works with CLIP too).

Writes to --output_dir (default WORKDIR/eval for one run, WORKDIR/<name>/eval for one
concept of a many-concept run, ./eval for several):
  report.json   settings and, per run, both scores, per-category and
                per-prompt text similarity (with the checker: reconstruction,
                editability, edit fidelity and per-category and per-prompt
                shares);
  scatter.png   text vs image similarity, one point per run, like the
                paper's quantitative figure (with the checker: two panels,
                editability and edit fidelity against reconstruction).
"""

from __future__ import annotations

from typing import Sequence

from ti_jax import cli
from ti_jax.evaluation import evaluator
from ti_jax.runtime import distributed


def main(argv: Sequence[str]) -> None:
  f = cli.start(argv)
  distributed.maybe_initialize(f.coordinator_address, f.num_processes, f.process_id)
  protocol = evaluator.Protocol(
      num_samples=f.num_samples, num_inference_steps=f.num_inference_steps,
      guidance_scale=f.guidance_scale, scheduler=f.scheduler, seed=f.seed,
      batch_size=f.batch_size, clip_model=f.clip_model, scorer=f.scorer)
  with cli.one_line_errors():
    evaluator.run(
        workdirs=f.workdir or [], step=f.step, protocol=protocol, prompts_file=f.prompts_file,
        train_data_dir=f.train_data_dir, output_dir=f.output_dir, dtype=f.dtype,
        cache_dir=f.cache_dir, allow_pickle=f.allow_pickle, save_images=f.save_images,
        concept=",".join(f.concept), words=f.word or [])


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  defaults = evaluator.Protocol()
  flags.DEFINE_multi_string("workdir", [], "Training run to evaluate (its newest checkpoint). "
                            "Repeat to compare runs: each is a point of the scatter plot.")
  flags.DEFINE_integer("step", None, "Evaluate every run's checkpoint of this step instead.")
  flags.DEFINE_string("clip_model", defaults.clip_model, "CLIP model (hub id or local "
                      "transformers folder) that scores the images; the paper's is ViT-B/32. "
                      "'tiny-clip' is a random offline model for tests.")
  flags.DEFINE_enum("scorer", defaults.scorer, list(evaluator.SCORERS), "What scores the "
                    "samples: clip, checker (the procedural world's attribute classifier in "
                    "the base model folder; shares of samples, no CLIP loaded), or auto: the "
                    "checker when the base model folder carries one (tiny-world), else CLIP.")
  flags.DEFINE_multi_string("concept", [], "A --workdir run of many concepts "
                            "(config.concepts_file): the concept(s) to evaluate, by folder "
                            "name (<cat-toy> is cat-toy), each its own point RUN/NAME; repeat "
                            "it or separate names with commas, or 'all'. Otherwise, for the "
                            "checker scorer: the attributes reconstruction checks for, e.g. "
                            "'cross' or 'shape=cross' or 'style=outlined' (default: the "
                            "'concept' entry of concept.json in the run's training-image "
                            "folder; a run of many concepts always reads its concepts' own).")
  flags.DEFINE_multi_string("word", [], "A baseline point: this plain word (e.g. the "
                            "initializer 'object') in place of S*, on the first run's base "
                            "model with the same seeds and prompts. Repeatable.")
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
  flags.DEFINE_string("prompts_file", "", "Editability prompts instead of the shipped list "
                      "(the world's list with the checker): "
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
  distributed.define_flags()
  app.run(main, flags_parser=cli.flags_parser)
