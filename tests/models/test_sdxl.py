"""Stable Diffusion XL: ti_jax's UNet, text encoders and conditioning equal diffusers/transformers.

A random-weight PyTorch `StableDiffusionXLPipeline` of the tiny-sdxl shapes is
saved with `save_pretrained` and loaded by `load_stable_diffusion`, so these
tests also prove the SDXL loader. fp32 must match to 1e-4 relative
(max |a-b| / max |ref|); bf16 to 2e-2.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import PARITY_FIGURES, record_parity
from torch_reference import perturb_, rel_err

from ti_jax.models import sdxl
from ti_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from ti_jax.weights import convert, presets
from ti_jax.weights.loading import load_stable_diffusion, resolve_model_dir
from ti_jax.weights.pipeline import model_family
from ti_jax.weights.tiny_tokenizer import write_tiny_clip_tokenizer

TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
PROMPTS = ["a painting in the style of a cat", "a photo of a red toy"]
PROMPTS_2 = ["a watercolor painting of a fox", "a sculpture of a dog"]


def _text_kwargs(cfg: dict) -> dict:
  return {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}


def _random(build, seed: int):
  """A torch module with random weights that depend on `seed` alone (not on build order)."""
  torch.manual_seed(seed)
  return perturb_(build(), seed)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
  """(torch StableDiffusionXLPipeline with random weights, the folder it was saved to)."""
  import transformers
  from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
  )
  tmp = tmp_path_factory.mktemp("sdxl")
  vocab = write_tiny_clip_tokenizer(str(tmp / "tok"))
  configs = presets.preset("tiny-sdxl")
  configs["unet"]["layers_per_block"] = 2  # exercise multi-layer blocks and skip bookkeeping
  for role in ("text_encoder", "text_encoder_2"):
    configs[role].update(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                         pad_token_id=vocab - 1)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp / "tok"))
  text_cfg = lambda role: transformers.CLIPTextConfig(**_text_kwargs(configs[role]))
  pipe = StableDiffusionXLPipeline(
      vae=_random(lambda: AutoencoderKL(**configs["vae"]), 2),
      text_encoder=_random(lambda: transformers.CLIPTextModel(text_cfg("text_encoder")), 3),
      text_encoder_2=_random(
          lambda: transformers.CLIPTextModelWithProjection(text_cfg("text_encoder_2")), 4),
      tokenizer=tokenizer, tokenizer_2=copy.deepcopy(tokenizer),
      unet=_random(lambda: UNet2DConditionModel(**configs["unet"]), 1),
      scheduler=EulerDiscreteScheduler.from_config(configs["scheduler"]),
      force_zeros_for_empty_prompt=True, add_watermarker=False)
  pipe.save_pretrained(str(tmp / "model"), safe_serialization=True)
  return pipe, str(tmp / "model")


@pytest.fixture(scope="module")
def loaded(saved_pipeline):
  """ti_jax SDXL loaded from the saved folder, in fp32 and in bf16."""
  _, folder = saved_pipeline
  return {name: load_stable_diffusion(folder, dtype=dt, param_dtype=dt)
          for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))}


def _unet_inputs(pipe):
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # NCHW for torch
  timesteps = np.array([17, 801])
  context = rng.standard_normal((2, 77, pipe.unet.config.cross_attention_dim)).astype(np.float32)
  pooled = rng.standard_normal((2, pipe.text_encoder_2.config.projection_dim)).astype(np.float32)
  ids = np.array([[64, 64, 0, 0, 64, 64], [128, 96, 8, 4, 64, 64]], np.float32)
  return latents, timesteps, context, pooled, ids


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sdxl_unet_with_added_conditioning_matches_diffusers(saved_pipeline, loaded, dtype):
  pipe, _ = saved_pipeline
  sd = loaded[dtype]
  latents, timesteps, context, pooled, ids = _unet_inputs(pipe)
  torch_in = [torch.from_numpy(a) for a in (latents, timesteps, context, pooled, ids)]
  with torch.no_grad():
    ref = pipe.unet(*torch_in[:3], added_cond_kwargs={"text_embeds": torch_in[3],
                                                      "time_ids": torch_in[4]}).sample.numpy()
  out = sd.unet.apply({"params": sd.unet_params}, latents.transpose(0, 2, 3, 1), timesteps,
                      context, added_cond={"text_embeds": pooled, "time_ids": ids})
  out = np.asarray(out.astype(jnp.float32)).transpose(0, 3, 1, 2)
  if dtype == "bfloat16":
    # Context for the bf16 figure: diffusers' own UNet in bf16 against its fp32 self.
    with torch.no_grad():
      unet_bf16 = copy.deepcopy(pipe.unet).to(torch.bfloat16)
      own = unet_bf16(*[t.bfloat16() if t.is_floating_point() else t for t in torch_in[:3]],
                      added_cond_kwargs={"text_embeds": torch_in[3].bfloat16(),
                                         "time_ids": torch_in[4]}).sample.float().numpy()
    PARITY_FIGURES.append(("tiny-sdxl unet bfloat16: diffusers' own bf16 (context)",
                           rel_err(own, ref), TOLERANCE[dtype]))
  record_parity(f"tiny-sdxl unet (text_time) {dtype}", rel_err(out, ref), TOLERANCE[dtype])
  if dtype == "float32":
    # The added conditioning matters: other time ids give another output.
    other = sd.unet.apply({"params": sd.unet_params}, latents.transpose(0, 2, 3, 1), timesteps,
                          context, added_cond={"text_embeds": pooled, "time_ids": ids[::-1]})
    assert rel_err(np.asarray(other).transpose(0, 3, 1, 2), ref) > 1e-2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_text_encoders_penultimate_states_and_text_embeds_match_transformers(
    saved_pipeline, loaded, dtype):
  pipe, _ = saved_pipeline
  sd = loaded[dtype]
  for encoder in sd.text_encoders:
    role, tokenizer, module, params = encoder.role, encoder.tokenizer, encoder.module, encoder.params
    torch_model = getattr(pipe, role)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                    return_tensors="np").input_ids
    with torch.no_grad():
      ref = torch_model(torch.from_numpy(ids), output_hidden_states=True)
    out = module.apply({"params": params}, ids, all_outputs=True)
    f32 = lambda a: np.asarray(a.astype(jnp.float32))
    record_parity(f"tiny-sdxl {role} penultimate hidden state {dtype}",
                  rel_err(f32(out["penultimate_hidden_state"]), ref.hidden_states[-2]),
                  TOLERANCE[dtype])
    if role == "text_encoder_2":
      record_parity(f"tiny-sdxl text_encoder_2 text_embeds (projected pooled) {dtype}",
                    rel_err(f32(out["text_embeds"]), ref.text_embeds), TOLERANCE[dtype])
    else:
      record_parity(f"tiny-sdxl text_encoder pooler output {dtype}",
                    rel_err(f32(out["pooler_output"]), ref.pooler_output), TOLERANCE[dtype])


@pytest.mark.parametrize("eos_token_id", [2, 7])
def test_projected_pooling_follows_transformers_eos_rule(eos_token_id):
  """eos_token_id 2 (legacy configs such as SDXL's) pools the largest id; others the first eos."""
  from transformers import CLIPTextConfig as TorchTextConfig
  from transformers import CLIPTextModelWithProjection
  cfg = dict(presets.preset("tiny-sdxl")["text_encoder_2"], vocab_size=50,
             eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=1)
  torch_model = perturb_(CLIPTextModelWithProjection(TorchTextConfig(**_text_kwargs(cfg))), 5)
  # The largest id (49) and the eos (7) sit at different positions, eos twice.
  ids = np.array([[0, 5, 49, 7, 9, 7, 3, 3], [0, 7, 12, 49, 3, 7, 3, 3]])
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(ids)).text_embeds.numpy()
  module = CLIPTextModel(CLIPTextConfig.from_transformers(cfg))
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  params = convert.convert_torch_state_dict(convert.TEXT_ENCODER_2, state, shapes)
  out = module.apply({"params": params}, ids, all_outputs=True)["text_embeds"]
  assert rel_err(out, ref) < 1e-5


