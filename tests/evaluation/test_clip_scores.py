"""Tests for the CLIP evaluation's pure parts: scores, prompts and the scatter plot."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from ti_jax.evaluation import clip_scores, plot, prompt_lists


def _assert_one_line_error(excinfo, *fragments: str) -> None:
  message = str(excinfo.value)
  assert "\n" not in message and "\r" not in message
  for fragment in fragments:
    assert fragment in message, message


# ---------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------


def test_normalize_gives_unit_rows_with_same_direction():
  # The last two rows' squared norms would under/overflow float64.
  x = np.array([[3.0, 4.0], [0.0, -2.0], [1e-170, 1e-170], [3e200, -4e200]])  # [4, 2]
  out = clip_scores.normalize(x)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0)
  np.testing.assert_allclose(out[0], [0.6, 0.8])
  np.testing.assert_allclose(out[1], [0.0, -1.0])
  np.testing.assert_allclose(out[2], [math.sqrt(0.5)] * 2)
  np.testing.assert_allclose(out[3], [0.6, -0.8])


def test_normalize_zero_row_raises_one_line_error():
  with pytest.raises(ValueError) as excinfo:
    clip_scores.normalize(np.array([[1.0, 2.0], [0.0, 0.0]]))
  _assert_one_line_error(excinfo, "row 1 of 2", "zero vector")


def test_normalize_rejects_non_finite_and_wrong_shapes():
  with pytest.raises(ValueError, match="non-finite"):
    clip_scores.normalize(np.array([[1.0, np.nan]]))
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    clip_scores.normalize(np.ones(3))
  with pytest.raises(ValueError, match="empty"):
    clip_scores.normalize(np.ones((0, 4)))


def test_image_similarity_identical_is_one_and_orthogonal_is_zero():
  e = np.eye(4)
  assert clip_scores.image_similarity(e[:1], e[:1]) == pytest.approx(1.0)
  assert clip_scores.image_similarity(e[:1], e[1:2]) == pytest.approx(0.0, abs=1e-12)
  assert clip_scores.image_similarity(e[:1], -e[:1]) == pytest.approx(-1.0)


def test_image_similarity_known_angle_with_unnormalised_inputs():
  theta = 0.7
  generated = np.array([[5.0, 0.0, 0.0]])  # length 5
  training = 0.01 * np.array([[math.cos(theta), math.sin(theta), 0.0]])  # length 0.01
  assert clip_scores.image_similarity(generated, training) == pytest.approx(math.cos(theta))


def test_image_similarity_averages_all_pairs_like_explicit_loop():
  rng = np.random.default_rng(0)
  generated = rng.normal(size=(5, 16)) * rng.uniform(0.1, 10, size=(5, 1))  # [N, D]
  training = rng.normal(size=(3, 16)) + 0.5  # [M, D]
  total = 0.0
  for g in generated:
    for t in training:
      total += float(g @ t) / (np.linalg.norm(g) * np.linalg.norm(t))
  expected = total / (5 * 3)
  assert clip_scores.image_similarity(generated, training) == pytest.approx(expected, rel=1e-12)
  # Not symmetric in how it is called, but the mean over pairs is.
  assert clip_scores.image_similarity(training, generated) == pytest.approx(expected, rel=1e-12)


def test_image_similarity_mismatched_dims_raises():
  with pytest.raises(ValueError) as excinfo:
    clip_scores.image_similarity(np.ones((2, 3)), np.ones((2, 4)))
  _assert_one_line_error(excinfo, "different embedding sizes", "3 vs 4")


def test_image_similarity_zero_training_embedding_raises_naming_it():
  with pytest.raises(ValueError) as excinfo:
    clip_scores.image_similarity(np.ones((2, 3)), np.zeros((1, 3)))
  _assert_one_line_error(excinfo, "training row 0", "zero vector")


def test_text_similarity_is_mean_of_per_image_cosines():
  theta = 1.1
  text = np.array([2.0, 0.0])  # [D]
  generated = np.array([[1.0, 0.0], [0.0, 3.0], [math.cos(theta), math.sin(theta)]])  # [3, D]
  expected = (1.0 + 0.0 + math.cos(theta)) / 3
  assert clip_scores.text_similarity(generated, text) == pytest.approx(expected)
  np.testing.assert_allclose(clip_scores.text_cosines(generated, text),
                             [1.0, 0.0, math.cos(theta)], atol=1e-12)
  # A [1, D] text embedding, as an encoder returns for one prompt, works too.
  assert clip_scores.text_similarity(generated, text[None]) == pytest.approx(expected)


def test_text_similarity_rejects_several_texts_and_zero_text():
  with pytest.raises(ValueError, match=r"one \[D\] embedding"):
    clip_scores.text_similarity(np.ones((2, 3)), np.ones((2, 3)))
  with pytest.raises(ValueError, match=r"text row 0 .* zero vector"):
    clip_scores.text_similarity(np.ones((2, 3)), np.zeros(3))


def test_prompt_score_and_report_aggregate_by_category():
  text = np.array([1.0, 0.0])
  c60 = np.array([0.5, math.sqrt(0.75)])  # cos 0.5 with `text`
  scores = [
      clip_scores.prompt_score("a photo of {} on the moon", "background",
                                np.stack([text, c60]), text),  # mean 0.75, std 0.25
      clip_scores.prompt_score("an oil painting of {}", "style", np.stack([c60]), text),
      clip_scores.prompt_score("{} in a cave", "background", np.stack([text]), text),
  ]
  assert scores[0].text_similarity == pytest.approx(0.75)
  assert scores[0].text_similarity_std == pytest.approx(0.25)
  assert scores[0].num_images == 2
  out = clip_scores.report(0.8, scores, extra={"step": 500})
  assert out["image_similarity"] == 0.8
  assert out["text_similarity"] == pytest.approx((0.75 + 0.5 + 1.0) / 3)
  assert list(out["text_similarity_by_category"]) == ["background", "style"]
  assert out["text_similarity_by_category"]["background"] == pytest.approx((0.75 + 1.0) / 2)
  assert out["text_similarity_by_category"]["style"] == pytest.approx(0.5)
  assert out["num_prompts"] == 3 and out["step"] == 500
  assert out["prompts"][1] == {"template": "an oil painting of {}", "category": "style",
                               "text_similarity": pytest.approx(0.5),
                               "text_similarity_std": 0.0, "num_images": 1,
                               "text_similarity_of_mean": pytest.approx(0.5)}
  assert json.loads(json.dumps(out)) == out  # plain JSON types only


def test_report_rejects_empty_nan_and_clashing_extra():
  score = clip_scores.PromptScore("a {}", "custom", 0.3, 0.0, 1)
  with pytest.raises(ValueError, match="at least one prompt"):
    clip_scores.report(0.5, [])
  with pytest.raises(ValueError, match="finite"):
    clip_scores.report(float("nan"), [score])
  with pytest.raises(ValueError, match="'prompts' would overwrite"):
    clip_scores.report(0.5, [score], extra={"prompts": []})


# ---------------------------------------------------------------------------
# Prompts.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("template, expected", [
    ("A photo of {} on the moon", "A photo of on the moon"),
    ("a photo of {}", "a photo of"),
    ("{} next to a sleeping cat", "next to a sleeping cat"),
    ("a painting of {}, at night", "a painting of, at night"),
    ("  a   photo of  {}   in\ta cave ", "a photo of in a cave"),
    ("a painting in the style of {}.", "a painting in the style of."),
])
def test_without_token_drops_pseudo_word_and_tidies_spaces(template, expected):
  assert prompt_lists.without_token(template) == expected


def test_with_token_inserts_token_literally():
  assert prompt_lists.with_token("a photo of {} on the moon", "<cat-toy>") == (
      "a photo of <cat-toy> on the moon")
  # Braces in the token are kept, not treated as a format field.
  assert prompt_lists.with_token("a {}", "<{x}>") == "a <{x}>"


@pytest.mark.parametrize("bad", ["a photo", "{} and {}", "a photo of {S}", "a {} {0}"])
def test_token_functions_reject_templates_without_exactly_one_placeholder(bad):
  with pytest.raises(ValueError):
    prompt_lists.with_token(bad, "<t>")
  with pytest.raises(ValueError):
    prompt_lists.without_token(bad)


@pytest.mark.parametrize("prop", ["object", "style"])
def test_shipped_prompts_are_valid(prop):
  prompts = prompt_lists.prompts_for(prop)
  assert 15 <= len(prompts) <= 20
  texts = [p.text for p in prompts]
  assert len(set(texts)) == len(texts)
  for p in prompts:
    assert p.text.count("{}") == 1 and p.text.count("{") == 1 and p.text.count("}") == 1
    assert p.category in prompt_lists.CATEGORIES
    assert p.text == p.text.strip() and "  " not in p.text
    # Dropping the pseudo-word leaves an article dangling ("a photo of a on
    # the moon") if one stands right before it.
    assert not any(p.text.lower().startswith(a) or f" {a}" in p.text.lower()
                   for a in ("a {}", "an {}", "the {}")), p.text
    assert prompt_lists.without_token(p.text)  # something left to compare with
  # Every required category is exercised.
  assert {"background", "style", "composition"} <= {p.category for p in prompts}


def test_prompts_for_is_case_insensitive_copy_and_rejects_unknown():
  a = prompt_lists.prompts_for(" Object ")
  a.clear()
  assert prompt_lists.prompts_for("object")  # the shipped list was not emptied
  with pytest.raises(ValueError) as excinfo:
    prompt_lists.prompts_for("texture")
  _assert_one_line_error(excinfo, "'object' or 'style'", "texture")


def test_reconstruction_prompts():
  assert prompt_lists.reconstruction_prompt("object") == "a photo of {}"
  assert prompt_lists.reconstruction_prompt("style") == "a painting in the style of {}"
  with pytest.raises(ValueError):
    prompt_lists.reconstruction_prompt("scene")


def test_load_prompt_file_parses_categories_comments_and_blank_lines(tmp_path):
  path = tmp_path / "prompts.txt"
  path.write_text(
      "\ufeff# my prompts\n"
      "a photo of {} in a cave\n"
      "\n"
      "   # indented comment\n"
      "background\ta photo of {}  on Mars  \n"
      "  my_cat-1 \t {} #1 in the charts\r\n",
      encoding="utf-8")
  prompts = prompt_lists.load_prompt_file(str(path))
  assert prompts == [
      prompt_lists.EvalPrompt("a photo of {} in a cave", "custom"),
      prompt_lists.EvalPrompt("a photo of {} on Mars", "background"),
      prompt_lists.EvalPrompt("{} #1 in the charts", "my_cat-1"),
  ]


@pytest.mark.parametrize("content, fragments", [
    ("# header\na photo of {}\na photo of a dog\n", ["line 3", "exactly once", "found it 0"]),
    ("{} and {}\n", ["line 1", "found it 2"]),
    ("a photo of {}\n\nstyle\ta photo of {} by {name}\n", ["line 3", "'{' or '}'"]),
    ("a photo of {S}\n", ["line 1", "found it 0"]),
    ("style\t\n", ["line 1", "empty prompt"]),
    ("\ta photo of {}\n", ["line 1", "empty category"]),
    ("two words\ta photo of {}\n", ["line 1", "category 'two words'"]),
    ("a photo of {}\nstyle\ta photo  of {}\n", ["line 2", "repeats line 1"]),
    ("# only comments\n\n", ["no prompts"]),
])
def test_load_prompt_file_errors_name_the_line(tmp_path, content, fragments):
  path = tmp_path / "prompts.txt"
  path.write_text(content, encoding="utf-8")
  with pytest.raises(ValueError) as excinfo:
    prompt_lists.load_prompt_file(str(path))
  _assert_one_line_error(excinfo, "prompts.txt", *fragments)


def test_load_prompt_file_missing_and_undecodable(tmp_path):
  with pytest.raises(ValueError) as excinfo:
    prompt_lists.load_prompt_file(str(tmp_path / "nope.txt"))
  _assert_one_line_error(excinfo, "nope.txt", "does not exist")
  path = tmp_path / "latin1.txt"
  path.write_bytes("caf\xe9 {}\n".encode("latin-1"))
  with pytest.raises(ValueError) as excinfo:
    prompt_lists.load_prompt_file(str(path))
  _assert_one_line_error(excinfo, "latin1.txt", "not UTF-8")


# ---------------------------------------------------------------------------
# Scatter plot.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("values", [[0.5], [0.3, 0.3], [0.21, 0.27, 0.33], [0.0, 1.0],
                                    [-0.05, 0.012], [0.6004, 0.6021]])
def test_nice_range_covers_data_on_round_ticks(values):
  low, high, step = plot.nice_range(values)
  assert low < min(values) and high > max(values)
  for bound in (low, high):
    assert abs(bound / step - round(bound / step)) < 1e-6
  assert 2 <= round((high - low) / step) <= 6
  mantissa = step / 10 ** math.floor(math.log10(step))
  assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5))


def test_data_to_pixel_maps_range_corners_to_plot_box():
  layout = plot.layout_for([("a", 0.2, 0.7), ("b", 0.3, 0.8)])
  left, top, right, bottom = layout.plot_box
  assert plot.data_to_pixel(layout, layout.x_range[0], layout.y_range[0]) == (left, bottom)
  assert plot.data_to_pixel(layout, layout.x_range[1], layout.y_range[1]) == (right, top)
  # Higher image similarity is higher on the image (smaller row).
  assert plot.data_to_pixel(layout, 0.25, 0.8)[1] < plot.data_to_pixel(
      layout, 0.25, 0.7)[1]


def _pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
  return img.getpixel(xy)[:3]


def test_scatter_png_draws_each_point_in_its_colour(tmp_path):
  rng = np.random.default_rng(1)
  # Twelve points on a jittered grid, so no two markers overlap.
  points = [(f"run {i} " + "with a very long descriptive label " * 3,
             0.18 + 0.012 * (i % 4) + 0.002 * rng.random(),
             0.62 + 0.05 * (i // 4) + 0.005 * rng.random()) for i in range(12)]
  path = tmp_path / "plot.png"
  layout = plot.scatter_png(points, str(path), title="twelve runs", size=(900, 560))
  img = Image.open(path)
  assert img.format == "PNG" and img.size == (900, 560)
  img = img.convert("RGB")
  colours = [plot.color_for(i) for i in range(len(points))]
  assert len(set(colours)) == len(points)
  for i, (_, x, y) in enumerate(points):
    assert _pixel(img, plot.data_to_pixel(layout, x, y)) == colours[i]
  assert layout.legend_rows == len(points)
  assert [p for p in os.listdir(tmp_path)] == ["plot.png"]  # no temporary file left


def test_scatter_png_one_point_and_identical_points(tmp_path):
  layout = plot.scatter_png([("only", 0.25, 0.75)], str(tmp_path / "one.png"))
  img = Image.open(tmp_path / "one.png").convert("RGB")
  xy = plot.data_to_pixel(layout, 0.25, 0.75)
  assert _pixel(img, xy) == plot.color_for(0)
  # One point sits in the middle of its axes, not on an edge.
  left, top, right, bottom = layout.plot_box
  assert abs(xy[0] - (left + right) / 2) <= 2 and abs(xy[1] - (top + bottom) / 2) <= 2

  layout = plot.scatter_png([("a", 0.3, 0.3), ("b", 0.3, 0.3)], str(tmp_path / "same.png"))
  img = Image.open(tmp_path / "same.png").convert("RGB")
  # The later point is drawn over the earlier one; both stay in the legend.
  assert _pixel(img, plot.data_to_pixel(layout, 0.3, 0.3)) == plot.color_for(1)
  assert layout.legend_rows == 2


def test_scatter_png_many_points_legend_overflows_into_summary_row(tmp_path):
  points = [(f"p{i}", i / 60, 1 - i / 60) for i in range(60)]
  layout = plot.scatter_png(points, str(tmp_path / "many.png"))
  assert 0 < layout.legend_rows < 60
  assert layout.legend_box[3] <= layout.plot_box[3]  # the legend fits beside the plot


def test_scatter_png_replaces_existing_file_atomically(tmp_path):
  path = tmp_path / "plot.png"
  path.write_bytes(b"old contents")
  plot.scatter_png([("a", 0.2, 0.8)], str(path))
  assert Image.open(path).format == "PNG"
  assert os.listdir(tmp_path) == ["plot.png"]


def test_scatter_png_rejects_bad_points_without_writing(tmp_path):
  path = tmp_path / "plot.png"
  with pytest.raises(ValueError, match="no points"):
    plot.scatter_png([], str(path))
  with pytest.raises(ValueError, match=r"point 1 .*non-finite"):
    plot.scatter_png([("a", 0.2, 0.8), ("b", float("nan"), 0.8)], str(path))
  with pytest.raises(ValueError, match="point 0 must be"):
    plot.scatter_png([("a", 0.2)], str(path))
  assert not path.exists()


def test_truncate_shortens_long_labels_to_fit():
  font = plot._font(13)
  label = "a label that is much too long to fit in the legend box " * 3
  out = plot._truncate(font, label, 120)
  assert out.endswith("\u2026") and font.getlength(out) <= 120
  assert plot._truncate(font, "short", 120) == "short"


def test_text_similarity_of_mean_is_the_papers_cosine_of_the_mean_embedding():
  # Two images at 90 degrees, the text along the first: per-image mean 0.5,
  # cosine of the mean embedding 1/sqrt(2).
  images = np.array([[2.0, 0.0], [0.0, 3.0]])
  text = np.array([1.0, 0.0])
  assert clip_scores.text_similarity(images, text) == pytest.approx(0.5)
  assert clip_scores.text_similarity_of_mean(images, text) == pytest.approx(2 ** -0.5)
  score = clip_scores.prompt_score("a {}", "style", images, text)
  assert score.text_similarity_of_mean == pytest.approx(2 ** -0.5)
  report = clip_scores.report(0.5, [score])
  assert report["text_similarity_of_mean"] == pytest.approx(2 ** -0.5)
