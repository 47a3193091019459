"""Validation images during training: the prompt names the vectors trained so far."""

import pytest
from conftest import config_module, model_stub, tiny_clip_tokenizer

from ti_jax.data import captions
from ti_jax.embeddings import pseudo_words
from ti_jax.training import train_lib, validation


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  """A tiny CLIP tokenizer holding the 3 tokens of <toy>, and their ids."""
  tok = tiny_clip_tokenizer(tmp_path_factory.mktemp("tok") / "tok")
  return tok, pseudo_words.add_placeholder_tokens(tok, "<toy>", 3)


def _config(**overrides):
  c = config_module("object").get_config("tiny")
  c.update({"placeholder_token": "<toy>", "validation_prompt": "a photo of {} on a table",
            "max_train_steps": 10, **overrides})
  return c


def _learned_ids_in_prompt(tokenizer, config, step, token_ids):
  ids = captions.tokenize(tokenizer, [validation.prompt(config, step)])[0]  # [T]
  return [i for i in ids.tolist() if i in token_ids]


def test_validation_prompt_uses_only_the_active_vectors_under_progressive_words(tokenizer):
  """num_vectors=3, progressive_words=2: 1 vector at steps 0-1, 2 at steps 2-3, 3 from step 4,
  the same count the training prompts, checkpoints and export use."""
  tokenizer, token_ids = tokenizer
  c = _config(num_vectors=3, progressive_words=2)
  for step in (1, 2, 3, 4, 10):
    active = train_lib.active_vectors(step, 3, 2)
    assert _learned_ids_in_prompt(tokenizer, c, step, token_ids) == token_ids[:active], step
  # Step 2 has 2 of 3 vectors active: the prompt names exactly the first two.
  assert validation.prompt(c, 2) == "a photo of <toy> <toy>_1 on a table"


def test_validation_prompt_uses_every_vector_without_progressive_words(tokenizer):
  tokenizer, token_ids = tokenizer
  c = _config(num_vectors=3, progressive_words=0)
  assert _learned_ids_in_prompt(tokenizer, c, 1, token_ids) == token_ids


def test_validation_is_due_every_validation_steps_and_at_the_last_step():
  c = _config(validation_steps=4, max_train_steps=10)
  assert [s for s in range(1, 11) if validation.is_due(c, s)] == [4, 8, 10]


def test_no_validation_without_a_prompt():
  assert validation.make(_config(validation_prompt=""), None, [], [], "w", {}) is None
  made = validation.make(_config(), model_stub(), [[5]], [], "w", {})
  assert made is not None and made.out_dir.endswith("validation") and made.generator is None
  assert made.token_ids == ([5],)
