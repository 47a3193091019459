"""ti_jax's Flax T5 encoder equals transformers' `T5EncoderModel` (FLUX.1's text_encoder_2).

A tiny random T5 v1.1 encoder is saved with `save_pretrained` and its safetensors file
converted by `convert.T5_ENCODER`, so these tests also prove the key mapping. fp32 must
match to 1e-5 relative (max |a-b| / max |ref|); bf16 to 3e-2, reported beside
transformers' own bf16 error (2.0e-2 on this model; ours 2.4e-2). The full-size T5-XXL
encoder is checked on shapes alone (torch's `meta` device and `jax.eval_shape`).
"""

import glob
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import PARITY_FIGURES, record_parity
from torch_reference import perturb_, rel_err
from transformers import T5Config, T5TokenizerFast
from transformers import T5EncoderModel as TorchT5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention as TorchT5Attention

from ti_jax.embeddings import pseudo_words
from ti_jax.models import t5
from ti_jax.models.config_utils import UnsupportedConfigError
from ti_jax.weights import convert, presets, safetensors_io
from ti_jax.weights.tiny_t5_tokenizer import write_tiny_t5_tokenizer

TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Longer than max_distance (128), so the far buckets and their clipping are exercised.
LENGTH = 150
# Tokens per row; the rest is padding (id 0), masked out of the keys.
LENGTHS = (LENGTH, 37)
# transformers' parameter count of google/t5-v1_1-xxl's encoder (shared table included once).
XXL_PARAMS = 4_762_310_656


def _torch_config(cfg: dict) -> T5Config:
  return T5Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})


