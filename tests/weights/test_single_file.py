"""Single-file checkpoints in the original (A1111/ComfyUI) layout.

The tiny models are written as single files with `ti_jax.testing.single_file_models`;
diffusers' own original->diffusers converters are the oracle that this
layout is the real one, and the loaded single file must equal its folder.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ti_jax.testing import single_file_models
from ti_jax.weights import original_layout, presets, safetensors_io, single_file, tiny_models
from ti_jax.weights.loading import ModelLoadError, load_stable_diffusion

FAMILIES = {"sd1": "tiny_sd15", "sd2": "tiny_sd21"}


@pytest.fixture(scope="module")
def files(request, tmp_path_factory):
  """family -> (diffusers folder, its single file)."""
  out = {}
  root = tmp_path_factory.mktemp("single")
  for family, fixture in FAMILIES.items():
    folder = request.getfixturevalue(fixture)
    out[family] = folder, single_file_models.write_single_file(
        folder, str(root / f"{family}.safetensors"), family)
  return out


@pytest.fixture(scope="module")
def loaded(files):
  """family -> (the folder's model, the single file's model)."""
  return {family: (load_stable_diffusion(folder), load_stable_diffusion(path, tokenizer=folder))
          for family, (folder, path) in files.items()}


def _assert_one_line(err, *needles):
  msg = str(err.value)
  assert "\n" not in msg, msg
  for needle in needles:
    assert needle in msg, msg


def _load_error(path, **kw):
  with pytest.raises(ModelLoadError) as err:
    load_stable_diffusion(str(path), **kw)
  return err


def _edited(files, tmp_path, family="sd1", edit=None, name="edited.safetensors"):
  """A copy of the family's single file with `edit(state)` applied to its (copied) tensors."""
  state = {k: np.array(v) for k, v in safetensors_io.load(files[family][1]).items()}
  edit(state)
  path = str(tmp_path / name)
  safetensors_io.save(path, state)
  return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_diffusers_converters_read_the_written_file_back_to_the_folder_weights(files, family):
  """diffusers' convert_ldm_* functions turn the single file into exactly the folder's weights."""
  import torch
  from diffusers.loaders import single_file_utils as sfu

  from ti_jax.weights.loading import read_configs
  folder, path = files[family]
  configs = read_configs(folder)
  want = single_file_models.diffusers_state_dicts(folder)
  checkpoint = {k: torch.from_numpy(np.array(v)) for k, v in safetensors_io.load(path).items()}
  got = {"unet": sfu.convert_ldm_unet_checkpoint(checkpoint, configs["unet"]),
         "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, configs["vae"])}
  if family == "sd1":
    got["text_encoder"] = sfu.convert_ldm_clip_checkpoint(checkpoint)
  else:
    text_model = types.SimpleNamespace(config=types.SimpleNamespace(
        hidden_size=configs["text_encoder"]["hidden_size"]))
    text = sfu.convert_open_clip_checkpoint(text_model, checkpoint)
    # diffusers skips SD 2.x's last resblock by its full-size index (23); the tiny file's
    # extra last block and the unused projection are what diffusers' model would drop.
    n = configs["text_encoder"]["num_hidden_layers"]
    got["text_encoder"] = {k: v for k, v in text.items()
                           if not k.startswith(f"text_model.encoder.layers.{n}.")
                           and k != "text_projection.weight"}
  for comp in want:
    expected = {k: v for k, v in want[comp].items() if not k.endswith("position_ids")}
    actual = {k: v for k, v in got[comp].items() if not k.endswith("position_ids")}
    assert sorted(actual) == sorted(expected), comp
    for key, value in expected.items():
      np.testing.assert_array_equal(actual[key].numpy(), value, err_msg=f"{comp} {key}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_single_file_loads_the_same_model_as_its_folder(loaded, family):
  ref, sd = loaded[family]
  assert sd.unet.config == ref.unet.config
  assert sd.vae.config == ref.vae.config
  assert sd.text_encoder.config == ref.text_encoder.config
  assert sd.scheduler_config["prediction_type"] == ref.scheduler_config["prediction_type"]
  assert sd.tokenizer("a photo").input_ids == ref.tokenizer("a photo").input_ids
  for name in ("unet_params", "vae_params", "text_encoder_params"):
    flat_ref = jax.tree_util.tree_leaves_with_path(getattr(ref, name))
    flat = dict(jax.tree_util.tree_leaves_with_path(getattr(sd, name)))
    assert len(flat) == len(flat_ref), name
    for path, value in flat_ref:
      np.testing.assert_array_equal(flat[path], value, err_msg=f"{name} {path}")


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _outputs(unet, vae, text_encoder, params, ids, x):
  """(text states [1, 77, D], UNet output [1, 8, 8, 4], decoded image [1, 64, 64, 3])."""
  text = text_encoder.apply({"params": params["text_encoder"]}, ids)
  eps = unet.apply({"params": params["unet"]}, x, jnp.array([3]), text)
  image = vae.apply({"params": params["vae"]}, x, method=vae.decode)
  return text, eps, image


def test_single_file_outputs_equal_the_folder_outputs(loaded):
  """SD 2.x (linear projections, OpenCLIP split q/k/v): UNet, VAE and text encoder agree."""
  ref, sd = loaded["sd2"]
  ids = jnp.asarray([ref.tokenizer("a photo", padding="max_length").input_ids])
  x = jnp.ones((1, 8, 8, 4))
  outs = [_outputs(m.unet, m.vae, m.text_encoder,
                   {"unet": m.unet_params, "vae": m.vae_params,
                    "text_encoder": m.text_encoder_params}, ids, x) for m in (ref, sd)]
  for a, b in zip(*outs):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prediction_type_comes_from_modelspec_metadata(files, tmp_path):
  folder, _ = files["sd2"]
  path = single_file_models.write_single_file(
      folder, str(tmp_path / "base.safetensors"), "sd2",
      metadata={"modelspec.prediction_type": "epsilon"})
  sd = load_stable_diffusion(path, tokenizer=folder)
  assert sd.scheduler_config["prediction_type"] == "epsilon"


def test_random_safetensors_file_is_refused(tmp_path):
  path = tmp_path / "random.safetensors"
  safetensors_io.save(str(path), {"weight": np.zeros((3, 3), np.float32)})
  _assert_one_line(_load_error(path), "no Stable Diffusion single-file layout recognised")


def test_non_safetensors_file_is_refused(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("hello")
  _assert_one_line(_load_error(path), "not a model folder nor a .safetensors/.ckpt")


def test_diffusers_component_file_is_refused(files):
  folder, _ = files["sd1"]
  err = _load_error(f"{folder}/unet/diffusion_pytorch_model.safetensors")
  _assert_one_line(err, "a diffusers/transformers component file", "diffusers folder")


def test_inpainting_unet_is_refused(files, tmp_path):
  def nine_channels(state):
    key = original_layout.UNET_PREFIX + "input_blocks.0.0.weight"
    out, _, kh, kw = state[key].shape
    state[key] = np.zeros((out, 9, kh, kw), np.float32)
  err = _load_error(_edited(files, tmp_path, edit=nine_channels))
  _assert_one_line(err, "9 input channels", "inpainting")


def test_sdxl_refiner_layout_is_refused(files, tmp_path):
  def refiner(state):
    for key in [k for k in state if k.startswith(original_layout.OPENCLIP_PREFIX)]:
      state[key.replace(original_layout.OPENCLIP_PREFIX, "conditioner.embedders.0.model.")] = (
          state.pop(key))
  err = _load_error(_edited(files, tmp_path, family="sd2", edit=refiner))
  _assert_one_line(err, "SDXL refiner")


def test_unknown_widths_are_refused_naming_the_shapes(files, tmp_path):
  def no_text_encoder(state):
    for key in [k for k in state if k.startswith(original_layout.CLIP_PREFIX)]:
      del state[key]
  err = _load_error(_edited(files, tmp_path, edit=no_text_encoder))
  _assert_one_line(err, "no cond_stage_model.* text encoder")

  def deeper_text_encoder(state):
    layer = original_layout.CLIP_PREFIX + "text_model.encoder.layers."
    for key in [k for k in state if k.startswith(layer + "1.")]:
      state[key.replace(layer + "1.", layer + "2.")] = state[key]
  err = _load_error(_edited(files, tmp_path, edit=deeper_text_encoder, name="deeper.safetensors"))
  _assert_one_line(err, "SD 1.x layout whose shapes match no known architecture",
                   "text_encoder.num_hidden_layers=3")


def test_unexpected_component_key_is_refused(files, tmp_path):
  def extra(state):
    state[original_layout.UNET_PREFIX + "input_blocks.1.2.weight"] = np.zeros(3, np.float32)
  err = _load_error(_edited(files, tmp_path, edit=extra))
  _assert_one_line(err, "unexpected key model.diffusion_model.input_blocks.1.2.weight")


def test_ckpt_pickle_needs_allow_pickle_and_then_loads(files, loaded, tmp_path):
  import torch
  folder, path = files["sd1"]
  state = {k: torch.from_numpy(np.array(v)) for k, v in safetensors_io.load(path).items()}
  ckpt = tmp_path / "model.ckpt"
  torch.save({"state_dict": state, "global_step": 1}, ckpt)
  _assert_one_line(_load_error(ckpt), "is a pickle", "convert it to safetensors", "allow_pickle")
  sd = load_stable_diffusion(str(ckpt), tokenizer=folder, allow_pickle=True)
  ref = loaded["sd1"][1]
  np.testing.assert_array_equal(sd.unet_params["conv_in"]["kernel"],
                                ref.unet_params["conv_in"]["kernel"])


def test_default_tokenizer_offline_is_a_one_line_error(files, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  err = _load_error(files["sd1"][1])
  _assert_one_line(err, "cannot fetch tokenizer 'openai/clip-vit-large-patch14'")


def test_training_config_loads_a_single_file(files):
  """`pretrained_model_name_or_path=<file>` with `tokenizer_name_or_path` in a training config."""
  from ti_jax.training import config as training_config
  from ti_jax.training import inputs as run_inputs
  folder, path = files["sd2"]
  config = training_config.get_config("tiny")
  config.pretrained_model_name_or_path = path
  config.tokenizer_name_or_path = folder
  config.dtype = "float32"
  sd, _ = run_inputs.load_model(config)
  assert sd.path == path and sd.model_index["preset"] == "tiny-sd21"


# --- SDXL base: the key mapping at the state-dict level, on tiny SDXL-shaped torch models ---

_SDXL_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64), "layers_per_block": 2,
    "transformer_layers_per_block": (1, 1, 2), "attention_head_dim": (2, 4, 4),
    "cross_attention_dim": 64, "norm_num_groups": 8, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 16,  # 6 size/crop numbers + pooled width
}


@pytest.fixture(scope="module")
def sdxl_states():
  """(configs, state dicts) of tiny SDXL-shaped diffusers/transformers torch models."""
  import torch
  import transformers
  from diffusers import AutoencoderKL, UNet2DConditionModel
  torch.manual_seed(0)
  vae_config = {"block_out_channels": (16, 32), "down_block_types": ("DownEncoderBlock2D",) * 2,
                "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1,
                "norm_num_groups": 8, "latent_channels": 4}
  text = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2, "max_position_embeddings": 77, "projection_dim": 16}
  models = {
      "unet": (_SDXL_UNET, UNet2DConditionModel(**_SDXL_UNET)),
      "vae": (vae_config, AutoencoderKL(**vae_config)),
      "text_encoder": (text, transformers.CLIPTextModel(
          transformers.CLIPTextConfig(**text, hidden_act="quick_gelu"))),
      "text_encoder_2": (text, transformers.CLIPTextModelWithProjection(
          transformers.CLIPTextConfig(**text, hidden_act="gelu"))),
  }
  configs = {comp: dict(cfg) for comp, (cfg, _) in models.items()}
  states = {comp: {k: v.detach().numpy().copy() for k, v in m.state_dict().items()
                   if not k.endswith("position_ids")}
            for comp, (_, m) in models.items()}
  return configs, states


def test_sdxl_original_layout_agrees_with_diffusers_converters(sdxl_states):
  """Written with ti_jax's mapping, read back by diffusers' converters: the same state dicts."""
  import torch
  from diffusers.loaders import single_file_utils as sfu
  configs, states = sdxl_states
  original = single_file_models.original_state_dict("sdxl", configs, states)
  assert "model.diffusion_model.label_emb.0.0.weight" in original
  assert "conditioner.embedders.1.model.text_projection" in original
  checkpoint = {k: torch.from_numpy(v) for k, v in original.items()}
  text_model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=32))
  got = {"unet": sfu.convert_ldm_unet_checkpoint(checkpoint, configs["unet"]),
         "vae": sfu.convert_ldm_vae_checkpoint(checkpoint, configs["vae"]),
         "text_encoder": sfu.convert_ldm_clip_checkpoint(checkpoint),
         "text_encoder_2": sfu.convert_open_clip_checkpoint(
             text_model, checkpoint, prefix=original_layout.SDXL_OPENCLIP_PREFIX)}
  for comp, want in states.items():
    actual = {k: v for k, v in got[comp].items() if not k.endswith("position_ids")}
    assert sorted(actual) == sorted(want), comp
    for key, value in want.items():
      np.testing.assert_array_equal(actual[key].numpy(), value, err_msg=f"{comp} {key}")


