"""Edits a region of an image with learned pseudo-words (Blended Latent Diffusion).

  # the white region of the mask becomes what the prompt says; the rest stays as it is
  python -m ti_jax.edit --workdir runs/demo --image photo.png --mask mask.png \\
      --prompt "a photo of a <toy> on the table" --num_images 4

  # a run of many concepts (config.concepts_file): name the concept(s) to edit with
  python -m ti_jax.edit --workdir runs/many --concept cat-toy --image photo.png \
      --mask mask.png --prompt "a photo of a <cat-toy> on the table"

The mask is an image of the image's size; pixels with a grey level at or
above --mask_threshold (128 of 255 by default) mark the region to change.
The image is edited near the model's resolution and resized back; outside
the (slightly dilated) mask every output pixel is the input's own. Each edit
is a PNG with its prompt, seed, steps and scheduler in the text chunk, plus a
grid of the input, the mask and the edits.
"""

from __future__ import annotations

from typing import Sequence

from ti_jax import cli
from ti_jax.runtime import distributed
from ti_jax.sampling import editing


def main(argv: Sequence[str]) -> None:
  f = cli.start(argv)
  distributed.maybe_initialize(f.coordinator_address, f.num_processes, f.process_id)
  with cli.one_line_errors():
    editing.run(image=f.image, mask=f.mask, prompt=f.prompt, workdir=f.workdir, step=f.step,
                embedding_sources=f.embeddings or [],
                pretrained_model_name_or_path=f.pretrained_model_name_or_path,
                negative_prompt=f.negative_prompt, num_images=f.num_images,
                num_inference_steps=f.num_inference_steps, guidance_scale=f.guidance_scale,
                guidance_rescale=f.guidance_rescale,
                scheduler=f.scheduler, seed=f.seed, output_dir=f.output_dir,
                mask_threshold=f.mask_threshold, mask_shrink_stages=f.mask_shrink_stages,
                dtype=f.dtype, batch_size=f.batch_size,
                allow_base_model_mismatch=f.allow_base_model_mismatch, cache_dir=f.cache_dir,
                allow_pickle=f.allow_pickle, concept=f.concept)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  cli.define_generation_flags()
  flags.DEFINE_string("image", "", "The image to edit (any size and mode training accepts).")
  flags.DEFINE_string("mask", "", "An image of the same size: white marks the region to change.")
  flags.DEFINE_integer("mask_threshold", 128, "Mask pixels with a grey level (0-255) at or "
                       "above this are changed; the rest is kept.")
  flags.DEFINE_integer("mask_shrink_stages", -1, "Progressive mask shrinking (the paper's fix "
                       "for thin masks): the first steps blend with the latent mask dilated by "
                       "this many cells, shrinking to the mask. -1: 2 for a thin mask, else 0.")
  flags.DEFINE_string("prompt", "", "What the region should show, with the learned tokens.")
  flags.DEFINE_integer("num_images", 4, "Edits to make.")
  flags.DEFINE_integer("seed", 0, "Edit i draws its noise from (seed, i).")
  flags.DEFINE_string("output_dir", "", "Where PNGs go (default: WORKDIR/edits or ./edits).")
  flags.DEFINE_integer("batch_size", 0, "Edits per device per compiled call (0: as many "
                       "as the edits need, capped by device memory; 4 on CPU).")
  flags.DEFINE_multi_string("concept", [], "A --workdir run of many concepts "
                            "(config.concepts_file): the concept(s) to edit with, by folder "
                            "name (<cat-toy> is cat-toy); repeat it or separate names with "
                            "commas, or 'all'. PNGs go to WORKDIR/<name>/edits for one, "
                            "WORKDIR/edits for several. Not for a run of one concept.")
  distributed.define_flags()
  app.run(main, flags_parser=cli.flags_parser)
