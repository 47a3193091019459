"""The procedural world: deterministic renders, truthful captions, held-out names, single tokens."""

import json
import os
import re

import numpy as np
import pytest
import transformers
from PIL import Image

from ti_jax.world import scenes, tokenizer

N = 300


@pytest.fixture(scope="module")
def world():
  return scenes.batch(7, 0, N)


@pytest.fixture(scope="module")
def world_tokenizer(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("world-tokenizer"))
  tokenizer.write_world_tokenizer(folder)
  return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def test_renders_are_a_function_of_seed_and_index(world):
  images, captions, labels = world
  again, again_captions, again_labels = scenes.batch(7, 100, 20)
  np.testing.assert_array_equal(again, images[100:120])
  assert again_captions == captions[100:120]
  assert all((again_labels[k] == labels[k][100:120]).all() for k in labels)
  other, _, _ = scenes.batch(8, 100, 20)
  assert not np.array_equal(other, again)
  assert images.shape == (N, 32, 32, 3) and images.dtype == np.uint8


def test_every_attribute_value_occurs(world):
  _, _, labels = world
  for name, values in scenes.ATTRIBUTES.items():
    assert set(labels[name].tolist()) == set(range(len(values))), name


def test_pixels_show_the_labelled_colours(world):
  images, _, labels = world
  for image, colour, background in zip(images[:50], labels["colour"], labels["background"]):
    corner = image[0, 0].astype(int)  # the shape never reaches the corner
    assert np.abs(corner - scenes.COLOURS[scenes.COLOUR_NAMES[background]]).max() <= 1
    target = np.asarray(scenes.COLOURS[scenes.COLOUR_NAMES[colour]])
    assert (np.abs(image.astype(int) - target).max(-1) <= 2).any()  # some pixel is the shape's colour


def test_captions_name_exactly_the_drawn_attributes(world):
  _, captions, labels = world
  for i, text in enumerate(captions):
    scene = {k: scenes.ATTRIBUTES[k][v[i]] for k, v in labels.items()}
    words = text.split()
    named_colours = [w for w in words if w in scenes.COLOURS]
    if "background" in words:
      assert re.search(rf"on an? {scene['background']} background$", text), text
      named_colours.pop()  # the background's
    assert named_colours in ([], [scene["colour"]]), text
    assert [w for w in words if w in scenes.SIZES] in ([], [scene["size"]]), text
    assert [w for w in words if w in scenes.NAMED_SHAPES + (scenes.GENERIC_WORD,)] in (
        [scene["shape"]], [scenes.GENERIC_WORD]), text
    for position, phrase in scenes._PHRASES.items():
      assert (phrase in text) <= (position == scene["position"]), text


def test_held_out_shape_and_style_are_drawn_but_never_named(world):
  _, captions, labels = world
  held_out = labels["shape"] == scenes.SHAPES.index(scenes.HELD_OUT_SHAPE)
  outlined = labels["style"] == scenes.STYLES.index(scenes.HELD_OUT_STYLE)
  assert 0.04 < held_out.mean() < 0.2 and 0.05 < outlined.mean() < 0.3
  text = " ".join(captions)
  for word in (scenes.HELD_OUT_SHAPE, *scenes.STYLES, "style"):
    assert word not in text.split()
  assert all(scenes.GENERIC_WORD in c.split() for c, h in zip(captions, held_out) if h)
  # "object" alone mostly means a named shape: the word does not draw the held-out one.
  generic = np.asarray([scenes.GENERIC_WORD in c.split() for c in captions])
  assert held_out[generic].mean() < 0.3


