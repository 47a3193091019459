"""Flux.1's single files (ComfyUI's flux1-dev/schnell, ae, clip_l, t5xxl) renamed to diffusers keys.

diffusers' own single-file converters (`convert_flux_transformer_checkpoint_to_diffusers`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_sd3_t5_checkpoint_to_diffusers`) are the oracle: ti_jax's renamed state
dicts equal theirs key for key and value for value on tiny random files, and the
PyTorch models take them strictly. The writer (`ti_jax.testing.flux_single_file_models`)
inverts the mapping exactly. The full-size FLUX.1 transformer and VAE are checked on
shapes only, through torch's `meta` device.
"""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ti_jax.testing import flux_single_file_models as writer
from ti_jax.models import t5 as t5_model
from ti_jax.weights import convert, safetensors_io
from ti_jax.weights import flux_single_file as fsf
from ti_jax.weights.pipeline import ModelLoadError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

# Heads 2 x 16, 2 double + 2 single blocks; the rope axes add up to the head size.
TINY_TRANSFORMER = {"patch_size": 1, "in_channels": 16, "out_channels": None, "num_layers": 2,
                    "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                    "joint_attention_dim": 32, "pooled_projection_dim": 24,
                    "axes_dims_rope": (4, 6, 6)}
# Flux's VAE shape (16 latent channels, no quant convs), narrow.
TINY_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16,
            "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "use_quant_conv": False, "use_post_quant_conv": False}
FLUX_VAE = dict(TINY_VAE, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                norm_num_groups=32, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4)
VARIANTS = {"dev": True, "schnell": False}
PREFIXES = ("", "model.diffusion_model.")


def _random_state(model, seed):
  """Random float32 values (not the init: zero-initialised tensors would hide a swap) by key."""
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(tuple(v.shape)).astype(np.float32)
          for k, v in model.state_dict().items()}


def _torch(state):
  return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def _assert_equal_dicts(ours, theirs):
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    value = value.numpy() if hasattr(value, "numpy") else value
    np.testing.assert_array_equal(np.asarray(ours[key]), value, err_msg=key)


@contextlib.contextmanager
def _one_line(*needles):
  """A one-line ModelLoadError holding every needle."""
  with pytest.raises(ModelLoadError) as err:
    yield
  message = str(err.value)
  assert "\n" not in message, message
  for needle in needles:
    assert needle in message, message


@pytest.fixture(scope="module")
def transformers_by_variant():
  """variant -> (diffusers config, random diffusers state dict, the model to load it into)."""
  out = {}
  for seed, (name, guidance) in enumerate(VARIANTS.items()):
    config = dict(TINY_TRANSFORMER, guidance_embeds=guidance)
    model = diffusers.FluxTransformer2DModel(**config)
    out[name] = config, _random_state(model, seed), model
  return out


def _diffusers_flux_converter(checkpoint):
  """diffusers' converter on a tiny file: it splits the single blocks' linear1 by FLUX.1's
  hard-coded width (3 x 3072 + 12288 rows); the same proportions of the tiny width here."""
  real_split = torch.split

  def split(tensor, sizes, dim=0):
    if isinstance(sizes, (tuple, list)) and tuple(sizes) == (3072, 3072, 3072, 12288):
      width = tensor.shape[dim] // 7
      sizes = (width, width, width, 4 * width)
    return real_split(tensor, sizes, dim)
  torch.split = split
  try:
    return sfu.convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
  finally:
    torch.split = real_split


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_transformer_renaming_equals_diffusers_converter(transformers_by_variant, name, prefix):
  config, state, model = transformers_by_variant[name]
  bfl = writer.bfl_state_dict(state, config, prefix)
  assert ("guidance_in.in_layer.weight" in {k[len(prefix):] for k in bfl}) == (name == "dev")
  found, ours = fsf.transformer_state_dict(bfl, "flux1.safetensors")
  checkpoint = _torch(bfl)
  theirs = _diffusers_flux_converter(checkpoint)
  assert not checkpoint, sorted(checkpoint)  # diffusers consumed every key of the file
  _assert_equal_dicts(ours, theirs)
  # The round trip diffusers -> BFL -> diffusers is the identity, and the model takes it.
  _assert_equal_dicts(ours, state)
  model.load_state_dict(_torch(ours), strict=True)
  assert found == {k: v for k, v in config.items() if k != "axes_dims_rope"}
  assert fsf.variant(found) == name and not fsf.is_full_size(found)
  # ... and BFL -> diffusers -> BFL too.
  _assert_equal_dicts(writer.bfl_state_dict(ours, found, prefix), bfl)


