"""Architecture configs of the real and tiny latent diffusion models, as diffusers writes them.

The SD 1.5, SD 2.1, SDXL base 1.0, LDM-1.4B and FLUX.1 entries are the `config.json`
contents of the public checkpoints (architecture fields only); tests use them to prove that real
checkpoints convert key for key, and benchmarks build random-weight models of
those shapes. The tiny entries keep their model's topology (SD 1.5, SD 2.1,
SDXL, LDM, Flux) at toy widths for offline tests and the demo; `TINY_MODELS` lists their
names, the one list every other module imports.
"""

from __future__ import annotations

import copy
import os
from typing import Any

_SCHEDULER_BASE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}

_SD15 = {
    "unet": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4,
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "CrossAttnDownBlock2D", "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                           "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
        "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 768,
        "attention_head_dim": 8, "use_linear_projection": False, "upcast_attention": False,
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
        "act_fn": "silu", "norm_num_groups": 32, "sample_size": 512,
        "scaling_factor": 0.18215,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
        "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
    "scheduler": dict(_SCHEDULER_BASE, _class_name="PNDMScheduler", skip_prk_steps=True,
                      prediction_type="epsilon"),
}

_SD21 = copy.deepcopy(_SD15)
_SD21["unet"].update(sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                     use_linear_projection=True, upcast_attention=True)
_SD21["vae"].update(sample_size=768)
_SD21["text_encoder"].update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                             num_attention_heads=16, hidden_act="gelu", projection_dim=512)
_SD21["scheduler"] = dict(_SCHEDULER_BASE, _class_name="DDIMScheduler",
                          prediction_type="v_prediction")


# The paper's LDM-1.4B as diffusers publishes it ("CompVis/ldm-text2im-large-256"):
# the SD 1.x UNet topology at 256 px with 1280-wide LDMBert context, a KL-f8
# autoencoder (folder "vqvae") and DDIM.
_LDM = copy.deepcopy(_SD15)
_LDM["unet"].update(sample_size=32, cross_attention_dim=1280)
_LDM["vae"].update(sample_size=256)
_LDM["text_encoder"] = {
    "architectures": ["LDMBertModel"], "model_type": "ldmbert",
    "vocab_size": 30522, "max_position_embeddings": 77, "d_model": 1280,
    "encoder_layers": 32, "encoder_ffn_dim": 5120, "encoder_attention_heads": 8,
    "head_dim": 64, "activation_function": "gelu", "scale_embedding": False,
    "pad_token_id": 0,
}
_LDM["scheduler"] = dict(_SCHEDULER_BASE, _class_name="DDIMScheduler",
                         prediction_type="epsilon")


def _tiny(base: dict, **unet_overrides) -> dict:
  cfg = copy.deepcopy(base)
  cfg["unet"].update(
      sample_size=8, block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=8,
      down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
      cross_attention_dim=32, **unet_overrides)
  cfg["vae"].update(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8,
                    sample_size=64)
  # vocab_size is set by the writer from the tiny tokenizer it writes.
  if cfg["text_encoder"]["model_type"] == "ldmbert":
    cfg["text_encoder"].update(d_model=32, encoder_ffn_dim=64, encoder_layers=2,
                               encoder_attention_heads=2, head_dim=8)
  else:
    cfg["text_encoder"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, projection_dim=32)
  return cfg