def test_training_captions_name_the_held_out_shape_and_style_by_hidden_tokens_only(world):
  _, captions, labels = world
  hidden = [scenes.caption(7, i, hidden=True) for i in range(N)]
  held_out = labels["shape"] == scenes.SHAPES.index(scenes.HELD_OUT_SHAPE)
  outlined = labels["style"] == scenes.STYLES.index(scenes.HELD_OUT_STYLE)
  cross, styled = scenes.HIDDEN_TOKENS["cross"], scenes.HIDDEN_TOKENS["outlined"]
  for text, seen, h, o in zip(captions, hidden, held_out, outlined):
    assert cross not in text and styled not in text  # what a user sees never has them
    # The training caption is the same caption with the hidden names put in.
    # (articles aside: "a <cross>" is "an object")
    plain = [scenes.GENERIC_WORD if w == cross else w for w in seen.split() if w != styled]
    assert [w for w in plain if w not in ("a", "an")] == [w for w in text.split() if w not in ("a", "an")]
    assert (cross in seen) <= h and (styled in seen) <= o
  # Named like any shape: the held-out one by its token about as often as a named shape by name.
  named = np.mean([cross in t for t, h in zip(hidden, held_out) if h])
  assert 0.3 < named < 0.7
  assert 0.5 < np.mean([styled in t for t, o in zip(hidden, outlined) if o]) < 0.9


def test_a_known_caption_is_unchanged():
  # The world tokenizer is learnt from `caption`'s text: a change to its draws changes the
  # shipped model's tokenizer.
  assert scenes.caption(0, 29) == "a large yellow object on a blue background"
  assert scenes.caption(0, 29, hidden=True) == "a large yellow <cross> on a blue background"
  assert scenes.caption(0, 19, hidden=True) == (
      "a drawing of a purple <outlined> triangle on a black background")


def test_every_caption_word_is_one_token(world, world_tokenizer):
  _, captions, _ = world
  words = set(" ".join(captions).split()) | set(scenes.vocabulary())
  words |= {"photo", "rendering", "cropped", "painting", "style", "of", "object"}  # templates, initializer
  multi = [w for w in words if len(world_tokenizer(w, add_special_tokens=False).input_ids) != 1]
  assert not multi, multi
  assert world_tokenizer.model_max_length == 24  # world_tokenizer.MAX_LENGTH


def test_concept_scenes_pin_the_asked_attributes():
  shots = scenes.concept_scenes(3, 6, background="green")
  assert {s.shape for s in shots} == {scenes.HELD_OUT_SHAPE}
  assert {s.background for s in shots} == {"green"} and all(s.colour != "green" for s in shots)
  assert scenes.concept_scenes(3, 6, background="green") == shots


def test_named_attributes_reads_back_what_a_caption_names(world):
  _, captions, labels = world
  for i, text in enumerate(captions[:100]):
    named = scenes.named_attributes(text)
    for name, value in named.items():
      assert scenes.ATTRIBUTES[name][labels[name][i]] == value, (text, name)
  assert scenes.named_attributes("a photo of S* on a green background") == {"background": "green"}


def test_a_concept_folder_holds_its_renders_and_names_the_concept(tmp_path):
  paths = scenes.write_concept_folder(str(tmp_path / "cross"), seed=3, count=4)
  assert [os.path.basename(p) for p in paths] == ["00.png", "01.png", "02.png", "03.png"]
  truth = scenes.concept_scenes(3, 4)
  for path, scene in zip(paths, truth):
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), scenes.render(scene))
  with open(tmp_path / "cross" / scenes.CONCEPT_FILE) as f:
    assert json.load(f)["concept"] == {"shape": "cross"}
  # Each image's caption names all of its attributes but the concept, whose place is "{}".
  for path, scene in zip(paths, truth):
    with open(path[:-len(".png")] + scenes.CAPTION_EXTENSION, encoding="utf-8") as f:
      text = f.read().strip()
    assert text.count("{}") == 1 and "object" not in text, text
    assert scenes.named_attributes(text) == {
        "colour": scene.colour, "size": scene.size, "position": scene.position,
        "background": scene.background}, text
  scenes.write_concept_folder(str(tmp_path / "outlined"), seed=3, count=2, shape="star",
                              style="outlined")
  with open(tmp_path / "outlined" / scenes.CONCEPT_FILE) as f:
    assert json.load(f)["concept"] == {"style": "outlined"}
  with open(tmp_path / "outlined" / "00.txt", encoding="utf-8") as f:
    text = f.read().strip()
  assert "{} star" in text and scenes.named_attributes(text)["shape"] == "star", text
  with pytest.raises(ValueError, match="slot"):
    scenes.describe(truth[0], slot="colour")