def test_transformer_renaming_is_views_but_for_the_final_modulation(transformers_by_variant):
  config, state, _ = transformers_by_variant["dev"]
  bfl = writer.bfl_state_dict(state, config)
  _, ours = fsf.transformer_state_dict(bfl, "flux1-dev.safetensors")
  sources = fsf.transformer_sources(config)
  copies = sorted(k for k, v in ours.items() if not np.shares_memory(v, bfl[sources[k][0]]))
  assert copies == ["norm_out.linear.bias", "norm_out.linear.weight"]


def test_transformer_renaming_checks_the_model_shapes(transformers_by_variant):
  config, state, _ = transformers_by_variant["schnell"]
  bfl = writer.bfl_state_dict(state, config)
  expected = {k: v.shape for k, v in state.items()}
  fsf.transformer_state_dict(bfl, "f.safetensors", expected)  # the model's own shapes pass
  with _one_line("f.safetensors: Flux transformer weight x_embedder.weight has shape (32, 16), "
                 "the model needs (32, 64)"):
    wider = dict(expected, **{"x_embedder.weight": (32, 64)})
    fsf.transformer_state_dict(bfl, "f.safetensors", wider)
  with _one_line("weight time_text_embed.guidance_embedder.linear_1.weight is missing"):
    dev = dict(expected, **{"time_text_embed.guidance_embedder.linear_1.weight": (32, 256)})
    fsf.transformer_state_dict(bfl, "f.safetensors", dev)
  with _one_line("weight proj_out.bias has no place in the model"):
    fsf.transformer_state_dict(bfl, "f.safetensors",
                               {k: v for k, v in expected.items() if k != "proj_out.bias"})


@pytest.fixture(scope="module")
def vae():
  """(diffusers config, random diffusers state dict, model) of a tiny Flux-shaped VAE."""
  model = diffusers.AutoencoderKL(**TINY_VAE)
  return TINY_VAE, _random_state(model, 7), model


@pytest.mark.parametrize("prefix", fsf.VAE_PREFIXES)
def test_vae_renaming_equals_diffusers_converter(vae, prefix):
  config, state, model = vae
  original = writer.original_vae_state_dict(state, config, prefix)
  assert not any("quant_conv" in k for k in original)
  found = fsf.vae_config({k: v.shape for k, v in original.items()}, "ae.safetensors")
  assert found == {k: v for k, v in config.items() if k != "norm_num_groups"}
  expected = {k: v.shape for k, v in state.items()}
  ours = fsf.vae_state_dict(original, "ae.safetensors", found, expected)
  theirs = sfu.convert_ldm_vae_checkpoint(_torch(original), config)
  _assert_equal_dicts(ours, theirs)
  _assert_equal_dicts(ours, state)  # diffusers -> original -> diffusers is the identity
  model.load_state_dict(_torch(ours), strict=True)


def test_vae_file_with_unknown_or_missing_keys_is_refused(vae):
  config, state, _ = vae
  original = writer.original_vae_state_dict(state, config)
  expected = {k: v.shape for k, v in state.items()}
  with _one_line("ae.safetensors: unexpected key quant_conv.weight for the VAE"):
    fsf.vae_state_dict(dict(original, **{"quant_conv.weight": np.zeros((32, 32, 1, 1))}),
                       "ae.safetensors", config, expected)
  del original["decoder.mid.attn_1.q.weight"]
  with _one_line("ae.safetensors: VAE weight decoder.mid_block.attentions.0.to_q.weight is "
                 "missing (looked for decoder.mid.attn_1.q.weight)"):
    fsf.vae_state_dict(original, "ae.safetensors", config, expected)


def _hub_layout(state):
  """transformers 5's CLIPTextModel keys (`embeddings.*`) as files hold them (`text_model.*`)."""
  return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}


