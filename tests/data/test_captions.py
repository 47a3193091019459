"""Caption files, templates files and the per-image caption token ids (ti_jax.data.captions)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from conftest import tiny_clip_tokenizer
from PIL import Image

from ti_jax.data import captions, image_loader


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  tok = tiny_clip_tokenizer(tmp_path_factory.mktemp("tok") / "tok")
  tok.add_tokens(["<toy>", "<toy>_1", "<toy>_image0", "<toy>_image1", "<toy>_image2"])
  return tok


def _folder(tmp_path, names):
  folder = tmp_path / "imgs"
  folder.mkdir()
  for i, name in enumerate(names):
    Image.new("RGB", (40 + 8 * i, 48), (10 * i, 0, 0)).save(folder / name)
  return folder


def _decode(tok, row):
  return tok.decode(row, skip_special_tokens=True).replace(" ", "")


def test_caption_file_beside_image_is_read_first_nonblank_line(tmp_path):
  folder = _folder(tmp_path, ["a.png", "b.png", "c.png"])
  (folder / "a.txt").write_bytes("\ufeff\n  a photo of {} on grass  \nsecond line\n".encode())
  (folder / "c.txt").write_text("<toy> in snow")
  out = image_loader.load_training_images(str(folder), 32, True, caption_extension=".txt")
  assert [c and (c.text, c.line) for c in out.captions] == [
      ("a photo of {} on grass", 2), None, ("<toy> in snow", 1)]
  assert out.captions[0].path == str(folder / "a.txt")
  assert out.sizes == [(40, 48), (48, 48), (56, 48)]  # as read, before the crop
  # Without an extension no caption is read, even with the files there.
  assert image_loader.load_training_images(str(folder), 32, True).captions == []


@pytest.mark.parametrize("content,needle", [
    (b"\n  \n", "is empty"), (b"\xff\xfe caption", "not UTF-8 text")])
def test_bad_caption_file_is_one_line_error_naming_it(tmp_path, content, needle):
  folder = _folder(tmp_path, ["a.png"])
  (folder / "a.txt").write_bytes(content)
  with pytest.raises(image_loader.DataError) as err:
    image_loader.load_training_images(str(folder), 32, True, caption_extension=".txt")
  assert needle in str(err.value) and str(folder / "a.txt") in str(err.value)
  assert "\n" not in str(err.value)


def test_slot_is_braces_or_the_placeholder_and_missing_slot_names_file_and_line():
  assert captions.as_template("a <toy> on a {x}", "<toy>", "f:1") == "a {} on a {x}"
  assert captions.fill("a {} on a {x}", "<toy> <toy>_1") == "a <toy> <toy>_1 on a {x}"
  with pytest.raises(image_loader.DataError) as err:
    captions.as_template("a photo of a dog", "<toy>", "caps/a.txt:3")
  assert str(err.value).startswith("caps/a.txt:3: 'a photo of a dog' has no slot")


def test_templates_file_one_per_line_and_bad_line_named(tmp_path):
  path = tmp_path / "t.txt"
  path.write_text("a photo of {}\n\n  <toy> at night \n")
  assert captions.read_templates_file(str(path), "<toy>") == ("a photo of {}", "{} at night")
  path.write_text("a photo of {}\nno slot here\n")
  with pytest.raises(image_loader.DataError, match=f"^{path}:2: 'no slot here' has no slot"):
    captions.read_templates_file(str(path), "<toy>")
  path.write_text("\n \n")
  with pytest.raises(image_loader.DataError, match="holds no template"):
    captions.read_templates_file(str(path), "<toy>")
  with pytest.raises(image_loader.DataError, match="cannot read templates_file"):
    captions.read_templates_file(str(tmp_path / "missing.txt"), "<toy>")


def _within(fn, timeout=30):
  """`fn()` in a thread; its exception (or None). Fails if it has not returned in time."""
  out = []

  def target():
    try:
      fn()
      out.append(None)
    except Exception as e:  # pylint: disable=broad-except  # returned to the test
      out.append(e)
  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(timeout)
  assert not thread.is_alive(), "still reading after 30 s"
  return out[0]


@pytest.mark.parametrize("kind", ["too_large", "pipe"])
def test_templates_file_too_large_or_special_is_refused_in_one_line(tmp_path, kind):
  """A templates file was read whole (/dev/zero ran out of memory, a named pipe waited
  forever for a writer)."""
  path = tmp_path / "t.txt"
  if kind == "too_large":
    line = b"a photo of {}\n"
    path.write_bytes(line * (captions.MAX_TEMPLATES_BYTES // len(line) + 1))
    needle = "more than the 1 MiB a text input may hold"
  else:
    os.mkfifo(path)
    needle = "a named pipe, not a regular file"
  err = _within(lambda: captions.read_templates_file(str(path), "<toy>"))
  assert isinstance(err, image_loader.DataError), err
  assert f"cannot read templates_file {path}: " in str(err) and needle in str(err)
  assert "\n" not in str(err)


def test_caption_file_too_large_is_refused_naming_it(tmp_path):
  folder = _folder(tmp_path, ["a.png"])
  with open(folder / "a.txt", "wb") as f:
    f.write(b"a photo of {}\n")
    f.truncate(17 * 2**20)  # sparse: 17 MiB, above fileio.MAX_TEXT_BYTES
  with pytest.raises(image_loader.DataError) as err:
    image_loader.load_training_images(str(folder), 32, True, caption_extension=".txt")
  assert f"cannot read caption file {folder / 'a.txt'}: 17 MiB, more than the 16 MiB" in str(
      err.value)


def test_prompt_texts_sha256_follows_the_texts():
  cap = image_loader.Caption("a.txt", "a {} on grass", 1)
  default = captions.prompt_texts("object", "", "<toy>", [], 2)
  assert default.captions == [None, None] and default.sha256() == ""
  one = captions.prompt_texts("object", "", "<toy>", [cap, None], 2)
  other = captions.prompt_texts("object", "", "<toy>",
                                [image_loader.Caption("a.txt", "a {} on sand", 1), None], 2)
  assert one.captions == ["a {} on grass", None] and one.caption_files == ["a.txt", None]
  assert len(one.sha256()) == 64 and one.sha256() != other.sha256()
  assert one.sha256() == captions.prompt_texts("object", "", "<toy>", [cap, None], 2).sha256()


def test_batch_ids_take_the_caption_of_captioned_images_and_templates_otherwise(tokenizer):
  templates = ("a photo of {}", "a render of {}")
  tokens, image_tokens = ["<toy>", "<toy>_1"], ["<toy>_image0", "<toy>_image1", "<toy>_image2"]
  image_captions = ["{} on grass", None, "my {} in snow"]
  plain, per_image = captions.prompt_tables(tokenizer, templates, tokens, image_tokens)
  cap, image_cap = captions.caption_tables(tokenizer, image_captions, tokens, image_tokens)
  assert cap.shape == image_cap.shape == (2, 3, 77)
  captioned = np.array([True, False, True])
  view = np.array([0, 1, 2, 3, 4, 5])  # 3..5 mirror images 0..2: same captions
  template = np.array([0, 1, 0, 1, 0, 1])
  no_mix = np.zeros(6, bool)
  for active, text in ((1, "<toy>"), (2, "<toy><toy>_1")):
    ids = captions.batch_input_ids(plain, per_image, active, template, view, no_mix, captioned,
                                   cap, image_cap)
    got = [_decode(tokenizer, r) for r in ids]
    assert got == [f"{text}ongrass", f"arenderof{text}", f"my{text}insnow",
                   f"{text}ongrass", f"aphotoof{text}", f"my{text}insnow"]
  # Per-image prompts: "S* with S_i" fills the caption's slot too.
  mixed = np.array([True, True, False, False, False, True])
  ids = captions.batch_input_ids(plain, per_image, 1, template, view, mixed, captioned, cap,
                                 image_cap)
  got = [_decode(tokenizer, r) for r in ids]
  assert got[0] == "<toy>with<toy>_image0ongrass"
  assert got[1] == "arenderof<toy>with<toy>_image1"
  assert got[5] == "my<toy>with<toy>_image2insnow"
  # Without captions the ids are those of the templates alone.
  np.testing.assert_array_equal(
      captions.batch_input_ids(plain, None, 1, template, view, None),
      plain[0][template])


def test_a_templates_file_is_hashed_even_without_captions(tmp_path):
  path = tmp_path / "my object templates"  # a name like the built-in source's
  path.write_text("a photo of {}\n")
  texts = captions.prompt_texts("object", str(path), "<toy>", [], 1)
  assert texts.templates == ("a photo of {}",) and texts.source == str(path)
  assert len(texts.sha256()) == 64
  path.write_text("a photo of the {}\n")
  assert captions.prompt_texts("object", str(path), "<toy>", [], 1).sha256() != texts.sha256()
