"""Loading diffusers folders: formats, hub ids and one-line errors for bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from ti_jax.weights import convert, safetensors_io
from ti_jax.weights.loading import (
  ModelLoadError,
  load_stable_diffusion,
  resolve_model_dir,
)


def _copy(src, tmp_path, name="model"):
  dst = tmp_path / name
  shutil.copytree(src, dst)
  return dst


def _assert_one_line(err: pytest.ExceptionInfo, *needles: str):
  msg = str(err.value)
  assert "\n" not in msg, msg
  for needle in needles:
    assert needle in msg, msg


def _unet_out(sd):
  x = jnp.ones((1, 8, 8, 4))
  # Compiled with the weights an argument: one program for every load of the same shapes
  # (from the persistent cache after the first), rather than the UNet op by op.
  forward = jax.jit(lambda params: sd.unet.apply({"params": params}, x, jnp.array([3]),
                                                 jnp.ones((1, 77, 32))))
  return np.asarray(forward(sd.unet_params))


def _load_error(model):
  with pytest.raises(ModelLoadError) as err:
    load_stable_diffusion(str(model))
  return err


def _error_after_json_edit(src, tmp_path, rel_path, edit):
  """Copies the model, applies `edit` to one of its JSON files, returns the load error."""
  model = _copy(src, tmp_path)
  path = model / rel_path
  cfg = json.loads(path.read_text())
  edit(cfg)
  path.write_text(json.dumps(cfg))
  return _load_error(model)


def test_missing_folder_is_a_one_line_error(tmp_path):
  with pytest.raises(ModelLoadError) as err:
    load_stable_diffusion(str(tmp_path / "nope"))
  _assert_one_line(err, "model folder not found", "nope")


def test_missing_config_file_is_named(tiny_sd15, tmp_path):
  model = _copy(tiny_sd15, tmp_path)
  os.remove(model / "unet" / "config.json")
  _assert_one_line(_load_error(model), "missing unet config", "unet/config.json")


def test_missing_weights_name_what_was_looked_for(tiny_sd15, tmp_path):
  model = _copy(tiny_sd15, tmp_path)
  os.remove(model / "vae" / "diffusion_pytorch_model.safetensors")
  _assert_one_line(_load_error(model), "no weights for vae", "diffusion_pytorch_model.safetensors")


def test_unsupported_architecture_field_is_refused(tiny_sd15, tmp_path):
  err = _error_after_json_edit(tiny_sd15, tmp_path, "unet/config.json",
                               lambda c: c.update(class_embed_type="timestep"))
  _assert_one_line(err, "class_embed_type='timestep'", "not supported")


def test_unsupported_block_type_is_refused(tiny_sd15, tmp_path):
  err = _error_after_json_edit(
      tiny_sd15, tmp_path, "unet/config.json",
      lambda c: c["down_block_types"].__setitem__(0, "SimpleCrossAttnDownBlock2D"))
  _assert_one_line(err, "SimpleCrossAttnDownBlock2D", "not supported")


def test_shape_mismatch_names_key_and_both_shapes(tiny_sd15, tmp_path):
  err = _error_after_json_edit(tiny_sd15, tmp_path, "unet/config.json",
                               lambda c: c.update(out_channels=8))  # checkpoint: 4
  _assert_one_line(err, "shape mismatch", "conv_out.", "checkpoint (4", "(8")


def test_text_encoder_narrower_than_the_unets_context_is_refused(tiny_sd15, tmp_path):
  err = _error_after_json_edit(tiny_sd15, tmp_path, "unet/config.json",
                               lambda c: c.update(cross_attention_dim=48))  # text encoder: 32
  _assert_one_line(err, "text encoder width 32", "cross_attention_dim 48")


def test_corrupt_safetensors_is_a_one_line_error(tiny_sd15, tmp_path):
  model = _copy(tiny_sd15, tmp_path)
  path = model / "text_encoder" / "model.safetensors"
  path.write_bytes(path.read_bytes()[:1000])
  with pytest.raises(ModelLoadError) as err:
    load_stable_diffusion(str(model))
  _assert_one_line(err, "cannot read", "model.safetensors")


def test_wrong_pipeline_class_is_refused(tiny_sd15, tmp_path):
  err = _error_after_json_edit(tiny_sd15, tmp_path, "model_index.json",
                               lambda c: c.update(_class_name="StableDiffusion3Pipeline"))
  _assert_one_line(err, "StableDiffusion3Pipeline", "not supported")


def test_sharded_bf16_fp16_variant_safetensors_load(tiny_sd15, tmp_path):
  """A UNet split into two bf16 shards with an index, as an `fp16`-variant file set."""
  model = _copy(tiny_sd15, tmp_path)
  ref = _unet_out(load_stable_diffusion(str(tiny_sd15)))
  unet_dir = model / "unet"
  state = safetensors_io.load(str(unet_dir / "diffusion_pytorch_model.safetensors"))
  keys = sorted(state)
  shards = {"diffusion_pytorch_model.fp16-00001-of-00002.safetensors": keys[: len(keys) // 2],
            "diffusion_pytorch_model.fp16-00002-of-00002.safetensors": keys[len(keys) // 2:]}
  weight_map = {}
  for fname, names in shards.items():
    safetensors_io.save(str(unet_dir / fname),
                        {k: np.asarray(state[k]).astype(jnp.bfloat16) for k in names})
    weight_map.update({k: fname for k in names})
  (unet_dir / "diffusion_pytorch_model.fp16.safetensors.index.json").write_text(
      json.dumps({"weight_map": weight_map}))
  for comp, stem in (("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
    shutil.copy(model / comp / f"{stem}.safetensors", model / comp / f"{stem}.fp16.safetensors")
  os.remove(unet_dir / "diffusion_pytorch_model.safetensors")
  sd = load_stable_diffusion(str(model), variant="fp16")
  # bf16 storage rounds the weights: close to, not equal to, the fp32 output.
  np.testing.assert_allclose(_unet_out(sd), ref, atol=0.05 * np.abs(ref).max())


@pytest.mark.parametrize("weight_map", [["a", "b"], {"a": 3}, {"a": ""}, "shard.safetensors"])
def test_malformed_safetensors_index_is_a_one_line_error(tiny_sd15, tmp_path, weight_map):
  model = _copy(tiny_sd15, tmp_path)
  os.remove(model / "unet" / "diffusion_pytorch_model.safetensors")
  (model / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
      json.dumps({"weight_map": weight_map}))
  with pytest.raises(ModelLoadError) as err:
    load_stable_diffusion(str(model))
  _assert_one_line(err, "safetensors index", "weight_map")


def test_legacy_flax_msgpack_loads(tiny_sd15, tmp_path):
  """diffusers' old Flax UNet files (query/key/value/proj_attn names) load to the same model."""
  model = _copy(tiny_sd15, tmp_path)
  ref_sd = load_stable_diffusion(str(tiny_sd15))
  legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
  flat = traverse_util.flatten_dict(jax.device_get(ref_sd.unet_params))
  legacy = {tuple(legacy_names.get(p, p) for p in path): v for path, v in flat.items()}
  (model / "unet" / "diffusion_flax_model.msgpack").write_bytes(
      serialization.msgpack_serialize(traverse_util.unflatten_dict(legacy)))
  os.remove(model / "unet" / "diffusion_pytorch_model.safetensors")
  np.testing.assert_array_equal(_unet_out(load_stable_diffusion(str(model))), _unet_out(ref_sd))