@pytest.mark.parametrize("bare", [False, True])
@pytest.mark.parametrize("prefix", fsf.CLIP_PREFIXES)
def test_clip_l_file_with_and_without_prefixes(prefix, bare):
  """clip_l.safetensors (`text_model.*`) under each prefix; `bare`: as transformers 5 saves it."""
  config = transformers.CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=2, num_attention_heads=2,
                                       max_position_embeddings=12, bos_token_id=0,
                                       eos_token_id=1, pad_token_id=1)
  model = transformers.CLIPTextModel(config)
  state = _hub_layout(_random_state(model, 3))
  # As ComfyUI's and the SD files hold it: the position ids, a full CLIPModel's projection.
  extra = {"text_model.embeddings.position_ids": np.arange(12)[None],
           "text_projection.weight": np.zeros((16, 16), np.float32)}
  file = {prefix + (k.removeprefix("text_model.") if bare else k): v
          for k, v in {**state, **extra}.items()}
  ours = fsf.clip_state_dict(file, "clip_l.safetensors", {k: v.shape for k, v in state.items()})
  _assert_equal_dicts(ours, state)
  model.load_state_dict(_torch({k.removeprefix("text_model."): v for k, v in ours.items()}),
                        strict=True)
  if not bare and (prefix in sfu.LDM_CLIP_PREFIX_TO_REMOVE or prefix.startswith("text_encoders.")):
    theirs = sfu.convert_ldm_clip_checkpoint(_torch(file), remove_prefix=prefix)
    theirs = {k: v for k, v in theirs.items() if k in state}  # diffusers' model drops the rest
    _assert_equal_dicts(ours, theirs)


@pytest.fixture(scope="module")
def t5():
  config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                 num_heads=2, feed_forward_proj="gated-gelu",
                                 relative_attention_num_buckets=8)
  model = transformers.T5EncoderModel(config)
  state = _random_state(model, 5)
  state["encoder.embed_tokens.weight"] = state["shared.weight"]  # one tied table
  return state, model


def test_t5_file_converts_onto_ti_jax_t5_encoder(t5):
  """A file holding only `encoder.embed_tokens.weight`, under ComfyUI's prefix, still fills
  ti_jax's T5 token table (`shared`) through `convert.T5_ENCODER`."""
  state, model = t5
  prefix = fsf.T5_PREFIXES[0]
  file = {prefix + k: v for k, v in state.items() if k != "shared.weight"}
  ours = fsf.t5_state_dict(file, "t5xxl_fp16.safetensors")
  module = t5_model.T5EncoderModel(t5_model.T5EncoderConfig.from_transformers(
      model.config.to_dict()))
  shapes = jax.eval_shape(lambda r: module.init(r, jnp.zeros((1, 1), jnp.int32)),
                          jax.random.key(0))["params"]
  params = convert.convert_torch_state_dict(convert.T5_ENCODER, ours, shapes)
  np.testing.assert_array_equal(params["shared"]["embedding"], state["shared.weight"])


@pytest.mark.parametrize("tables", [("shared.weight",), ("encoder.embed_tokens.weight",),
                                    ("shared.weight", "encoder.embed_tokens.weight")])
@pytest.mark.parametrize("prefix", fsf.T5_PREFIXES)
def test_t5_file_with_either_token_table_and_prefixes(t5, prefix, tables):
  state, model = t5
  file = {prefix + k: v for k, v in state.items() if k not in fsf.T5_TOKEN_KEYS or k in tables}
  ours = fsf.t5_state_dict(file, "t5xxl_fp16.safetensors", {k: v.shape for k, v in state.items()})
  _assert_equal_dicts(ours, state)
  model.load_state_dict(_torch(ours), strict=True)
  if prefix:  # diffusers' (SD3) T5 converter only strips ComfyUI's prefix
    theirs = sfu.convert_sd3_t5_checkpoint_to_diffusers(_torch(file))
    _assert_equal_dicts({k: v for k, v in ours.items() if k in theirs}, theirs)