def _flax_shapes(module):
  init = lambda rng: module.init(rng, jnp.zeros((1, 1), jnp.int32))
  return jax.eval_shape(init, jax.random.key(0))["params"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(torch model, folder it was saved to, its safetensors state dict)."""
  folder = str(tmp_path_factory.mktemp("t5"))
  torch.manual_seed(0)
  model = perturb_(TorchT5EncoderModel(_torch_config(presets.TINY_T5_CONFIG)), seed=0)
  with torch.no_grad():
    # T5 does not scale its logits by 1/sqrt(d_kv): trained weights (and T5's own init) carry
    # that factor in `q`. Without it the random logits are sqrt(d_kv) too large and the bf16
    # figures (ours and transformers' alike, ~5e-2) would measure that, not the implementation.
    for name, p in model.named_parameters():
      if name.endswith("SelfAttention.q.weight"):
        p.mul_(presets.TINY_T5_CONFIG["d_kv"] ** -0.5)
  model.save_pretrained(folder, safe_serialization=True)
  (path,) = glob.glob(os.path.join(folder, "*.safetensors"))
  return model, folder, safetensors_io.load(path)


@pytest.fixture(scope="module")
def loaded(saved):
  """dtype name -> (Flax module, params converted from the saved file)."""
  _, _, state = saved
  out = {}
  for name, dt in DTYPES.items():
    module = t5.T5EncoderModel(t5.T5EncoderConfig.from_transformers(presets.TINY_T5_CONFIG),
                               dtype=dt, param_dtype=dt)
    params = convert.convert_torch_state_dict(convert.T5_ENCODER, state, _flax_shapes(module),
                                              dtype=dt)
    out[name] = module, params
  return out


def _inputs():
  """Random token ids `[2, LENGTH]` (never the pad id 0 inside a row) and the padding mask."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1, presets.TINY_T5_CONFIG["vocab_size"], (len(LENGTHS), LENGTH))
  mask = (np.arange(LENGTH)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
  return ids * mask, mask


def _torch_run(model, ids, mask, inputs_embeds=None):
  with torch.no_grad():
    kw = ({"input_ids": torch.from_numpy(ids)} if inputs_embeds is None
          else {"inputs_embeds": torch.from_numpy(inputs_embeds)})
    return model(attention_mask=torch.from_numpy(mask), **kw).last_hidden_state.float().numpy()


def test_saved_file_holds_the_shared_table_once(saved):
  """transformers saves the tied table as `shared.weight`; the spec ignores its alias."""
  _, _, state = saved
  assert "shared.weight" in state
  assert not any(k.startswith("decoder.") for k in state)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_last_hidden_state_with_padding_matches_transformers(saved, loaded, dtype):
  model, folder, _ = saved
  module, params = loaded[dtype]
  ids, mask = _inputs()
  ref = _torch_run(model, ids, mask)
  out = module.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  assert out.shape == (len(LENGTHS), LENGTH, presets.TINY_T5_CONFIG["d_model"])
  assert out.dtype == DTYPES[dtype]
  record_parity(f"tiny-t5 encoder {dtype}", rel_err(out.astype(jnp.float32), ref),
                TOLERANCE[dtype])
  if dtype == "bfloat16":
    # Context for the bf16 figure: transformers' own bf16 against its fp32 self, loaded as
    # FLUX's pipeline loads it.
    own = TorchT5EncoderModel.from_pretrained(folder, dtype=torch.bfloat16).eval()
    PARITY_FIGURES.append(("tiny-t5 encoder bfloat16: transformers' own bf16 (context)",
                           rel_err(_torch_run(own, ids, mask), ref), TOLERANCE[dtype]))


def test_tiny_tokenizer_prompts_match_transformers(saved, loaded, tmp_path):
  """The tiny T5 tokenizer's padded prompts and mask through both encoders."""
  model, _, _ = saved
  module, params = loaded["float32"]
  write_tiny_t5_tokenizer(str(tmp_path))
  tokenizer = T5TokenizerFast.from_pretrained(str(tmp_path))
  batch = tokenizer(["a painting in the style of a cat", "a photo of a red toy, zebra"],
                    padding="max_length", max_length=24, truncation=True, return_tensors="np")
  ref = _torch_run(model, batch.input_ids, batch.attention_mask)
  out = module.apply({"params": params}, jnp.asarray(batch.input_ids),
                     attention_mask=jnp.asarray(batch.attention_mask))
  record_parity("tiny-t5 encoder float32 (tiny tokenizer)", rel_err(out, ref),
                TOLERANCE["float32"])


def test_padding_is_masked_out(loaded):
  """Tokens behind the mask do not change the others' states."""
  module, params = loaded["float32"]
  ids, mask = _inputs()
  other = np.where(mask == 1, ids, 5)
  run = lambda i: np.asarray(module.apply({"params": params}, jnp.asarray(i),
                                          attention_mask=jnp.asarray(mask)))
  a, b = run(ids), run(other)
  n = LENGTHS[1]
  np.testing.assert_array_equal(a[1, :n], b[1, :n])
  assert np.abs(a[1, n:] - b[1, n:]).max() > 1e-3  # the padded positions themselves differ


def test_spliced_pseudo_word_vectors_match_transformers_inputs_embeds(saved, loaded):
  """`inputs_embeds` from `pseudo_words.embed_tokens` (learned [n, d_model] vectors) equals
  transformers fed the same embeddings. One placeholder id lies inside the table, as T5's do
  (its tokenizer has 32,100 ids for 32,128 rows), one past it."""
  model, _, _ = saved
  module, params = loaded["float32"]
  ids, mask = _inputs()
  vocab = presets.TINY_T5_CONFIG["vocab_size"]
  placeholder_ids = jnp.array([vocab - 1, vocab])
  ids[:, 3], ids[0, 10], ids[1, 20] = vocab - 1, vocab, vocab - 1  # two vectors, in both rows
  learned = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32)), jnp.float32)
  table = pseudo_words.token_table(module, params)
  embeds = pseudo_words.embed_tokens(table, learned, placeholder_ids, jnp.asarray(ids))
  out = module.apply({"params": params}, jnp.asarray(ids), inputs_embeds=embeds,
                     attention_mask=jnp.asarray(mask))
  ref = _torch_run(model, ids, mask, inputs_embeds=np.array(embeds))
  record_parity("tiny-t5 encoder float32 (inputs_embeds)", rel_err(out, ref),
                TOLERANCE["float32"])
  # Without the splice the token lookup is the same as the table's.
  plain = module.apply({"params": params}, jnp.asarray(_inputs()[0]),
                       inputs_embeds=jnp.take(table, jnp.asarray(_inputs()[0]), axis=0))
  np.testing.assert_array_equal(plain, module.apply({"params": params},
                                                    jnp.asarray(_inputs()[0])))


