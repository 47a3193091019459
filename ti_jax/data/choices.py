"""Per-example draws (view, template, flip) as pure functions of (seed, step, example).

The same global batch comes out however many hosts or devices share it.
"""

from __future__ import annotations

import numpy as np

from ti_jax.data.image_loader import DataError

# Stream tags put right after the seed in the SeedSequence entropy, so the
# per-example draws and the per-epoch shuffles never share a generator state
# (SeedSequence pads short entropy with zeros, so lengths alone would not do).
_EXAMPLE_STREAM = 1


_EPOCH_STREAM = 2


_PER_IMAGE_STREAM = 3


_BUCKET_STREAM = 4


_BUCKET_EPOCH_STREAM = 5


def _epoch_order(seed: int, epoch: int, num_images: int, bucket: int | None = None) -> np.ndarray:
  """The shuffled image order of one pass over the images (of one bucket, if given)."""
  entropy = ([seed, _EPOCH_STREAM, epoch] if bucket is None
             else [seed, _BUCKET_EPOCH_STREAM, bucket, epoch])
  return np.random.default_rng(entropy).permutation(num_images)  # [N]


def bucket_choice(seed: int, step: int, bucket_sizes) -> tuple[int, int]:
  """The bucket a training step's whole batch comes from, and the bucket's own step count.

  Scheme: the steps are cut into rounds of ``N = sum(bucket_sizes)`` steps, in
  which bucket ``b`` gets exactly ``bucket_sizes[b]`` steps, in an order
  shuffled by ``(seed, round)``: buckets are drawn in proportion to their
  images, so every image is shown equally often whatever its bucket. A pure
  function of ``(seed, step)`` and the sizes, the same on every host and device.

  Args:
    seed: the run's seed.
    step: the training step.
    bucket_sizes: images per bucket, each positive.

  Returns:
    ``(bucket, bucket_step)``: the bucket of `step` and how many earlier steps
    drew it (the step's position in that bucket's own stream of examples,
    see `example_choices`' `stream_step`).
  """
  sizes = np.asarray(bucket_sizes, np.int64)
  if sizes.ndim != 1 or not sizes.size or sizes.min() < 1:
    raise DataError(f"bucket sizes must be positive image counts, got {list(sizes)}")
  total = int(sizes.sum())
  round_, position = divmod(step, total)
  order = np.random.default_rng([seed, _BUCKET_STREAM, round_]).permutation(
      np.repeat(np.arange(sizes.size), sizes))  # [N]: each bucket b N_b times
  bucket = int(order[position])
  return bucket, round_ * int(sizes[bucket]) + int(np.sum(order[:position] == bucket))


def example_choices(seed: int, step: int, global_indices: np.ndarray, *,
                    global_batch_size: int, num_images: int, flip_p: float,
                    num_templates: int, bucket: int | None = None,
                    stream_step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Picks the view and prompt template of each example of a training step.

  Scheme: the run is a stream of examples, example ``g`` of step ``s`` being
  number ``k = s * global_batch_size + g``.  The stream is cut into epochs of
  `num_images` examples; epoch ``e = k // num_images`` shows every image
  exactly once, in an order shuffled by ``(seed, e)``, so all images are seen
  equally often (each ``global_batch_size / N`` times per step when the batch
  is a multiple of N).  Whether the example is flipped (probability `flip_p`)
  and its template (uniform) come from a generator seeded by ``(seed, step,
  g)`` alone.  So example ``g``'s choices do not depend on which host or
  device computes it, nor on how the batch is split.

  With aspect-ratio buckets, `num_images` is the bucket's image count, the
  stream is the bucket's own (`stream_step`, from `bucket_choice`, counts the
  steps that drew the bucket, and the epochs are shuffled by ``(seed, bucket,
  e)``), so every image of a bucket is seen equally often; the flip and
  template draws stay those of ``(seed, step, g)``.

  Args:
    seed: the run's seed (non-negative).
    step: the training step (non-negative).
    global_indices: int ``[B]`` positions of this caller's examples in the
      global batch, each in ``[0, global_batch_size)``.
    global_batch_size: examples per step over all hosts and devices.
    num_images: number of training images N.
    flip_p: probability of a horizontal flip, in ``[0, 1]``.
    num_templates: number of prompt templates to choose from.
    bucket: with buckets, the step's bucket (from `bucket_choice`); None without.
    stream_step: with buckets, the step's position in the bucket's stream.

  Returns:
    ``(view_index, template_index)``, both int32 ``[B]``.  A view index is
    ``image`` or, flipped, ``image + N`` (see `view_pixels`); with
    ``flip_p == 0`` it is always below N.
  """
  global_indices = np.asarray(global_indices)
  if global_indices.ndim != 1:
    raise DataError(f"global_indices must be 1-D, got shape {list(global_indices.shape)}")
  if seed < 0 or step < 0:
    raise DataError(f"seed and step must be non-negative, got seed={seed}, step={step}")
  if global_batch_size < 1 or num_images < 1 or num_templates < 1:
    raise DataError(
        f"global_batch_size, num_images and num_templates must be positive, got "
        f"{global_batch_size}, {num_images}, {num_templates}")
  if not 0.0 <= flip_p <= 1.0:
    raise DataError(f"flip_p must be in [0, 1], got {flip_p}")
  if global_indices.size and not (
      0 <= global_indices.min() and global_indices.max() < global_batch_size):
    raise DataError(f"global_indices must lie in [0, {global_batch_size}), got "
                    f"{global_indices.min()}..{global_indices.max()}")
  views = np.empty(global_indices.shape, np.int32)  # [B]
  templates = np.empty(global_indices.shape, np.int32)  # [B]
  if (bucket is None) != (stream_step is None):
    raise DataError("bucket and stream_step are given together (from bucket_choice) or not at all")
  stream = step if stream_step is None else stream_step
  orders: dict[int, np.ndarray] = {}
  for i, g in enumerate(global_indices.tolist()):
    epoch, position = divmod(stream * global_batch_size + g, num_images)
    if epoch not in orders:
      orders[epoch] = _epoch_order(seed, epoch, num_images, bucket)
    image = int(orders[epoch][position])
    rng = np.random.default_rng([seed, _EXAMPLE_STREAM, step, g])
    # Both draws are always made, so the template does not depend on flip_p.
    flipped = rng.random() < flip_p
    templates[i] = rng.integers(num_templates)
    views[i] = image + num_images if flipped else image
  return views, templates


def per_image_choices(seed: int, step: int, global_indices: np.ndarray,
                      probability: float) -> np.ndarray:
  """Whether each example's prompt also names its image's own token (paper ablation).

  With per-image tokens the paper mixes, with some probability, prompts such
  as "a photo of a S* with S_i" in which S_i belongs to the example's image,
  so image-specific details can go into S_i instead of S*. Like
  `example_choices`, the draw is a pure function of ``(seed, step, global
  example index)``, from its own stream so the other choices do not change.

  Returns:
    bool ``[B]``.
  """
  if not 0.0 <= probability <= 1.0:
    raise DataError(f"per-image token probability must be in [0, 1], got {probability}")
  return np.array([np.random.default_rng([seed, _PER_IMAGE_STREAM, step, g]).random() < probability
                   for g in np.asarray(global_indices).reshape(-1).tolist()], dtype=bool)