def test_comfyui_files_written_from_a_diffusers_folder(tmp_path, transformers_by_variant, vae):
  """The writer's four files (plain and all-in-one prefixed) read back to the folder's weights."""
  config, state, _ = transformers_by_variant["dev"]
  folder = tmp_path / "flux"
  components = {"transformer": (config, state), "vae": vae[:2]}
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
      num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
      pad_token_id=1))
  t5 = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=30, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
      feed_forward_proj="gated-gelu"))
  components["text_encoder"] = {}, _hub_layout(_random_state(clip, 1))
  components["text_encoder_2"] = {}, _random_state(t5, 2)
  t5_state = components["text_encoder_2"][1]
  t5_state["encoder.embed_tokens.weight"] = t5_state["shared.weight"]  # one tied table
  for comp, (cfg, sd) in components.items():
    (folder / comp).mkdir(parents=True)
    (folder / comp / "config.json").write_text(
        json.dumps({k: list(v) if isinstance(v, tuple) else v
                                  for k, v in cfg.items()}))
    safetensors_io.save(str(folder / comp / "model.safetensors"), sd)
  for prefixed in (False, True):
    paths = writer.write_comfyui_files(str(folder), str(tmp_path / f"out{prefixed}"), prefixed)
    files = {comp: safetensors_io.load(p) for comp, p in paths.items()}
    assert ("encoder.embed_tokens.weight" in "".join(files["text_encoder_2"])) is False
    _, got = fsf.transformer_state_dict(files["transformer"], paths["transformer"])
    _assert_equal_dicts(got, state)
    got = fsf.vae_state_dict(files["vae"], paths["vae"], vae[0],
                             {k: v.shape for k, v in vae[1].items()})
    _assert_equal_dicts(got, vae[1])
    _assert_equal_dicts(fsf.clip_state_dict(files["text_encoder"], "c"),
                        components["text_encoder"][1])
    _assert_equal_dicts(fsf.t5_state_dict(files["text_encoder_2"], "t"),
                        components["text_encoder_2"][1])
  # ComfyUI's all-in-one checkpoint: the four prefixed files in one; each takes its own part.
  everything = {k: v for f in files.values() for k, v in f.items()}
  assert fsf.is_flux_transformer(everything) and not fsf.is_flux_transformer(files["vae"])
  _assert_equal_dicts(fsf.transformer_state_dict(everything, "all")[1], state)
  _assert_equal_dicts(fsf.vae_state_dict(everything, "all", vae[0],
                                         {k: v.shape for k, v in vae[1].items()}), vae[1])
  _assert_equal_dicts(fsf.clip_state_dict(everything, "all"), components["text_encoder"][1])
  _assert_equal_dicts(fsf.t5_state_dict(everything, "all"), components["text_encoder_2"][1])


# ---------------------------------------------------------------------------
# One-line errors.