def test_legacy_vae_attention_conv_weights_load(tiny_sd15, tmp_path):
  """Old VAE checkpoints store mid-block attention as 1x1 convs named query/key/value/proj_attn."""
  model = _copy(tiny_sd15, tmp_path)
  path = model / "vae" / "diffusion_pytorch_model.safetensors"
  state = {k: np.array(v) for k, v in safetensors_io.load(str(path)).items()}  # copy: we overwrite the mapped file
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for key, value in state.items():
    new = key
    for a, b in renames.items():
      if f".attentions.0.{a}." in key:
        new = key.replace(f".{a}.", f".{b}.")
        if key.endswith("weight"):
          value = np.asarray(value)[:, :, None, None]
    legacy[new] = np.asarray(value)
  safetensors_io.save(str(path), legacy)
  sd = load_stable_diffusion(str(model))
  ref = load_stable_diffusion(str(tiny_sd15))
  x = jnp.linspace(-1, 1, 64 * 64 * 3).reshape(1, 64, 64, 3)
  out = sd.vae.apply({"params": sd.vae_params}, x, method=sd.vae.encode)[0]
  want = ref.vae.apply({"params": ref.vae_params}, x, method=ref.vae.encode)[0]
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


def test_pickle_bin_needs_permission_then_loads(tiny_sd15, tmp_path):
  torch = pytest.importorskip("torch")
  model = _copy(tiny_sd15, tmp_path)
  path = model / "text_encoder" / "model.safetensors"
  state = {k: torch.from_numpy(np.array(v)) for k, v in safetensors_io.load(str(path)).items()}
  torch.save(state, model / "text_encoder" / "pytorch_model.bin")
  os.remove(path)
  with pytest.raises(ModelLoadError) as err:
    load_stable_diffusion(str(model))
  _assert_one_line(err, "pytorch_model.bin", "pickle", "allow_pickle")
  sd = load_stable_diffusion(str(model), allow_pickle=True)
  ref = load_stable_diffusion(str(tiny_sd15))
  ids = np.arange(10)[None]
  np.testing.assert_array_equal(
      np.asarray(sd.text_encoder.apply({"params": sd.text_encoder_params}, ids)),
      np.asarray(ref.text_encoder.apply({"params": ref.text_encoder_params}, ids)))


