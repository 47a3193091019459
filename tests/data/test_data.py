"""Tests for ti_jax.data: image loading, views, per-example choices, prompts, tokens."""

from __future__ import annotations

import io
import os
import pathlib

import numpy as np
import pytest
from conftest import REPO, tiny_clip_tokenizer
from PIL import Image

from ti_jax.data import captions, choices, image_loader
from ti_jax.testing import example_images

EXAMPLES = pathlib.Path(REPO) / "examples"

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _solid(size: tuple[int, int], color, mode: str = "RGB") -> Image.Image:
  return Image.new(mode, size, color)


def _thirds(width: int, height: int) -> Image.Image:
  """Red / green / blue vertical thirds, left to right."""
  a = np.zeros((height, width, 3), np.uint8)  # [H, W, 3]
  third = width // 3
  a[:, :third] = RED
  a[:, third:2 * third] = GREEN
  a[:, 2 * third:] = BLUE
  return Image.fromarray(a)


def _load_one(tmp_path, img_or_bytes, name: str = "img.png", resolution: int = 32,
              center_crop: bool = True, **save_kw) -> np.ndarray:
  """Writes one image into an empty folder and returns the loaded uint8 [R, R, 3]."""
  folder = tmp_path / "imgs"
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / name
  if isinstance(img_or_bytes, bytes):
    path.write_bytes(img_or_bytes)
  else:
    img_or_bytes.save(path, **save_kw)
  out = image_loader.load_training_images(str(folder), resolution, center_crop)
  assert out.pixels.shape == (1, resolution, resolution, 3)
  assert out.pixels.dtype == np.uint8
  return out.pixels[0]


def _assert_color(pixels: np.ndarray, color, tol: int = 2) -> None:
  diff = np.abs(pixels.reshape(-1, 3).astype(int) - np.array(color)).max()
  assert diff <= tol, f"expected {color}, max difference {diff}"


def _assert_one_line_error(excinfo, *fragments: str) -> None:
  message = str(excinfo.value)
  assert "\n" not in message and "\r" not in message
  for fragment in fragments:
    assert fragment in message, message


# ---------------------------------------------------------------------------
# Folder handling.
# ---------------------------------------------------------------------------


def test_paths_sorted_hidden_files_and_subfolders_ignored(tmp_path):
  for name, color in [("c.png", BLUE), ("a.JPG", RED), ("b.webp", GREEN), (".hidden.png", WHITE)]:
    _solid((40, 40), color).save(tmp_path / name)
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "sub").mkdir()
  _solid((40, 40), WHITE).save(tmp_path / "sub" / "d.png")
  out = image_loader.load_training_images(str(tmp_path), 32, True)
  assert [os.path.basename(p) for p in out.paths] == ["a.JPG", "b.webp", "c.png"]
  assert out.paths[0] == os.path.join(str(tmp_path), "a.JPG")
  assert out.pixels.shape == (3, 32, 32, 3)
  assert out.warnings == []
  _assert_color(out.pixels[0], RED, tol=8)  # JPEG.
  _assert_color(out.pixels[1], GREEN, tol=8)  # Lossy WebP.
  _assert_color(out.pixels[2], BLUE, tol=0)
  again = image_loader.load_training_images(str(tmp_path), 32, True)
  assert again.paths == out.paths and np.array_equal(again.pixels, out.pixels)


def test_missing_folder_raises_one_line_error(tmp_path):
  with pytest.raises(image_loader.DataError) as excinfo:
    image_loader.load_training_images(str(tmp_path / "nope"), 32, True)
  _assert_one_line_error(excinfo, "nope", "does not exist")


def test_file_instead_of_folder_raises(tmp_path):
  path = tmp_path / "x.png"
  _solid((40, 40), RED).save(path)
  with pytest.raises(image_loader.DataError) as excinfo:
    image_loader.load_training_images(str(path), 32, True)
  _assert_one_line_error(excinfo, "x.png", "not a directory")


