"""Generates images with learned pseudo-words.

  # from a training run (its newest checkpoint; --step N for another)
  python -m ti_jax.sample --workdir runs/my-style \\
      --prompt "a painting of a fox in the style of <my-style>" --num_images 4

  # several concepts at once, from runs or embedding files (PATH[:TOKEN])
  python -m ti_jax.sample --workdir runs/my-toy --embeddings runs/my-style \\
      --prompt "a <my-toy> in the style of <my-style>"

  # a run of many concepts (config.concepts_file): pick them by name (or 'all')
  python -m ti_jax.sample --workdir runs/many --concept cat-toy,tea-pot \\
      --prompt "a <cat-toy> beside a <tea-pot>"

Rebuilds the base model and tokenizer from the checkpoint's metadata (or
--pretrained_model_name_or_path). The denoising loop is one jit-compiled
program; images are spread over all local devices with pmap. Each image is a
PNG with its prompt, seed, steps and scheduler in the text chunk, plus a grid
per prompt.
"""

from __future__ import annotations

from typing import Sequence

from ti_jax import cli
from ti_jax.runtime import distributed, fileio
from ti_jax.sampling import runner


def main(argv: Sequence[str]) -> None:
  f = cli.start(argv)
  distributed.maybe_initialize(f.coordinator_address, f.num_processes, f.process_id)
  prompts = list(f.prompt or [])
  if f.prompts_file is not None:
    try:
      lines = fileio.read_text_lines(f.prompts_file, "--prompts_file")
    except ValueError as e:
      raise SystemExit(f"error: {e}") from None
    if not lines:
      raise SystemExit(f"error: --prompts_file {f.prompts_file} holds no prompt (one per line)")
    prompts += lines
  with cli.one_line_errors():
    runner.run(
        prompts=prompts, workdir=f.workdir, step=f.step, embedding_sources=f.embeddings or [],
        pretrained_model_name_or_path=f.pretrained_model_name_or_path,
        negative_prompt=f.negative_prompt, num_images=f.num_images,
        num_inference_steps=f.num_inference_steps, guidance_scale=f.guidance_scale,
        guidance_rescale=f.guidance_rescale,
        scheduler=f.scheduler, seed=f.seed, height=f.height, width=f.width,
        output_dir=f.output_dir, dtype=f.dtype, batch_size=f.batch_size,
        allow_base_model_mismatch=f.allow_base_model_mismatch, cache_dir=f.cache_dir,
        allow_pickle=f.allow_pickle, concept=f.concept)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  cli.define_generation_flags()
  flags.DEFINE_multi_string("prompt", [], "Prompt using the learned tokens. Repeatable.")
  flags.DEFINE_string("prompts_file", None, "A file with one prompt per line.")
  flags.DEFINE_integer("num_images", 4, "Images per prompt.")
  flags.DEFINE_integer("seed", 0, "Image i of every prompt starts from noise (seed, i).")
  flags.DEFINE_integer("height", 0, "Image height (0: the run's resolution or the model's).")
  flags.DEFINE_integer("width", 0, "Image width (0: the run's resolution or the model's).")
  flags.DEFINE_string("output_dir", "", "Where PNGs go (default: WORKDIR/samples or ./samples).")
  flags.DEFINE_integer("batch_size", 0, "Images per device per compiled call (0: as many "
                       "as the images need, capped by device memory; 4 on CPU).")
  flags.DEFINE_multi_string("concept", [], "A --workdir run of many concepts "
                            "(config.concepts_file): the concept(s) to sample with, by folder "
                            "name (<cat-toy> is cat-toy); repeat it or separate names with "
                            "commas, or 'all'. PNGs go to WORKDIR/<name>/samples for one, "
                            "WORKDIR/samples for several. Not for a run of one concept.")
  distributed.define_flags()
  app.run(main, flags_parser=cli.flags_parser)