def test_text_conditioning_equals_the_pipelines_encode_prompt(saved_pipeline, loaded):
  pipe, _ = saved_pipeline
  sd = loaded["float32"]
  with torch.no_grad():
    ref_context, _, ref_pooled, _ = pipe.encode_prompt(
        PROMPTS, prompt_2=PROMPTS_2, device="cpu", do_classifier_free_guidance=False)
  tok = lambda t, p: t(p, padding="max_length", max_length=77, truncation=True,
                       return_tensors="np").input_ids
  first, second = sd.text_encoders
  ids_1, ids_2 = tok(first.tokenizer, PROMPTS), tok(second.tokenizer, PROMPTS_2)
  encoders = tuple(e.module for e in sd.text_encoders)
  params = tuple(e.params for e in sd.text_encoders)
  context, pooled = sdxl.text_conditioning(encoders, params, (ids_1, ids_2))
  assert context.shape == (2, 77, sd.unet.config.cross_attention_dim)
  record_parity("tiny-sdxl conditioning: context vs encode_prompt", rel_err(context, ref_context),
                1e-4)
  record_parity("tiny-sdxl conditioning: pooled vs encode_prompt", rel_err(pooled, ref_pooled),
                1e-4)
  # Pseudo-word vectors enter as token embeddings: the looked-up rows give the same result.
  table_1, table_2 = (p["embeddings"]["token_embedding"]["embedding"] for p in params)
  via_embeds = sdxl.text_conditioning(encoders, params, (ids_1, ids_2),
                                      (table_1[ids_1], table_2[ids_2]))
  np.testing.assert_allclose(via_embeds[0], context, atol=1e-6)
  np.testing.assert_allclose(via_embeds[1], pooled, atol=1e-6)