def test_wrong_or_incomplete_transformer_files_are_refused_in_one_line(transformers_by_variant, t5):
  config, state, _ = transformers_by_variant["dev"]
  bfl = writer.bfl_state_dict(state, config, "model.diffusion_model.")
  path = "flux1-dev.safetensors"

  def refused(file, *needles):
    with _one_line(path + ": ", *needles):
      fsf.transformer_state_dict(file, path)

  refused({k: v for k, v in bfl.items() if not k.endswith("single_blocks.1.linear2.bias")},
          "Flux transformer weight single_blocks.1.linear2.bias is missing")
  refused(dict(bfl, **{"model.diffusion_model.double_blocks.0.img_attn.lora_up.weight": 0 * bfl[
      "model.diffusion_model.img_in.weight"]}), "a LoRA", "not a full model")
  refused({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": np.zeros((4, 32))},
          "a LoRA")
  refused(t5[0], "a T5 encoder, not a Flux transformer")
  refused({"weight": np.zeros(3)}, "no known model layout, not a Flux transformer")
  refused({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((8, 4, 3, 3))},
          "a Stable Diffusion (UNet) checkpoint, not a Flux transformer")
  refused(dict(state), "a diffusers-layout FluxTransformer2DModel file")
  fill = dict(bfl, **{"model.diffusion_model.img_in.weight": np.zeros((32, 64), np.float32)})
  refused(fill, "takes 64 input channels and predicts 16", "Fill")
  refused(dict(bfl, **{"model.diffusion_model.double_blocks.0.extra.weight": np.zeros(2)}),
          "unexpected key double_blocks.0.extra.weight for a Flux transformer")
  qkv = "model.diffusion_model.double_blocks.1.txt_attn.qkv.weight"
  refused(dict(bfl, **{qkv: bfl[qkv][:64]}),
          "weight double_blocks.1.txt_attn.qkv.weight has 64 rows, the blocks' width needs 96")
  mlp = "model.diffusion_model.double_blocks.0.img_mlp.0.weight"
  refused(dict(bfl, **{mlp: bfl[mlp][:64]}), "an MLP width of 64 for a width of 32")


def test_wrong_component_files_are_refused_in_one_line(transformers_by_variant, vae, t5):
  config, state, _ = transformers_by_variant["schnell"]
  bfl = writer.bfl_state_dict(state, config)
  with _one_line("ae.safetensors: a Flux transformer in the original (BFL) layout, not a VAE"):
    fsf.vae_state_dict(bfl, "ae.safetensors", vae[0], {})
  with _one_line("clip_l.safetensors: a T5 encoder, not a CLIP text encoder"):
    fsf.clip_state_dict(t5[0], "clip_l.safetensors")
  original = writer.original_vae_state_dict(vae[1], vae[0])
  with _one_line("t5xxl_fp16.safetensors: a VAE in the original (LDM) layout, not a T5 encoder"):
    fsf.t5_state_dict(original, "t5xxl_fp16.safetensors")
  no_table = {k: v for k, v in t5[0].items() if k not in fsf.T5_TOKEN_KEYS}
  with _one_line("t5xxl_fp16.safetensors: T5 weight shared.weight (the token table) is missing"):
    fsf.t5_state_dict(no_table, "t5xxl_fp16.safetensors")
  with _one_line("t5.safetensors: T5 encoder weight encoder.final_layer_norm.weight is missing"):
    fsf.t5_state_dict({k: v for k, v in t5[0].items() if "final_layer_norm" not in k},
                      "t5.safetensors", {k: v.shape for k, v in t5[0].items()})


# ---------------------------------------------------------------------------
# Full size, shapes only.


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_full_size_flux_transformer_shapes_map_one_to_one(name):
  """FLUX.1-dev/schnell: the BFL file's keys and shapes (from diffusers' meta model through the
  writer) map onto the meta model's keys and shapes one to one, by ti_jax and by diffusers."""
  with torch.device("meta"):
    model = diffusers.FluxTransformer2DModel(guidance_embeds=VARIANTS[name])
  want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  config = dict(model.config)
  bfl = writer.bfl_shapes(want, config)
  found, got = fsf.transformer_shapes(bfl, "flux1-" + name + ".safetensors", expected=want)
  assert got == want
  assert fsf.is_full_size(found) and fsf.variant(found) == name
  assert (found["num_layers"], found["num_single_layers"]) == (19, 38)
  assert sum(np.prod(s) for s in bfl.values()) == sum(np.prod(s) for s in want.values())
  # Fused: two q/k/v (weight, bias) per double block, q/k/v/mlp per single block.
  assert len(bfl) == len(want) - 8 * 19 - 6 * 38
  # diffusers' own converter, on meta tensors of the same BFL shapes, gives the same.
  checkpoint = {"model.diffusion_model." + k: torch.empty(s, device="meta") for k, s in bfl.items()}
  theirs = sfu.convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
  assert not checkpoint
  assert {k: tuple(v.shape) for k, v in theirs.items()} == want


def test_full_size_flux_vae_shapes_map_one_to_one():
  with torch.device("meta"):
    model = diffusers.AutoencoderKL(**FLUX_VAE)
  want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  empty = {k: np.broadcast_to(np.float32(0), s) for k, s in want.items()}  # no memory
  original = writer.original_vae_state_dict(empty, FLUX_VAE)
  found = fsf.vae_config({k: v.shape for k, v in original.items()}, "ae.safetensors")
  assert found == {k: v for k, v in FLUX_VAE.items() if k != "norm_num_groups"}
  got = fsf.vae_state_dict(original, "ae.safetensors", found, want)
  assert {k: tuple(v.shape) for k, v in got.items()} == want
