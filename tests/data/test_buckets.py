"""Aspect-ratio buckets: their shapes, which bucket an image gets, how it is cropped, and the
per-step bucket draw (a function of (seed, step) that shows every image equally often)."""

import collections

import numpy as np
import pytest
from PIL import Image

from ti_jax.data import buckets, choices, image_loader


def test_bucket_shapes_are_steps_multiples_of_about_resolution_squared_pixels():
  shapes = buckets.bucket_shapes(512, 256, 1024, 64)
  assert (512, 512) in shapes
  for w, h in shapes:
    assert w % 64 == 0 and h % 64 == 0
    assert 256 <= min(w, h) and max(w, h) <= 1024
    assert w * h <= 512 * 512
    assert (h, w) in shapes  # portrait and landscape alike
  for w in range(256, 1025, 64):  # each width's tallest bucket that fits the area
    h = min(1024, 512 * 512 // w // 64 * 64)
    assert ((w, h) in shapes) == (h >= 256)
  ratios = [w / h for w, h in shapes]
  assert ratios == sorted(ratios)  # widest last
  assert buckets.bucket_shapes(64, 32, 128, 32) == [(32, 128), (32, 96), (64, 64), (96, 32), (128, 32)]


@pytest.mark.parametrize("size,want", [((640, 640), (64, 64)), ((300, 100), (96, 32)),
                                       ((90, 60), (64, 64)), ((100, 300), (32, 96)), ((40, 160), (32, 128)),
                                       ((1000, 250), (128, 32))])
def test_an_image_goes_to_the_bucket_of_nearest_aspect_ratio(size, want):
  shapes = buckets.bucket_shapes(64, 32, 128, 32)
  assert shapes[buckets.nearest_bucket(size, shapes)] == want


def test_placement_covers_the_bucket_and_crops_its_center():
  p = buckets.place((90, 60), (64, 64))
  assert p.scaled == (96, 64) and p.crop_top_left == (0, 16) and p.original_size == (90, 60)
  p = buckets.place((40, 120), (32, 128))
  assert p.scaled[1] == 128 and p.scaled[0] >= 32 and p.crop_top_left == (0, (p.scaled[0] - 32) // 2)


def _write(folder, name, size, color):
  img = np.zeros((size[1], size[0], 3), np.uint8)
  img[:] = color
  img[:, : size[0] // 4] = 255 - np.asarray(color)  # left quarter another colour: shows the crop
  Image.fromarray(img).save(folder / name)


def test_loader_keeps_aspect_ratio_at_each_bucket_with_crop_and_original_size(tmp_path):
  _write(tmp_path, "a.png", (120, 40), (200, 0, 0))
  _write(tmp_path, "b.png", (64, 64), (0, 200, 0))
  _write(tmp_path, "c.png", (90, 60), (0, 0, 200))
  shapes = buckets.bucket_shapes(64, 32, 128, 32)
  out = image_loader.load_training_images(str(tmp_path), 64, False, bucket_shapes=shapes)
  assert out.buckets == [(64, 64), (96, 32)]  # in use, in bucket_shapes' order
  assert out.bucket_index.tolist() == [1, 0, 0]
  assert [p.shape for p in out.pixels] == [(32, 96, 3), (64, 64, 3), (64, 64, 3)]
  assert out.sizes == [(120, 40), (64, 64), (90, 60)]
  assert out.crop_top_left == [(0, 0), (0, 0), (0, 16)]
  assert out.bucket_members(0).tolist() == [1, 2]
  assert out.bucket_pixels(0).shape == (2, 64, 64, 3)
  # c.png scaled to 96x64, 16 px cut each side: of its 22 left-quarter columns about 23.5
  # scaled ones, 7.5 are left (squashed to 64 wide, 15.6 would be).
  left = np.all(np.abs(out.pixels[2][32].astype(int) - [255, 255, 55]) < 60, axis=-1)
  assert 6 <= left.sum() <= 9
  # Without buckets: squares as before, crop offsets (0, 0) when squashed.
  plain = image_loader.load_training_images(str(tmp_path), 64, False)
  assert plain.pixels.shape == (3, 64, 64, 3) and not plain.buckets
  assert plain.crop_top_left == [(0, 0)] * 3


def test_bucket_draw_is_a_function_of_seed_and_step_proportional_to_images():
  sizes = [3, 2]
  draws = [choices.bucket_choice(7, s, sizes) for s in range(50)]
  assert draws == [choices.bucket_choice(7, s, sizes) for s in range(50)]
  assert draws != [choices.bucket_choice(8, s, sizes) for s in range(50)]
  counts = collections.Counter(b for b, _ in draws)
  assert counts == {0: 30, 1: 20}  # exactly N_b of every N = 5 steps
  # The second number counts the bucket's earlier steps.
  for s, (b, k) in enumerate(draws):
    assert k == sum(1 for bb, _ in draws[:s] if bb == b)
  with pytest.raises(image_loader.DataError):
    choices.bucket_choice(0, 0, [2, 0])


def test_each_image_of_a_bucket_is_seen_equally_often_under_any_split():
  sizes, batch = [3, 2], 4
  seen = collections.Counter()
  for step in range(30):  # 6 rounds: bucket 0 has 18 steps, bucket 1 12
    bucket, k = choices.bucket_choice(0, step, sizes)
    kw = {"global_batch_size": batch, "num_images": sizes[bucket], "flip_p": 0.5,
          "num_templates": 3, "bucket": bucket, "stream_step": k}
    whole = choices.example_choices(0, step, np.arange(batch), **kw)
    # Two hosts/devices each computing half of the global batch get the same draws.
    halves = [choices.example_choices(0, step, np.arange(batch)[i::2], **kw) for i in (0, 1)]
    for part, (v, t) in zip((np.arange(batch)[0::2], np.arange(batch)[1::2]), halves):
      np.testing.assert_array_equal(v, whole[0][part])
      np.testing.assert_array_equal(t, whole[1][part])
    seen.update((bucket, int(v) % sizes[bucket]) for v in whole[0])
  assert seen == {(0, 0): 24, (0, 1): 24, (0, 2): 24, (1, 0): 24, (1, 1): 24}