def test_sdxl_file_is_recognised_and_renamed_back(sdxl_states):
  """The loader's side: family, shape signature, and the renamed state dicts equal the originals."""
  configs, states = sdxl_states
  original = single_file_models.original_state_dict("sdxl", configs, states)
  shapes = {k: v.shape for k, v in original.items()}
  assert single_file.detect_family(shapes, "x.safetensors") == "sdxl"
  sig = single_file._file_signature("sdxl", shapes)  # pylint: disable=protected-access
  assert sig["unet.transformer_layers_per_block"] == [1, 1, 2]
  assert sig["unet.down_block_types"] == list(_SDXL_UNET["down_block_types"])
  assert sig["unet.cross_attention_dim"] == 64 and sig["text_encoder_2.num_hidden_layers"] == 2
  expected = {comp: {k: v.shape for k, v in state.items()} for comp, state in states.items()}
  renamed = single_file.component_state_dicts("sdxl", original, configs, expected, "x")
  for comp, want in states.items():
    assert sorted(renamed[comp]) == sorted(want), comp
    for key, value in want.items():
      np.testing.assert_array_equal(renamed[comp][key], value, err_msg=f"{comp} {key}")


@pytest.mark.skipif("tiny-sdxl" not in presets.TINY_MODELS,
                    reason="needs ti_jax's SDXL models and the tiny-sdxl preset")