def test_empty_folder_raises_listing_extensions(tmp_path):
  with pytest.raises(image_loader.DataError) as excinfo:
    image_loader.load_training_images(str(tmp_path), 32, True)
  _assert_one_line_error(excinfo, str(tmp_path), "no image files", ".jpg", ".png", ".webp")


def test_folder_without_image_extensions_raises(tmp_path):
  (tmp_path / "readme.txt").write_text("hi")
  _solid((40, 40), RED).save(tmp_path / ".hidden.png")
  (tmp_path / "sub").mkdir()
  _solid((40, 40), RED).save(tmp_path / "sub" / "x.png")
  with pytest.raises(image_loader.DataError) as excinfo:
    image_loader.load_training_images(str(tmp_path), 32, True)
  _assert_one_line_error(excinfo, "no image files", "1 other file", ".tiff")


def test_data_error_is_value_error_and_one_line():
  err = image_loader.DataError("bad file 'a\nb.png'\r\nsecond line")
  assert isinstance(err, ValueError)
  assert "\n" not in str(err) and "\r" not in str(err)


# ---------------------------------------------------------------------------
# Bad files.
# ---------------------------------------------------------------------------


def _noise_png_bytes(seed: int = 0) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def test_corrupt_and_truncated_files_skipped_with_warning(tmp_path):
  _solid((40, 40), RED).save(tmp_path / "a_good.png")
  (tmp_path / "b_garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
  png = _noise_png_bytes()
  (tmp_path / "c_truncated.png").write_bytes(png[:len(png) // 2])
  (tmp_path / "d_empty.jpg").write_bytes(b"")
  _solid((40, 40), BLUE).save(tmp_path / "e_good.png")
  out = image_loader.load_training_images(str(tmp_path), 32, True)
  assert [os.path.basename(p) for p in out.paths] == ["a_good.png", "e_good.png"]
  assert len(out.warnings) == 3
  for name, warning in zip(["b_garbage.png", "c_truncated.png", "d_empty.jpg"], out.warnings):
    assert name in warning and "skipped" in warning and "\n" not in warning


def test_all_corrupt_raises_no_readable_images(tmp_path):
  (tmp_path / "a.png").write_bytes(b"garbage")
  (tmp_path / "b.jpg").write_bytes(b"more garbage")
  with pytest.raises(image_loader.DataError) as excinfo:
    image_loader.load_training_images(str(tmp_path), 32, True)
  _assert_one_line_error(excinfo, "no readable images", str(tmp_path), "2 files", "2 unreadable")


def test_too_small_image_skipped_with_warning(tmp_path):
  _solid((20, 50), RED).save(tmp_path / "small.png")
  _solid((40, 40), BLUE).save(tmp_path / "ok.png")
  out = image_loader.load_training_images(str(tmp_path), 32, True, min_side=32)
  assert [os.path.basename(p) for p in out.paths] == ["ok.png"]
  assert len(out.warnings) == 1
  assert "small.png" in out.warnings[0]
  assert "too small: 20x50, need at least 32 px" in out.warnings[0]


def test_only_too_small_images_raises(tmp_path):
  _solid((10, 10), RED).save(tmp_path / "tiny.png")
  with pytest.raises(image_loader.DataError) as excinfo:
    image_loader.load_training_images(str(tmp_path), 32, True)
  _assert_one_line_error(excinfo, "no readable images", "smaller than 32 px", "tiny.png")


def test_upscaled_image_kept_with_warning(tmp_path):
  _solid((40, 50), GREEN).save(tmp_path / "low.png")
  _solid((100, 100), BLUE).save(tmp_path / "big.png")
  out = image_loader.load_training_images(str(tmp_path), 64, True)
  assert len(out.paths) == 2
  assert len(out.warnings) == 1
  assert "low.png" in out.warnings[0] and "upscaled 1.60x" in out.warnings[0]
  # Without cropping the shorter side decides the factor too.
  out = image_loader.load_training_images(str(tmp_path), 64, False)
  assert len(out.warnings) == 1 and "upscaled 1.60x" in out.warnings[0]


# ---------------------------------------------------------------------------
# Orientation and colour modes.
# ---------------------------------------------------------------------------


def test_exif_orientation_applied(tmp_path):
  # Stored landscape, blue with a red marker in the stored top-left corner.
  a = np.zeros((32, 64, 3), np.uint8)  # [H, W, 3]
  a[:] = BLUE
  a[:16, :16] = RED
  exif = Image.Exif()
  exif[0x0112] = 6  # "Rotate 90 CW to display".
  px = _load_one(tmp_path, Image.fromarray(a), "photo.jpg", resolution=32, center_crop=False,
                 quality=95, exif=exif)
  # Displayed upright the image is portrait with the marker top-right; the
  # squash to 32 x 32 halves its height: red in x 16..32, y 0..8.
  _assert_color(px[2:6, 20:30], RED, tol=40)
  _assert_color(px[2:6, 2:12], BLUE, tol=40)
  _assert_color(px[20:30, 2:30], BLUE, tol=40)


def test_rgba_composited_on_white(tmp_path):
  a = np.zeros((40, 60, 4), np.uint8)  # [H, W, 4]
  a[:, :20] = (255, 0, 0, 0)  # Invisible red: must not show.
  a[:, 20:40] = (255, 0, 0, 128)
  a[:, 40:] = (255, 0, 0, 255)
  px = _load_one(tmp_path, Image.fromarray(a), resolution=60, center_crop=False)
  _assert_color(px[:, 2:18], WHITE, tol=0)
  _assert_color(px[:, 22:38], (255, 127, 127), tol=1)
  _assert_color(px[:, 42:], RED, tol=0)


def test_la_composited_on_white(tmp_path):
  a = np.zeros((40, 40, 2), np.uint8)  # [H, W, 2]
  a[:, :20] = (0, 0)
  a[:, 20:] = (0, 255)
  px = _load_one(tmp_path, Image.fromarray(a, mode="LA"), resolution=40, center_crop=False)
  _assert_color(px[:, :18], WHITE, tol=0)
  _assert_color(px[:, 22:], (0, 0, 0), tol=0)


def test_palette_with_transparency_composited_on_white(tmp_path):
  img = Image.new("P", (40, 40), 1)
  img.putpalette([0, 0, 0] + list(GREEN) + [0, 0, 0] * 254)
  img.paste(0, (0, 0, 20, 40))
  px = _load_one(tmp_path, img, resolution=40, center_crop=False, transparency=0)
  _assert_color(px[:, :18], WHITE, tol=0)
  _assert_color(px[:, 22:], GREEN, tol=0)


def test_palette_without_transparency_converted(tmp_path):
  img = _solid((40, 40), (200, 60, 20)).convert("P", palette=Image.Palette.ADAPTIVE)
  _assert_color(_load_one(tmp_path, img), (200, 60, 20), tol=0)


@pytest.mark.parametrize("name", ["cmyk.tif", "cmyk.jpg"])
def test_cmyk_converted(tmp_path, name):
  img = _solid((40, 40), (0, 255, 255, 0), mode="CMYK")  # Full magenta + yellow = red.
  _assert_color(_load_one(tmp_path, img, name, quality=95), RED, tol=6)


def test_grayscale_and_bilevel_converted(tmp_path):
  px = _load_one(tmp_path, _solid((40, 40), 100, mode="L"), "l.png")
  _assert_color(px, (100, 100, 100), tol=0)
  px = _load_one(tmp_path / "1", _solid((40, 40), 1, mode="1"), "one.png")
  _assert_color(px, WHITE, tol=0)


def test_sixteen_bit_grayscale_png_scaled_not_clipped(tmp_path):
  a = np.zeros((40, 40), np.uint16)  # [H, W]
  a[:, :20] = 65535
  a[:, 20:] = 32896  # 128 * 257.
  img = Image.fromarray(a)
  assert img.mode == "I;16"
  px = _load_one(tmp_path, img, "deep.png", resolution=40, center_crop=False)
  _assert_color(px[:, :18], WHITE, tol=0)
  _assert_color(px[:, 22:], (128, 128, 128), tol=0)


def test_sixteen_bit_big_endian_tiff_scaled(tmp_path):
  img = Image.new("I;16B", (40, 40), 65535)
  px = _load_one(tmp_path, img, "deep.tif")
  _assert_color(px, WHITE, tol=0)


def test_thirty_two_bit_integer_image_scaled(tmp_path):
  # Mode "I" holding 16-bit data (as some TIFF/PNG readers produce).
  a = np.full((40, 40), 65535, np.int32)  # [H, W]
  a[:, 20:] = 257 * 64
  img = Image.fromarray(a)
  assert img.mode == "I"
  px = _load_one(tmp_path, img, "deep.tif", resolution=40, center_crop=False)
  _assert_color(px[:, :18], WHITE, tol=0)
  _assert_color(px[:, 22:], (64, 64, 64), tol=0)


@pytest.mark.parametrize("name,kw", [("anim.gif", {"duration": 100, "loop": 0}),
                                     ("anim.webp", {"duration": 100, "lossless": True})])
def test_animated_image_first_frame(tmp_path, name, kw):
  frames = [_solid((40, 40), c) for c in (RED, GREEN, BLUE)]
  folder = tmp_path / "imgs"
  folder.mkdir()
  frames[0].save(folder / name, save_all=True, append_images=frames[1:], **kw)
  with Image.open(folder / name) as check:
    assert getattr(check, "n_frames", 1) == 3
  out = image_loader.load_training_images(str(folder), 32, True)
  _assert_color(out.pixels[0], RED, tol=0)


# ---------------------------------------------------------------------------
# Crop and resize.
# ---------------------------------------------------------------------------


def test_center_crop_takes_centre_square(tmp_path):
  px = _load_one(tmp_path, _thirds(96, 32), "wide.png", resolution=32, center_crop=True)
  _assert_color(px, GREEN, tol=0)
  tall = _thirds(96, 32).rotate(90, expand=True)  # [96 high, 32 wide]: thirds top to bottom.
  px = _load_one(tmp_path / "tall", tall, "tall.png", resolution=16, center_crop=True)
  _assert_color(px, GREEN, tol=0)


def test_no_crop_resize_keeps_full_content(tmp_path):
  px = _load_one(tmp_path, _thirds(96, 32), "wide.png", resolution=48, center_crop=False)
  _assert_color(px[:, :12], RED, tol=2)
  _assert_color(px[:, 20:28], GREEN, tol=2)
  _assert_color(px[:, 36:], BLUE, tol=2)


# ---------------------------------------------------------------------------
# Views.
# ---------------------------------------------------------------------------


def test_view_pixels_order_and_mirror():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)  # [N, R, R, 3]
  pixels[0, 0, 0] = 0
  pixels[0, 0, 1] = 255
  plain = image_loader.view_pixels(pixels, flip=False)
  assert plain.shape == (3, 8, 8, 3) and plain.dtype == np.float32
  np.testing.assert_allclose(plain, pixels / 127.5 - 1.0, atol=1e-6)
  assert plain[0, 0, 0, 0] == -1.0 and plain[0, 0, 1, 0] == 1.0
  views = image_loader.view_pixels(pixels, flip=True)
  assert views.shape == (6, 8, 8, 3) and views.dtype == np.float32
  np.testing.assert_array_equal(views[:3], plain)
  for i in range(3):
    np.testing.assert_array_equal(views[i + 3], plain[i][:, ::-1])
  # The mirror flips left-right (width axis), not top-bottom.
  np.testing.assert_array_equal(views[3][:, -1], plain[0][:, 0])


# ---------------------------------------------------------------------------
# Per-example choices.
# ---------------------------------------------------------------------------

_CHOICE_KW = dict(global_batch_size=8, num_images=5, flip_p=0.5, num_templates=27)


def test_example_choices_deterministic():
  idx = np.arange(8)
  v1, t1 = choices.example_choices(3, 17, idx, **_CHOICE_KW)
  v2, t2 = choices.example_choices(3, 17, idx, **_CHOICE_KW)
  assert v1.dtype == np.int32 and t1.dtype == np.int32 and v1.shape == t1.shape == (8,)
  np.testing.assert_array_equal(v1, v2)
  np.testing.assert_array_equal(t1, t2)
  assert (v1 >= 0).all() and (v1 < 10).all() and (t1 >= 0).all() and (t1 < 27).all()


def test_example_choices_independent_of_batch_split():
  whole_v, whole_t = choices.example_choices(3, 17, np.arange(8), **_CHOICE_KW)
  # Two hosts taking halves.
  halves = [choices.example_choices(3, 17, np.arange(h * 4, h * 4 + 4), **_CHOICE_KW)
            for h in range(2)]
  np.testing.assert_array_equal(np.concatenate([v for v, _ in halves]), whole_v)
  np.testing.assert_array_equal(np.concatenate([t for _, t in halves]), whole_t)
  # Strided ownership (e.g. devices interleaved), one example at a time.
  for g in range(8):
    v, t = choices.example_choices(3, 17, np.array([g]), **_CHOICE_KW)
    assert (v[0], t[0]) == (whole_v[g], whole_t[g])


def test_example_choices_differ_across_steps_and_seeds():
  idx = np.arange(8)
  per_step = [choices.example_choices(0, s, idx, **_CHOICE_KW) for s in range(6)]
  assert len({(v.tobytes(), t.tobytes()) for v, t in per_step}) == 6
  assert len({t.tobytes() for _, t in per_step}) == 6
  a = choices.example_choices(0, 5, idx, **_CHOICE_KW)
  b = choices.example_choices(1, 5, idx, **_CHOICE_KW)
  assert not (np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))


@pytest.mark.parametrize("batch,num_images", [(1, 5), (2, 5), (3, 4), (8, 3), (10, 5)])
def test_example_choices_cover_every_image_each_epoch(batch, num_images):
  steps = 4 * num_images
  stream = np.concatenate([
      choices.example_choices(9, s, np.arange(batch), global_batch_size=batch,
                           num_images=num_images, flip_p=0.5, num_templates=3)[0]
      for s in range(steps)]) % num_images  # [steps * batch]: images, flips removed.
  for e in range(len(stream) // num_images):
    epoch = stream[e * num_images:(e + 1) * num_images]
    assert sorted(epoch.tolist()) == list(range(num_images)), (e, epoch)


def test_example_choices_flip_probability():
  idx = np.arange(64)
  kw = dict(global_batch_size=64, num_images=4, num_templates=17)
  no_flip = [choices.example_choices(1, s, idx, flip_p=0.0, **kw) for s in range(5)]
  assert all((v < 4).all() for v, _ in no_flip)
  all_flip = [choices.example_choices(1, s, idx, flip_p=1.0, **kw) for s in range(5)]
  assert all((v >= 4).all() for v, _ in all_flip)
  # Flipping only moves the view to the mirror; image and template stay.
  for (v0, t0), (v1, t1) in zip(no_flip, all_flip):
    np.testing.assert_array_equal(v0 + 4, v1)
    np.testing.assert_array_equal(t0, t1)
  half = np.concatenate([choices.example_choices(1, s, idx, flip_p=0.5, **kw)[0] for s in range(20)])
  assert 0.4 < (half >= 4).mean() < 0.6


def test_example_choices_use_every_template():
  templates = np.concatenate([
      choices.example_choices(2, s, np.arange(16), global_batch_size=16, num_images=3, flip_p=0.5,
                           num_templates=27)[1] for s in range(40)])
  assert set(templates.tolist()) == set(range(27))


def test_example_choices_reject_bad_arguments():
  # Each refusal names its own argument (not just any DataError).
  with pytest.raises(image_loader.DataError, match=r"global_indices must lie in \[0, 8\), got 8"):
    choices.example_choices(0, 0, np.array([8]), **_CHOICE_KW)
  with pytest.raises(image_loader.DataError, match=r"flip_p must be in \[0, 1\], got 1.5"):
    choices.example_choices(0, 0, np.array([0]), global_batch_size=8, num_images=5, flip_p=1.5,
                         num_templates=3)
  with pytest.raises(image_loader.DataError, match="must be non-negative, got seed=-1"):
    choices.example_choices(-1, 0, np.array([0]), **_CHOICE_KW)
  with pytest.raises(image_loader.DataError, match="must be 1-D"):
    choices.example_choices(0, 0, np.zeros((2, 2), np.int64), **_CHOICE_KW)


# ---------------------------------------------------------------------------
# Templates, prompts and tokens.
# ---------------------------------------------------------------------------


def test_templates_for_object_and_style():
  objects, styles = captions.templates_for("object"), captions.templates_for("style")
  assert objects is captions.OBJECT_TEMPLATES and styles is captions.STYLE_TEMPLATES
  assert 20 <= len(objects) <= 30 and 15 <= len(styles) <= 25
  assert "a photo of a {}" in objects and "a painting in the style of {}" in styles
  for t in objects + styles:
    assert t.count("{}") == 1
  assert len(set(objects)) == len(objects) and len(set(styles)) == len(styles)
  with pytest.raises(image_loader.DataError) as excinfo:
    captions.templates_for("texture")
  _assert_one_line_error(excinfo, "texture", "object", "style")


def test_build_prompts_fill_placeholder():
  templates = captions.templates_for("object")
  prompts = captions.build_prompts(np.array([0, 1, 0], np.int32), templates, "<toy-robot>")
  assert prompts == ["a photo of a <toy-robot>", "a rendering of a <toy-robot>",
                     "a photo of a <toy-robot>"]
  assert captions.build_prompts(np.array([0]), templates, "{odd}") == ["a photo of a {odd}"]
  with pytest.raises(image_loader.DataError, match=f"template index {len(templates)} out of range"):
    captions.build_prompts(np.array([len(templates)]), templates, "x")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
  return tiny_clip_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


def test_tokenize_returns_int32_padded_to_model_max_length(tiny_tokenizer):
  prompts = captions.build_prompts(np.array([0, 5]), captions.templates_for("object"), "toy")
  long_prompt = " ".join(["a photo of a toy"] * 40)
  ids = captions.tokenize(tiny_tokenizer, prompts + [long_prompt])
  assert ids.dtype == np.int32
  assert ids.shape == (3, 77) == (3, tiny_tokenizer.model_max_length)
  assert (ids[:, 0] == tiny_tokenizer.bos_token_id).all()
  # Short prompts end in padding, the long one is cut to 77 ending with eos.
  assert ids[0, -1] == tiny_tokenizer.pad_token_id
  assert ids[2, -1] == tiny_tokenizer.eos_token_id
  decoded = tiny_tokenizer.decode(ids[0], skip_special_tokens=True)
  assert decoded.strip() == "a photo of a toy"


# ---------------------------------------------------------------------------
# Shipped examples.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["toy", "style"])
@pytest.mark.parametrize("center_crop", [True, False])
def test_shipped_examples_load_without_warnings(name, center_crop):
  out = image_loader.load_training_images(str(EXAMPLES / name), 64, center_crop)
  assert out.pixels.shape == (4, 64, 64, 3)
  assert out.warnings == []
  for path in out.paths:
    assert os.path.getsize(path) < 30_000
  # The four pictures are different, not one image repeated.
  flat = out.pixels.reshape(4, -1).astype(int)
  assert all(np.abs(flat[i] - flat[j]).mean() > 10 for i in range(4) for j in range(i))


def test_example_generator_reproduces_shipped_images(tmp_path):
  written = (example_images.draw_example_concept(str(tmp_path / "toy"))
             + example_images.draw_example_style(str(tmp_path / "style")))
  assert len(written) == 8
  for path in written:
    rel = pathlib.Path(path).relative_to(tmp_path)
    with Image.open(path) as fresh, Image.open(EXAMPLES / rel) as shipped:
      assert fresh.size == shipped.size == (128, 128)
      diff = np.abs(np.asarray(fresh.convert("RGB"), np.int16)
                    - np.asarray(shipped.convert("RGB"), np.int16))
      # Tolerance only for resampling differences between Pillow versions.
      assert diff.mean() < 1.0, rel