def test_time_ids_follow_the_pipelines_order(saved_pipeline):
  pipe, _ = saved_pipeline
  ref = pipe._get_add_time_ids((1024, 768), (16, 8), (512, 384), dtype=torch.float32,  # pylint: disable=protected-access
                               text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
  np.testing.assert_array_equal(sdxl.time_ids((1024, 768), (16, 8), (512, 384)), ref.numpy()[0])
  np.testing.assert_array_equal(sdxl.time_ids((64, 32)), [64, 32, 0, 0, 64, 32])
  cond = sdxl.added_cond(jnp.ones((3, 24)), sdxl.time_ids((64, 32)))
  assert cond["time_ids"].shape == (3, 6) and cond["text_embeds"].shape == (3, 24)


def test_sdxl_loads_with_its_family_second_tokenizer_and_a_float32_vae(loaded):
  sd = loaded["bfloat16"]
  assert sd.family == "sdxl" and sd.is_sdxl
  second = sd.text_encoders[1]
  assert second.tokenizer is not None and second.module.config.projection_dim == 24
  # SDXL's VAE overflows in half precision: float32 unless asked otherwise.
  assert {str(a.dtype) for a in jax.tree_util.tree_leaves(sd.vae_params)} == {"float32"}
  assert sd.vae.config.scaling_factor == pytest.approx(0.13025)
  assert {str(a.dtype) for a in jax.tree_util.tree_leaves(second.params)} == {"bfloat16"}


def test_sdxl_unet_refuses_a_call_without_added_conditioning(loaded):
  sd = loaded["float32"]
  with pytest.raises(ValueError, match="added_cond"):
    sd.unet.apply({"params": sd.unet_params}, jnp.zeros((1, 8, 8, 4)), jnp.ones((1,)),
                  jnp.zeros((1, 77, 64)))


def test_sdxl_hub_id_fetches_both_encoders_and_tokenizers_and_no_flax_duplicates(tiny_sdxl,
                                                                                 monkeypatch):
  import huggingface_hub
  calls = []

  def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
    calls.append(list(allow_patterns))
    return tiny_sdxl

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  folder = resolve_model_dir("stabilityai/stable-diffusion-xl-base-1.0")
  assert folder == tiny_sdxl
  assert len(calls) == 1  # every component had safetensors: no second fetch
  patterns = calls[0]
  for needed in ("text_encoder_2/model.safetensors", "text_encoder_2/config.json",
                 "tokenizer_2/*", "unet/diffusion_pytorch_model.safetensors"):
    assert needed in patterns
  assert not any(p.endswith((".msgpack", ".bin")) for p in patterns)
  # Without safetensors for a variant, the Flax weights are asked for, component by component.
  resolve_model_dir("stabilityai/stable-diffusion-xl-base-1.0", variant="fp16", allow_pickle=True)
  assert "text_encoder_2/flax_model.msgpack" in calls[-1]
  assert "unet/diffusion_pytorch_model.fp16.bin" in calls[-1]


@pytest.mark.parametrize("preset, pipeline, family", [
    ("sd15", "StableDiffusionPipeline", "sd1"), ("tiny-sd15", "StableDiffusionPipeline", "sd1"),
    ("sd21", "StableDiffusionPipeline", "sd2"), ("tiny-sd21", "StableDiffusionPipeline", "sd2"),
    ("sdxl", "StableDiffusionXLPipeline", "sdxl"), ("ldm", "LDMTextToImagePipeline", "ldm")])
def test_model_family_comes_from_the_pipeline_class_and_text_encoder(preset, pipeline, family):
  from ti_jax.models.ldm_bert import LDMBertConfig
  text = presets.preset(preset)["text_encoder"]
  cfg = (LDMBertConfig if family == "ldm" else CLIPTextConfig).from_transformers(text)
  assert model_family({"_class_name": pipeline}, cfg) == family


def test_legacy_pooling_picks_an_added_token_unless_the_eos_id_is_given():
  """SDXL's configs say eos_token_id 2: like transformers, the largest id is pooled; an added
  pseudo-word (id past the vocabulary) is then pooled, unless the real eos id is passed."""
  cfg = CLIPTextConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=6, projection_dim=4,
                       eos_token_id=2)
  module = CLIPTextModel(cfg)
  ids = jnp.array([[18, 5, 25, 19, 19, 19]])  # 25: an added token; 19: the tokenizer's eos
  params = module.init(jax.random.key(0), ids)["params"]
  embeds = params["embeddings"]["token_embedding"]["embedding"][jnp.clip(ids, 0, 19)]
  run = lambda **kw: module.apply({"params": params}, ids, inputs_embeds=embeds,
                                  all_outputs=True, **kw)
  legacy, by_eos = run(), run(eos_token_id=19)
  np.testing.assert_array_equal(legacy["pooler_output"], legacy["last_hidden_state"][:, 2])
  np.testing.assert_array_equal(by_eos["pooler_output"], by_eos["last_hidden_state"][:, 3])
