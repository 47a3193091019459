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
      batch_size=f.batch_size, clip_model=f.clip_model)
  with cli.one_line_errors():
    evaluator.run(
        workdirs=f.workdir or [], step=f.step, protocol=protocol, prompts_file=f.prompts_file,
        train_data_dir=f.train_data_dir, output_dir=f.output_dir, dtype=f.dtype,
        cache_dir=f.cache_dir, allow_pickle=f.allow_pickle, save_images=f.save_images)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  defaults = evaluator.Protocol()
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
  distributed.define_flags()
  app.run(main, flags_parser=cli.flags_parser)
