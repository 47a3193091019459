"""The world's attribute checker: accurate on fresh renders, deterministic, and its two shares."""

import numpy as np
import pytest

from ti_jax.world import checker as checker_lib
from ti_jax.world import scenes


@pytest.fixture(scope="module")
def shipped():
  return checker_lib.load_shipped()


def test_shipped_checker_names_every_attribute_of_fresh_renders(shipped):
  accuracy = checker_lib.accuracy(shipped, seed=424242, count=600)
  assert all(a >= 0.95 for a in accuracy.values()), accuracy


def test_training_is_deterministic_and_round_trips_through_files(tmp_path):
  a = checker_lib.train_checker(seed=3, steps=2, batch_size=8)
  b = checker_lib.train_checker(seed=3, steps=2, batch_size=8)
  np.testing.assert_array_equal(a.params["params"]["head_shape"]["kernel"],
                                b.params["params"]["head_shape"]["kernel"])
  checker_lib.save(a, str(tmp_path))
  loaded = checker_lib.load(str(tmp_path))
  images, _, _ = scenes.batch(5, 0, 16)
  for k, v in a.predict(images).items():
    np.testing.assert_array_equal(loaded.predict(images)[k], v)


def test_reconstruction_and_editability_are_shares_of_images_showing_the_attributes(shipped):
  crosses = scenes.concept_scenes(11, 6, background="green")
  circles = [scenes.Scene("circle", "red", "blue", "large", "middle")] * 2
  images = np.stack([scenes.render(s) for s in crosses + circles])  # [8, 32, 32, 3]
  assert checker_lib.reconstruction(shipped, images, "cross") == pytest.approx(6 / 8)
  assert checker_lib.reconstruction(shipped, images, {"shape": "circle"}) == pytest.approx(2 / 8)
  assert checker_lib.editability(shipped, images, "cross", "background=green") == pytest.approx(6 / 8)
  assert checker_lib.editability(shipped, images, "cross", "background=blue") == 0.0


def test_ambiguous_or_unknown_attributes_are_one_line_user_errors():
  for spec in ("red", "banana", "shape=banana"):
    with pytest.raises(checker_lib.CheckerError) as e:
      checker_lib.parse_attributes(spec)
    assert "\n" not in str(e.value)
  assert checker_lib.parse_attributes("outlined, size=small") == {"style": "outlined", "size": "small"}


def test_missing_checker_folder_is_a_user_error(tmp_path):
  with pytest.raises(checker_lib.CheckerError, match="no world checker"):
    checker_lib.load(str(tmp_path))