@pytest.mark.parametrize("buckets, distance", [(32, 128), (8, 16), (32, 64)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_transformers(buckets, distance, bidirectional):
  query, key = 300, 310
  ref = TorchT5Attention._relative_position_bucket(
      torch.arange(key)[None, :] - torch.arange(query)[:, None], bidirectional=bidirectional,
      num_buckets=buckets, max_distance=distance).numpy()
  got = t5.relative_position_buckets(query, key, buckets, distance, bidirectional)
  np.testing.assert_array_equal(got, ref)
  assert got.min() == 0 and got.max() == buckets - 1


def test_config_from_transformers_reads_xxl_and_refuses_what_it_cannot_run():
  cfg = t5.T5EncoderConfig.from_transformers(presets.T5_XXL_CONFIG)
  assert (cfg.d_model, cfg.d_ff, cfg.d_kv, cfg.num_heads, cfg.num_layers) == (4096, 10240, 64,
                                                                            64, 24)
  assert t5.feed_forward_kind(cfg.feed_forward_proj) == ("gelu_new", True)
  assert t5.feed_forward_kind("relu") == ("relu", False)
  assert t5.feed_forward_kind("gated-gelu_new") == ("gelu_new", True)
  bad = [{"feed_forward_proj": "gated-silu"}, {"feed_forward_proj": "mixed-gelu"},
         {"model_type": "umt5"}, {"is_decoder": True}, {"architectures": ["BertModel"]}]
  for override in bad:
    with pytest.raises(UnsupportedConfigError):
      t5.T5EncoderConfig.from_transformers({**presets.T5_XXL_CONFIG, **override})


def _meta_state_shapes_and_count(cfg: dict) -> tuple[dict, int]:
  with torch.device("meta"):
    model = TorchT5EncoderModel(_torch_config(cfg))
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  return shapes, sum(p.numel() for p in model.parameters())  # tied parameters once


def test_full_size_xxl_param_tree_matches_converted_torch_state_dict():
  torch_shapes, torch_count = _meta_state_shapes_and_count(presets.T5_XXL_CONFIG)
  module = t5.T5EncoderModel(t5.T5EncoderConfig.from_transformers(presets.T5_XXL_CONFIG))
  flax_shapes = _flax_shapes(module)
  plan = convert.plan_conversion(convert.T5_ENCODER, torch_shapes, flax_shapes)
  assert set(torch_shapes) - {key for key, _, _ in plan.entries} == {"encoder.embed_tokens.weight"}
  n_flax = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(flax_shapes))
  assert n_flax == torch_count == XXL_PARAMS
  assert flax_shapes["block_0"]["layer_0"]["SelfAttention"]["relative_attention_bias"][
      "embedding"].shape == (32, 64)
  assert "relative_attention_bias" not in flax_shapes["block_1"]["layer_0"]["SelfAttention"]
  # The inverse mapping (for writing checkpoints) gives back transformers' names.
  zeros = jax.tree_util.tree_map(lambda s: np.zeros((0,) * len(s.shape)), flax_shapes)
  names = set(convert.flax_params_to_torch_state_dict(convert.T5_ENCODER, zeros))
  assert names == set(torch_shapes) - {"encoder.embed_tokens.weight"}