def test_hub_id_downloads_only_needed_files(tiny_sd15, monkeypatch):
  import huggingface_hub
  calls = {}

  def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
    calls.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
    return tiny_sd15

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  sd = load_stable_diffusion("someone/tiny-sd", revision="main")
  assert sd.path == tiny_sd15 and sd.source == "someone/tiny-sd"
  patterns = calls["allow_patterns"]
  assert calls["repo_id"] == "someone/tiny-sd" and calls["revision"] == "main"
  assert "unet/diffusion_pytorch_model.safetensors" in patterns
  assert "text_encoder/model.safetensors" in patterns
  assert not any(p.endswith(".bin") or p.endswith(".ckpt") for p in patterns)
  assert not any("*.safetensors" == p.split("/")[-1] for p in patterns)  # no whole-folder globs
  resolve_model_dir("someone/tiny-sd", allow_pickle=True, variant="fp16")
  assert "unet/diffusion_pytorch_model.fp16.bin" in calls["allow_patterns"]


def test_hub_failure_is_a_one_line_error(monkeypatch):
  import huggingface_hub

  def failing(*args, **kwargs):
    raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
  with pytest.raises(ModelLoadError) as err:
    load_stable_diffusion("someone/missing-model")
  _assert_one_line(err, "someone/missing-model", "couldn't connect")


def test_flax_tree_check_reports_shape_mismatch():
  target = {"a": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32)}}
  with pytest.raises(convert.ConversionError, match=r"a/kernel: checkpoint \(4, 3\) vs model \(3, 4\)"):
    convert.check_flax_tree("unet", {"a": {"kernel": np.zeros((4, 3))}}, target)


def test_huge_config_file_is_a_one_line_error(tiny_sd15, tmp_path):
  """JSON configs are read with the text-input size limit, never whole whatever their size."""
  model = _copy(tiny_sd15, tmp_path)
  with open(model / "unet" / "config.json", "ab") as f:
    f.truncate(17 * 2**20)
  with pytest.raises(ModelLoadError) as err:
    load_stable_diffusion(str(model))
  _assert_one_line(err, "config.json", "MiB")
