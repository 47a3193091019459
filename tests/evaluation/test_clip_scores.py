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


def _plotted(fig):
  """(label, x, y) of each marker and the texts written beside them, from the figure's artists."""
  (ax,) = fig.axes
  points = [(c.get_label(), *map(float, c.get_offsets()[0])) for c in ax.collections]
  return points, [t.get_text() for t in ax.texts]


def test_scatter_png_writes_a_png_of_the_requested_size(tmp_path):
  path = tmp_path / "plot.png"
  path.write_bytes(b"old contents")  # replaced, through a file beside it
  plot.scatter_png([("a", 0.2, 0.8), ("b", 0.3, 0.7)], str(path), size=(900, 560))
  with Image.open(path) as img:
    assert img.format == "PNG" and img.size == (900, 560)
  assert os.listdir(tmp_path) == ["plot.png"]  # no temporary file left
  plot.scatter_png([("a", 0.2, 0.8)], str(path))
  with Image.open(path) as img:
    assert img.size == (960, 600)  # the evaluation's scatter.png


def test_figure_has_one_labelled_point_per_run_on_the_papers_axes():
  points = [("long", 0.21, 0.71), ("short", 0.25, 0.65), ("two words", 0.3, 0.6)]
  fig = plot.figure(points, title="three runs")
  plotted, texts = _plotted(fig)
  assert [p[0] for p in plotted] == ["long", "short", "two words"]
  np.testing.assert_allclose([p[1:] for p in plotted], [p[1:] for p in points])
  assert texts == ["long", "short", "two words"]
  (ax,) = fig.axes
  assert ax.get_xlabel() == plot.X_TITLE and ax.get_ylabel() == plot.Y_TITLE
  assert ax.get_title() == "three runs"
  colours = [tuple(c.get_facecolor()[0]) for c in ax.collections]
  assert len(set(colours)) == 3
  # Every point inside the axes, off their edges.
  (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
  assert all(x0 < x < x1 and y0 < y < y1 for _, x, y in points)


def test_labels_of_points_that_score_alike_do_not_overlap():
  # Two ablations of the world's README table: a hair apart on x, equal on y.
  points = [("abl_none", 0.722, 0.906), ("abl_two_words", 0.684, 0.781),
            ("abl_progressive", 0.713, 0.781), ("word: object", 0.075, 0.156)]
  fig = plot.figure(points, title="close runs", x_title=plot.CHECKER_X_TITLE,
                    y_title=plot.CHECKER_Y_TITLE)
  renderer = fig.canvas.get_renderer()
  (ax,) = fig.axes
  boxes = [t.get_window_extent(renderer) for t in ax.texts]
  assert [t.get_text() for t in ax.texts] == [p[0] for p in points]
  for i, a in enumerate(boxes):
    for b in boxes[i + 1:]:
      assert not a.overlaps(b), (a, b)
  assert ax.texts[0].xyann == (6, 5) and ax.texts[3].xyann == (6, 5)  # alone: the usual place


def test_more_panels_share_the_y_axis_and_give_each_run_one_colour():
  points = [("one", 0.72, 0.47), ("three", 0.70, 0.75)]
  fidelity = [("one", 0.91, 0.47), ("three", 0.84, 0.75)]
  fig = plot.figure(points, title="two measures", x_title=plot.CHECKER_X_TITLE,
                    y_title=plot.CHECKER_Y_TITLE,
                    more=[(plot.CHECKER_FIDELITY_X_TITLE, fidelity)])
  left, right = fig.axes
  assert left.get_xlabel() == plot.CHECKER_X_TITLE
  assert right.get_xlabel() == plot.CHECKER_FIDELITY_X_TITLE
  assert left.get_ylabel() == plot.CHECKER_Y_TITLE and fig.get_suptitle() == "two measures"
  assert right.get_shared_y_axes().joined(left, right)
  for ax, expected in ((left, points), (right, fidelity)):
    plotted = [(c.get_label(), *map(float, c.get_offsets()[0])) for c in ax.collections]
    assert [p[0] for p in plotted] == ["one", "three"]
    np.testing.assert_allclose([p[1:] for p in plotted], [p[1:] for p in expected])
    assert [t.get_text() for t in ax.texts] == ["one", "three"]
  colours = [[tuple(c.get_facecolor()[0]) for c in ax.collections] for ax in fig.axes]
  assert colours[0] == colours[1] and len(set(colours[0])) == 2
  with pytest.raises(ValueError, match="non-finite"):  # every panel is checked
    plot.figure(points, more=[("x", [("one", float("nan"), 0.47)])])


def test_min_span_keeps_runs_a_sample_apart_from_filling_the_panel_and_bounds_hold_it():
  points = [("a", 0.997, 0.53), ("b", 1.0, 0.91)]
  (ax,) = plot.figure(points).axes
  assert ax.get_xlim()[1] - ax.get_xlim()[0] < 0.01  # autoscaled: 1/320 fills the panel
  (ax,) = plot.figure(points, min_span=0.25, bounds=(0.0, 1.0)).axes
  x0, x1 = ax.get_xlim()
  assert x1 - x0 == pytest.approx(0.25)
  assert x1 <= 1.0 + 0.025 + 1e-9 and x0 < 0.997  # moved down to the shares' range, points in
  assert ax.get_ylim()[1] - ax.get_ylim()[0] > 0.38  # wide already: left as autoscaled
  (ax,) = plot.figure([("low", 0.0, 0.5), ("lower", 0.01, 0.6)], min_span=0.25,
                      bounds=(0.0, 1.0)).axes
  assert ax.get_xlim()[0] == pytest.approx(-0.025)  # moved up, at most a tenth below 0
  (ax,) = plot.figure(points, min_span=0.25).axes  # no bounds: centred on the points
  assert sum(ax.get_xlim()) / 2 == pytest.approx(0.9985, abs=1e-3)


def test_labels_move_off_the_markers_of_other_points():
  # abl_per_image's usual place (right of its marker, 5 pt up) covers abl_none's marker.
  points = [("abl_none", 0.722, 0.906), ("abl_per_image", 0.706, 0.875),
            ("word: object", 0.075, 0.156)]
  fig = plot.figure(points, size=(1500, 600), x_title=plot.CHECKER_X_TITLE,
                    y_title=plot.CHECKER_Y_TITLE)
  renderer = fig.canvas.get_renderer()
  (ax,) = fig.axes
  for i, text in enumerate(ax.texts):
    box = text.get_window_extent(renderer)
    for j, (_, x, y) in enumerate(points):
      if j != i:
        px, py = ax.transData.transform((x, y))
        assert not box.contains(px, py), (text.get_text(), points[j][0])
  assert ax.texts[2].xyann == (6, 5)  # alone: the usual place


def test_figure_of_one_point_and_of_identical_points_keeps_every_point():
  fig = plot.figure([("only", 0.25, 0.75)])
  (ax,) = fig.axes
  (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
  assert x0 < 0.25 < x1 and y0 < 0.75 < y1
  plotted, texts = _plotted(plot.figure([("a", 0.3, 0.3), ("b", 0.3, 0.3)]))
  assert [p[0] for p in plotted] == ["a", "b"] and texts == ["a", "b"]


def test_long_labels_are_shortened_beside_the_point_and_kept_whole_on_the_marker():
  label = "run with a very long descriptive label " * 3
  plotted, (text,) = _plotted(plot.figure([(label, 0.2, 0.8)]))
  assert plotted[0][0] == label
  assert len(text) == plot.MAX_LABEL_CHARS and text.endswith("\u2026")
  assert label.startswith(text[:-1])


def test_scatter_png_rejects_bad_points_without_writing(tmp_path):
  path = tmp_path / "plot.png"
  with pytest.raises(ValueError, match="no points"):
    plot.scatter_png([], str(path))
  with pytest.raises(ValueError, match=r"point 1 .*non-finite"):
    plot.scatter_png([("a", 0.2, 0.8), ("b", float("nan"), 0.8)], str(path))
  with pytest.raises(ValueError, match="point 0 must be"):
    plot.scatter_png([("a", 0.2)], str(path))
  with pytest.raises(ValueError, match="at least 100x100"):
    plot.scatter_png([("a", 0.2, 0.8)], str(path), size=(0, 600))
  assert not path.exists()


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


@pytest.mark.parametrize("kind", ["device", "fifo", "huge"])
def test_load_prompt_file_refuses_special_and_huge_files(tmp_path, kind):
  """A device or a pipe would be read forever, a huge file whole: one line instead."""
  if kind == "device":
    path = "/dev/zero"
  elif kind == "fifo":
    path = str(tmp_path / "prompts.fifo")
    os.mkfifo(path)
  else:
    path = str(tmp_path / "huge.txt")
    with open(path, "wb") as f:
      f.truncate(17 * 2**20)  # sparse: 17 MiB of NULs, more than a text input may hold
  with pytest.raises(ValueError) as excinfo:
    prompt_lists.load_prompt_file(path)
  _assert_one_line_error(excinfo, os.path.basename(path), "cannot be read")