def test_sdxl_single_file_loads_the_same_model_as_its_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("sdxl")
  folder = tiny_models.write_tiny_model(str(root / "tiny-sdxl"), "tiny-sdxl")
  path = single_file_models.write_single_file(folder, str(root / "sdxl.safetensors"), "sdxl")
  ref, sd = load_stable_diffusion(folder), load_stable_diffusion(path, tokenizer=folder)
  assert sd.family == "sdxl" and sd.model_index["preset"] == "tiny-sdxl"
  pieces = lambda m: ([(n, getattr(m, n), getattr(m, f"{n}_params")) for n in ("unet", "vae")]
                      + [(e.role, e.module, e.params) for e in m.text_encoders])
  assert [n for n, _, _ in pieces(sd)] == ["unet", "vae", "text_encoder", "text_encoder_2"]
  for (name, module, params), (_, ref_module, ref_params) in zip(pieces(sd), pieces(ref),
                                                                 strict=True):
    assert module.config == ref_module.config, name
    np.testing.assert_equal(jax.tree_util.tree_map(np.asarray, params),
                            jax.tree_util.tree_map(np.asarray, ref_params))
  assert (sd.text_encoders[1].tokenizer("a photo").input_ids
          == ref.text_encoders[1].tokenizer("a photo").input_ids)
  public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}
  assert public(sd.scheduler_config) == public(ref.scheduler_config)