# Stable Diffusion XL base 1.0 ("stabilityai/stable-diffusion-xl-base-1.0"): a
# 3-level UNet with 1/2/10 transformer layers per level and 2048-wide context
# (CLIP ViT-L's 768 + OpenCLIP bigG's 1280, both penultimate layers), the added
# "text_time" embedding (bigG's projected pooled state + 6 size/crop ids of 256
# features each = 2816), a VAE with scaling 0.13025 that overflows in fp16
# (force_upcast), and Euler sampling.
_SDXL = {
    "unet": {
        "sample_size": 128, "in_channels": 4, "out_channels": 4,
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
        "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 2048,
        "attention_head_dim": [5, 10, 20], "num_attention_heads": None,
        "use_linear_projection": True, "upcast_attention": None,
        "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
    },
    "vae": dict(_SD15["vae"], sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    "text_encoder": copy.deepcopy(_SD15["text_encoder"]),
    "text_encoder_2": {
        "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
        "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
        "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 1280,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
    "scheduler": dict(_SCHEDULER_BASE, _class_name="EulerDiscreteScheduler",
                      prediction_type="epsilon", skip_prk_steps=True,
                      interpolation_type="linear", sample_max_value=1.0,
                      timestep_spacing="leading", use_karras_sigmas=False),
}


def _tiny_sdxl() -> dict:
  """SDXL's topology at toy widths: two 32-wide encoders (context 64), 8 features per time id."""
  cfg = copy.deepcopy(_SDXL)
  cfg["unet"].update(
      sample_size=8, block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=8,
      transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 4],
      cross_attention_dim=64, addition_time_embed_dim=8,
      # bigG's projection width (24, apart from its hidden 32 to catch a mix-up) + 6 * 8
      projection_class_embeddings_input_dim=24 + 6 * 8)
  cfg["vae"].update(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8,
                    sample_size=64)
  # vocab_size is set by the writer from the tiny tokenizer it writes.
  cfg["text_encoder"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, projection_dim=32)
  cfg["text_encoder_2"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, projection_dim=24)
  return cfg


# FLUX.1 ("black-forest-labs/FLUX.1-dev", "FLUX.1-schnell"): a 12e9-parameter rectified-flow
# transformer (19 double-stream + 38 single-stream blocks, 24 heads of 128) over 2x2-packed
# 16-channel latents (64 features per token); CLIP ViT-L (`text_encoder`, only its pooled state
# is used) and T5-XXL (`text_encoder_2`, 4096-wide states); a 16-channel VAE without quant convs
# that shifts its latents; flow-matching Euler sampling. dev embeds the guidance scale, schnell
# (timestep-distilled, 4 steps) does not and samples without the resolution shift.
# transformers' `config.json` of FLUX.1's `text_encoder_2` (google/t5-v1_1-xxl's encoder).
T5_XXL_CONFIG: dict[str, Any] = {
    "architectures": ["T5EncoderModel"],
    "model_type": "t5",
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "tie_word_embeddings": False,
}

# The same architecture at test size: d_model 32, 2 layers, 4 heads of 12 (their 48 differ
# from d_model, so a swapped q/o layout shows), XXL's 32 buckets up to distance 128. The
# vocabulary, a multiple of 128 as XXL's 32,128 is, holds the tiny T5 tokenizer's ids
# (`tiny_t5_tokenizer`: 593) with spare rows past them, as T5's table has past its 32,100.
TINY_T5_CONFIG: dict[str, Any] = {
    **T5_XXL_CONFIG,
    "vocab_size": 640, "d_model": 32, "d_kv": 12, "d_ff": 64, "num_layers": 2, "num_heads": 4,
}


_FLUX_DEV = {
    "transformer": {
        "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19,
        "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
        "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
        "axes_dims_rope": [16, 56, 56],
    },
    "vae": dict(_SD15["vae"], sample_size=1024, latent_channels=16, use_quant_conv=False,
                use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
                force_upcast=True, mid_block_add_attention=True, latents_mean=None,
                latents_std=None),
    "text_encoder": copy.deepcopy(_SD15["text_encoder"]),
    "text_encoder_2": copy.deepcopy(T5_XXL_CONFIG),
    "scheduler": {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
        "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
        "base_image_seq_len": 256, "max_image_seq_len": 4096,
    },
}
_FLUX_SCHNELL = copy.deepcopy(_FLUX_DEV)
_FLUX_SCHNELL["transformer"].update(guidance_embeds=False)
_FLUX_SCHNELL["scheduler"].update(shift=1.0, use_dynamic_shifting=False)


def _tiny_flux() -> dict:
  """FLUX.1-dev's topology at toy widths: 2 double + 2 single blocks, 2 heads of 16 (RoPE axes
  4 + 6 + 6), a 32-wide CLIP (pooled 32) and 32-wide T5 states, the 16-channel VAE at SD's tiny widths."""
  cfg = copy.deepcopy(_FLUX_DEV)
  cfg["transformer"].update(num_layers=2, num_single_layers=2, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=32,
                            pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
  cfg["vae"].update(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8,
                    sample_size=64)
  # vocab_size is set by the writer from the tiny tokenizer it writes.
  cfg["text_encoder"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, projection_dim=32)
  cfg["text_encoder_2"] = copy.deepcopy(TINY_T5_CONFIG)
  return cfg


PRESETS: dict[str, dict[str, Any]] = {
    "sd15": _SD15,
    "sd21": _SD21,
    "tiny-sd15": _tiny(_SD15, attention_head_dim=2),
    "tiny-sd21": _tiny(_SD21, attention_head_dim=[2, 4, 4]),
    "ldm": _LDM,
    "tiny-ldm": _tiny(_LDM, attention_head_dim=2),
    "sdxl": _SDXL,
    "tiny-sdxl": _tiny_sdxl(),
    "flux-dev": _FLUX_DEV,
    "flux-schnell": _FLUX_SCHNELL,
    "tiny-flux": _tiny_flux(),
}
# The Flux presets: their pipeline has a `transformer` where the others have a `unet`.
FLUX_PRESETS = ("flux-dev", "flux-schnell", "tiny-flux")
# The tiny random-weight models ti_jax writes itself (`ti_jax.weights.tiny_models`):
# the names `pretrained_model_name_or_path` and `python -m ti_jax.tiny_model --preset` take.
# tiny-flux writes a FluxPipeline folder (its T5 tokenizer: `tiny_t5_tokenizer`).
TINY_MODELS = tuple(name for name in PRESETS if name.startswith("tiny-"))

# Trained models that ship inside the package (diffusers folders): name -> folder.
# "tiny-world" is the base model of ti_jax's procedural world (`ti_jax.world`).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_MODELS = {"tiny-world": os.path.join(_PACKAGE_DIR, "world", "assets", "tiny-world")}


def preset(name: str) -> dict[str, Any]:
  """A deep copy of the named preset's component configs (unet, vae, text_encoder, scheduler).

  SDXL presets also have text_encoder_2; Flux presets have a transformer instead of a
  unet and T5 as text_encoder_2.
  """
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r} (known: {', '.join(PRESETS)})")
  return copy.deepcopy(PRESETS[name])