def _original_shapes(family, configs, expected):
  """Original-layout key -> shape for the diffusers shapes `expected` (no arrays)."""
  out = {}
  for comp, shapes in expected.items():
    for key, shape in shapes.items():
      source = original_layout.diffusers_to_original(family, comp, key, configs[comp])
      if source.op.startswith("qkv"):
        shape = (3 * shape[0], *shape[1:])
      elif source.op == "conv1x1":
        shape = (*shape, 1, 1)
      elif source.op == "T":
        shape = shape[::-1]
      out[source.key] = tuple(shape)
  return out


@pytest.mark.parametrize("name", ["sd15", "sd21"] + (["sdxl"] if "sdxl" in presets.PRESETS else []))
def test_full_size_files_are_recognised_and_fit_their_models(name):
  """A real-size file (shapes only, zero-stride arrays) is recognised as its preset and renames
  onto every parameter of the model built from it (SD 2.x: with OpenCLIP's 24th resblock)."""
  from ti_jax.weights.pipeline import build_modules, component_spec, param_shapes
  family = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}[name]
  configs = presets.preset(name)
  components = ("unet", "vae", *original_layout.TEXT_ENCODERS[family])
  flax_shapes = param_shapes(build_modules(configs))
  expected = {comp: original_layout.torch_shapes(component_spec(comp, configs[comp]),
                                             flax_shapes[comp]) for comp in components}
  shapes = _original_shapes(family, configs, expected)
  if family == "sd2":
    block = original_layout.OPENCLIP_PREFIX + "transformer.resblocks."
    shapes.update({k.replace(f"{block}22.", f"{block}23."): v for k, v in shapes.items()
                   if k.startswith(f"{block}22.")})
    shapes[original_layout.OPENCLIP_PREFIX + "text_projection"] = (1024, 1024)
  assert single_file.detect_family(shapes, "x") == family
  found, got = single_file.configs_for(family, shapes, "x")
  assert found == name
  assert all(got[comp] == configs[comp] for comp in components)
  state = {k: np.broadcast_to(np.zeros((), np.float16), s) for k, s in shapes.items()}
  renamed = single_file.component_state_dicts(family, state, got, expected, "x")
  for comp in components:
    assert {k: v.shape for k, v in renamed[comp].items()} == expected[comp], comp


def test_missing_checkpoint_file_is_named_not_sent_to_the_hub():
  _assert_one_line(_load_error("models/missing.safetensors"),
                   "checkpoint file not found: models/missing.safetensors")
