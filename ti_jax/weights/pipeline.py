"""What every model loader shares: a pipeline's component roles, the loaded model and its errors.

`StableDiffusion` is what `ti_jax.weights.loading` (diffusers folders and hub
ids) and `ti_jax.weights.single_file` (original-layout checkpoint files)
return, for FLUX.1 too (family "flux": a `transformer` where the others have a
`unet`, CLIP-L and T5 as its two `TextEncoder` records); `build_modules` turns
component configs into the Flax modules and `param_shapes` gives their param trees without allocating them, for those two
loaders and for the tiny models' writer (`ti_jax.weights.tiny_models`).
`download_from_hub` fetches a repo's files for either loader. Every failure is a
`ModelLoadError` whose message is one line.

This module sits below the loaders so that they import it, and
`loading` imports `single_file` and `tiny_models`, without a circle.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ti_jax import errors
from ti_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from ti_jax.models.config_utils import UnsupportedConfigError
from ti_jax.models.flux import FluxConfig, FluxTransformer2DModel
from ti_jax.models.layers import resolve_attention_impl
from ti_jax.models.ldm_bert import LDMBertConfig, LDMBertModel, is_ldm_bert_config
from ti_jax.models.t5 import T5EncoderConfig, T5EncoderModel
from ti_jax.models.unet import UNet2DConditionModel, UNetConfig
from ti_jax.models.vae import AutoencoderKL, VAEConfig
from ti_jax.runtime import console
from ti_jax.weights import convert


class ModelLoadError(errors.UserError):
  """A model folder, file or config cannot be used; the message is one line for the user."""


# The roles every supported pipeline has; SDXL adds text_encoder_2. FLUX.1 has a
# transformer where these have a unet (`DENOISERS`).
COMPONENTS = ("unet", "vae", "text_encoder")
# The denoiser role of each family: the UNet (SD, SDXL, LDM) or Flux's transformer.
DENOISERS = ("unet", "transformer")
# The tokenizer folder of each text encoder role.
TOKENIZER_FOLDERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}

# Per pipeline class: the folder of each component role.
PIPELINE_FOLDERS = {
    "StableDiffusionPipeline": {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder"},
    "LDMTextToImagePipeline": {"unet": "unet", "vae": "vqvae", "text_encoder": "bert"},
    "StableDiffusionXLPipeline": {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder",
                                  "text_encoder_2": "text_encoder_2"},
    # FLUX.1: text_encoder is CLIP-L (only its pooled output is used), text_encoder_2 T5.
    "FluxPipeline": {"transformer": "transformer", "vae": "vae", "text_encoder": "text_encoder",
                     "text_encoder_2": "text_encoder_2"},
}
# Model families (`StableDiffusion.family`).
FAMILIES = ("sd1", "sd2", "sdxl", "ldm", "flux")


def is_t5_config(config: dict) -> bool:
  """Whether a text encoder's config.json is a T5 encoder's (FLUX.1's text_encoder_2)."""
  return config.get("model_type") == "t5"


def component_spec(component: str, config: dict) -> convert.ComponentSpec:
  """How a component's checkpoint keys map onto its Flax tree (the text encoder's depends on its type)."""
  if component == "text_encoder":
    return convert.LDM_BERT if is_ldm_bert_config(config) else convert.TEXT_ENCODER
  if component == "text_encoder_2":
    return convert.T5_ENCODER if is_t5_config(config) else convert.TEXT_ENCODER_2
  return {"unet": convert.UNET, "vae": convert.VAE,
          "transformer": convert.FLUX_TRANSFORMER}[component]


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """One text encoder of a pipeline with its tokenizer: the unit a pseudo-word lives in.

  SD 1/2 and the LDM have one, SDXL two (CLIP ViT-L/14, then OpenCLIP ViT-bigG/14
  with its projection), FLUX.1 two (CLIP ViT-L/14, read for its pooled output, then
  the T5 v1.1 XXL encoder, read for its states). Whatever repeats per encoder
  (placeholder ids, initial and learned vectors, embedding-file parts) is a tuple indexed like
  `StableDiffusion.text_encoders`, so a third kind of encoder is one more record.
  """
  role: str  # the pipeline's component role: "text_encoder", "text_encoder_2"
  # Same calling convention (input_ids, inputs_embeds); each names its token table's
  # place in its params (`TOKEN_TABLE_PATH`).
  module: CLIPTextModel | LDMBertModel | T5EncoderModel
  params: Any
  tokenizer: Any  # a transformers CLIP, BERT or T5 tokenizer (None where only shapes are built)

  @property
  def width(self) -> int:
    """The token embedding width D (768 for SD 1.x's CLIP ViT-L, 1280 for SDXL's bigG,
    4096 for FLUX.1's T5)."""
    if isinstance(self.module, T5EncoderModel):
      return int(self.module.config.d_model)
    return int(self.module.config.hidden_size)

  @property
  def is_t5(self) -> bool:
    """Whether this is a T5 encoder (no positions, no pooled output, no bos token)."""
    return isinstance(self.module, T5EncoderModel)

  @property
  def suffix(self) -> str:
    """"" for a pipeline's first encoder, "_2" for the second: diffusers' naming
    (`text_encoder_2`, `learned_embeds_2.safetensors`), also ti_jax's checkpoint keys."""
    return "" if self.role == "text_encoder" else self.role[len("text_encoder"):]


@dataclasses.dataclass
class StableDiffusion:
  """A loaded model: frozen Flax modules, their params, text encoders and scheduler config.

  Also the paper's LDM-1.4B: its vqvae is a KL autoencoder (`vae`), its bert
  an `LDMBertModel` with a BERT tokenizer. `text_encoders` holds one
  `TextEncoder` per encoder, in the pipeline's order (SDXL: two; the second
  is a `CLIPTextModel` with `projection_dim`, transformers'
  `CLIPTextModelWithProjection`). SDXL's conditioning: `ti_jax.models.sdxl`.

  FLUX.1 (`family == "flux"`) is the same record with its denoiser in
  `transformer`/`transformer_params` and `unet`/`unet_params` None: the VAE, the
  text-encoder records (CLIP-L, then T5), the scheduler config and the tokenizer
  copies are handled as for the other families, and the denoiser is the one thing a
  caller picks by family.
  """
  source: str  # what the user passed: a folder or a hub id
  path: str  # the local diffusers folder
  unet: UNet2DConditionModel | None  # None for FLUX.1
  unet_params: Any
  vae: AutoencoderKL
  vae_params: Any
  text_encoders: tuple[TextEncoder, ...]
  scheduler_config: dict
  model_index: dict
  transformer: FluxTransformer2DModel | None = None  # FLUX.1's denoiser
  transformer_params: Any = None

  # The first encoder, which every family has (its module, params and tokenizer).
  @property
  def text_encoder(self) -> CLIPTextModel | LDMBertModel:
    return self.text_encoders[0].module

  @property
  def text_encoder_params(self) -> Any:
    return self.text_encoders[0].params

  @property
  def tokenizer(self) -> Any:
    return self.text_encoders[0].tokenizer

  def with_tokenizers(self, tokenizers) -> "StableDiffusion":
    """A copy whose encoders use `tokenizers` (one per encoder, e.g. copies holding new tokens)."""
    if len(tokenizers) != len(self.text_encoders):
      raise ValueError(f"{len(tokenizers)} tokenizers for {len(self.text_encoders)} text encoders")
    return dataclasses.replace(self, text_encoders=tuple(
        dataclasses.replace(e, tokenizer=t) for e, t in zip(self.text_encoders, tokenizers)))

  @property
  def family(self) -> str:
    """"sd1", "sd2", "sdxl", "ldm" or "flux" (see `model_family`)."""
    return model_family(self.model_index, self.text_encoder.config)

  @property
  def is_flux(self) -> bool:
    """Whether this is FLUX.1 (a transformer denoiser, CLIP-L + T5, rectified flow)."""
    return self.family == "flux"

  @property
  def is_sdxl(self) -> bool:
    """Whether this is Stable Diffusion XL (two text encoders, added UNet conditioning)."""
    return self.family == "sdxl"


def text_encoders(modules: dict, params: dict, tokenizers: dict) -> tuple[TextEncoder, ...]:
  """The pipeline's `TextEncoder` records, in role order, from per-role dicts."""
  return tuple(TextEncoder(role, modules[role], params[role], tokenizers.get(role))
               for role in TOKENIZER_FOLDERS if role in modules)


def convert_components(specs: dict, weights: dict, flax_shapes: dict, path: str, *,
                       param_dtype: Any, vae_dtype: Any = None) -> dict:
  """Each component's PyTorch-layout `weights` as its Flax param tree (`convert`), stored in
  `param_dtype` (the VAE in `vae_dtype`, if given); a mismatch is one line naming `path`."""
  params = {}
  for comp in flax_shapes:
    store_dtype = (vae_dtype or param_dtype) if comp == "vae" else param_dtype
    try:
      params[comp] = convert.convert_torch_state_dict(specs[comp], weights[comp],
                                                      flax_shapes[comp],
                                                      dtype=np.dtype(store_dtype))
    except convert.ConversionError as e:
      raise ModelLoadError(f"{path}: {e}") from None
  return params


def require_unet(sd: "StableDiffusion", task: str) -> None:
  """Refuses in one line a model that loads but that `task` ("train", "sample") cannot use yet:
  FLUX.1 where its transformer is not wired in (training, editing, evaluation, learned
  concepts; `ti_jax.sample` of plain prompts has its own program, `flux_generation`)."""
  if sd.unet is None:
    raise ModelLoadError(
        f"{sd.path}: a FLUX.1 model: ti_jax loads it but cannot {task} with it yet "
        "(Stable Diffusion 1.x/2.x, SDXL and the LDM can)")


def assemble(source: str, path: str, modules: dict, params: dict, tokenizers: dict,
             scheduler_config: dict, model_index: dict) -> StableDiffusion:
  """The loaded model from per-role dicts (a UNet or, for FLUX.1, a transformer)."""
  return StableDiffusion(
      source=source, path=path,
      unet=modules.get("unet"), unet_params=params.get("unet"),
      vae=modules["vae"], vae_params=params["vae"],
      text_encoders=text_encoders(modules, params, tokenizers),
      scheduler_config=scheduler_config, model_index=model_index,
      transformer=modules.get("transformer"), transformer_params=params.get("transformer"))


def model_family(model_index: dict, text_encoder_config: Any) -> str:
  """The family of a model: its pipeline class, and for SD 1/2 the text encoder.

  SD 2.x's OpenCLIP text encoder uses "gelu" where SD 1.x's OpenAI CLIP uses
  "quick_gelu" (the tiny presets keep that difference).
  """
  cls = model_index.get("_class_name") or "StableDiffusionPipeline"
  if cls == "StableDiffusionXLPipeline":
    return "sdxl"
  if cls == "LDMTextToImagePipeline":
    return "ldm"
  if cls == "FluxPipeline":
    return "flux"
  return "sd2" if getattr(text_encoder_config, "hidden_act", None) == "gelu" else "sd1"


def download_from_hub(name_or_path: str, *, revision: str | None, allow_patterns: list[str],
                      what: str) -> str:
  """Fetches `allow_patterns` of hub repo `name_or_path`; returns the local snapshot folder.

  A name that looks like a path (or is no "owner/name" id) is reported as a
  missing `what` folder instead of being sent to the hub.
  """
  looks_local = (name_or_path.startswith((".", "/", "~")) or os.sep + os.sep in name_or_path
                 or name_or_path.count("/") != 1)
  if looks_local:
    raise ModelLoadError(f"{what} folder not found: {name_or_path}")
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    return huggingface_hub.snapshot_download(name_or_path, revision=revision,
                                             allow_patterns=list(allow_patterns))
  except Exception as e:  # the hub client raises many types; all mean "not available"
    raise ModelLoadError(
        f"cannot fetch {what} {name_or_path!r} from the Hugging Face hub "
        f"(offline, unknown id or no access?): {console.one_line(e)}") from None


def build_modules(configs: dict[str, dict], *, dtype: Any = jnp.float32,
                  param_dtype: Any = jnp.float32, attention_impl: str | None = None,
                  vae_dtype: Any = None, remat: bool = False) -> dict[str, Any]:
  """Builds the Flax modules from diffusers/transformers config dicts (keyed by role).

  The text encoder is an LDMBert when its config says so, else CLIP; with a
  "text_encoder_2" config (SDXL) the UNet's context is both encoders' widths
  and its added embedding takes the second's projection.
  `vae_dtype` (default: `dtype`) sets the VAE's compute and param dtype apart
  from the UNet and text encoder. `remat` rematerialises the UNet's blocks in
  the backward pass (less activation memory, more compute).
  With a "transformer" config (FLUX.1) the denoiser is Flux's transformer and
  text_encoder_2 is T5 (`build_flux_modules`).
  """
  if "transformer" in configs:
    return build_flux_modules(configs, dtype=dtype, param_dtype=param_dtype,
                              attention_impl=attention_impl, vae_dtype=vae_dtype, remat=remat)
  ldm_bert = is_ldm_bert_config(configs["text_encoder"])
  try:
    unet_cfg = UNetConfig.from_diffusers(configs["unet"])
    vae_cfg = VAEConfig.from_diffusers(configs["vae"])
    text_cfg = (LDMBertConfig if ldm_bert else CLIPTextConfig).from_transformers(
        configs["text_encoder"])
  except UnsupportedConfigError as e:
    raise ModelLoadError(str(e)) from None
  text_2_cfg = None
  if "text_encoder_2" in configs:
    try:
      text_2_cfg = CLIPTextConfig.from_transformers(configs["text_encoder_2"])
    except UnsupportedConfigError as e:
      raise ModelLoadError(str(e).replace("text_encoder config", "text_encoder_2 config")) from None
  _check_widths(unet_cfg, text_cfg, text_2_cfg)
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  attention_impl = resolve_attention_impl(attention_impl)  # "" on a TPU host: the Pallas kernel
  text_cls = LDMBertModel if ldm_bert else CLIPTextModel
  modules = {
      "unet": UNet2DConditionModel(unet_cfg, attention_impl=attention_impl, remat=remat, **kw),
      "vae": AutoencoderKL(vae_cfg, dtype=vae_dtype or dtype, param_dtype=vae_dtype or param_dtype),
      "text_encoder": text_cls(text_cfg, attention_impl=attention_impl, **kw),
  }
  if text_2_cfg is not None:
    modules["text_encoder_2"] = CLIPTextModel(text_2_cfg, attention_impl=attention_impl, **kw)
  return modules


def build_flux_modules(configs: dict[str, dict], *, dtype: Any = jnp.float32,
                       param_dtype: Any = jnp.float32, attention_impl: str | None = None,
                       vae_dtype: Any = None, remat: bool = False) -> dict[str, Any]:
  """FLUX.1's Flax modules from its config dicts: transformer, vae, CLIP-L, T5 (`build_modules`).

  The transformer reads T5's states (`joint_attention_dim` = T5's `d_model`) and
  CLIP's pooled output (`pooled_projection_dim` = CLIP's `hidden_size`); a pair that
  does not fit is a one-line `ModelLoadError`. `remat` rematerialises the
  transformer's blocks.
  """
  if not is_t5_config(configs.get("text_encoder_2", {})):
    raise ModelLoadError("a Flux pipeline needs a T5 text_encoder_2 (T5EncoderModel)")
  try:
    flux_cfg = FluxConfig.from_diffusers(configs["transformer"])
    vae_cfg = VAEConfig.from_diffusers(configs["vae"])
    clip_cfg = CLIPTextConfig.from_transformers(configs["text_encoder"])
  except UnsupportedConfigError as e:
    raise ModelLoadError(str(e)) from None
  try:
    t5_cfg = T5EncoderConfig.from_transformers(configs["text_encoder_2"])
  except UnsupportedConfigError as e:
    raise ModelLoadError(str(e).replace("text encoder config", "text_encoder_2 config")) from None
  if t5_cfg.d_model != flux_cfg.joint_attention_dim:
    raise ModelLoadError(f"text_encoder_2 (T5) width {t5_cfg.d_model} does not match the "
                         f"transformer's joint_attention_dim {flux_cfg.joint_attention_dim}")
  if clip_cfg.hidden_size != flux_cfg.pooled_projection_dim:
    raise ModelLoadError(f"text_encoder (CLIP) width {clip_cfg.hidden_size} does not match the "
                         f"transformer's pooled_projection_dim {flux_cfg.pooled_projection_dim}")
  if vae_cfg.latent_channels * 4 != flux_cfg.in_channels:
    raise ModelLoadError(f"the VAE's {vae_cfg.latent_channels} latent channels, packed 2x2, are "
                         f"not the transformer's {flux_cfg.in_channels} input channels")
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  attention_impl = resolve_attention_impl(attention_impl)
  return {
      "transformer": FluxTransformer2DModel(flux_cfg, attention_impl=attention_impl, remat=remat,
                                            **kw),
      "vae": AutoencoderKL(vae_cfg, dtype=vae_dtype or dtype, param_dtype=vae_dtype or param_dtype),
      "text_encoder": CLIPTextModel(clip_cfg, attention_impl=attention_impl, **kw),
      "text_encoder_2": T5EncoderModel(t5_cfg, attention_impl=attention_impl, **kw),
  }


def _check_widths(unet_cfg: UNetConfig, text_cfg: Any, text_2_cfg: CLIPTextConfig | None) -> None:
  """The text encoders' widths must be what the UNet reads (one-line `ModelLoadError`)."""
  if text_2_cfg is None:
    if unet_cfg.addition_embed_type == "text_time":
      raise ModelLoadError("the UNet takes SDXL's added conditioning (addition_embed_type="
                           "'text_time') but the model has no text_encoder_2")
    if text_cfg.hidden_size != unet_cfg.cross_attention_dim:
      raise ModelLoadError(
          f"text encoder width {text_cfg.hidden_size} does not match the UNet's "
          f"cross_attention_dim {unet_cfg.cross_attention_dim}")
    return
  width = text_cfg.hidden_size + text_2_cfg.hidden_size
  if width != unet_cfg.cross_attention_dim:
    raise ModelLoadError(
        f"text encoder widths {text_cfg.hidden_size} + {text_2_cfg.hidden_size} do not match "
        f"the UNet's cross_attention_dim {unet_cfg.cross_attention_dim}")
  if unet_cfg.addition_embed_type != "text_time" or text_2_cfg.projection_dim is None:
    raise ModelLoadError("SDXL needs a UNet with addition_embed_type='text_time' and a "
                         "text_encoder_2 with projection (CLIPTextModelWithProjection)")
  added = text_2_cfg.projection_dim + 6 * unet_cfg.addition_time_embed_dim
  if added != unet_cfg.projection_class_embeddings_input_dim:
    raise ModelLoadError(
        f"text_encoder_2 projection_dim {text_2_cfg.projection_dim} + 6 time ids x "
        f"{unet_cfg.addition_time_embed_dim} = {added} does not match the UNet's "
        f"projection_class_embeddings_input_dim {unet_cfg.projection_class_embeddings_input_dim}")


def unet_dummy_inputs(config: UNetConfig, batch: int = 1, size: int | None = None) -> tuple:
  """Zero inputs `(sample, timesteps, context[, added_cond])` of the UNet's shapes (for init, tracing)."""
  size = size or 2 ** (len(config.block_out_channels) - 1)
  inputs = (jnp.zeros((batch, size, size, config.in_channels)), jnp.zeros((batch,)),
            jnp.zeros((batch, 1, config.cross_attention_dim)))
  if config.addition_embed_type == "text_time":
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    inputs += ({"text_embeds": jnp.zeros((batch, pooled)), "time_ids": jnp.zeros((batch, 6))},)
  return inputs


def flux_dummy_inputs(config: FluxConfig, batch: int = 1) -> tuple:
  """Zero inputs of the Flux transformer's shapes, one image and one text token (for init, tracing)."""
  guidance = jnp.zeros((batch,)) if config.guidance_embeds else None
  return (jnp.zeros((batch, 1, config.in_channels)),
          jnp.zeros((batch, 1, config.joint_attention_dim)),
          jnp.zeros((batch, config.pooled_projection_dim)), jnp.zeros((batch,)),
          jnp.zeros((1, 3)), jnp.zeros((1, 3)), guidance)


def _init_fn(role: str, module) -> Callable[[jax.Array], Any]:
  """`rng -> {"params": ...}` of one component on minimal dummy inputs (shapes only matter)."""
  if role == "transformer":
    return lambda rng: module.init(rng, *flux_dummy_inputs(module.config))
  if role == "unet":
    return lambda rng: module.init(rng, *unet_dummy_inputs(module.config))
  if role == "vae":
    vdown = 2 ** (len(module.config.block_out_channels) - 1)
    return lambda rng: module.init(rng, jnp.zeros((1, vdown, vdown, module.config.in_channels)))
  return lambda rng: module.init(rng, jnp.zeros((1, 1), jnp.int32))  # a text encoder


@functools.lru_cache(maxsize=32)
def _component_shapes(role: str, module) -> Any:
  # Tracing a UNet's init costs most of a second; a process that loads the same model
  # again (sampling after training, tests) gets the shapes back. Flax modules hash and
  # compare by their fields (config, dtypes, attention choice).
  return jax.eval_shape(_init_fn(role, module), jax.random.key(0))["params"]


def param_shapes(modules: dict[str, Any]) -> dict[str, Any]:
  """Per component, the param tree of `jax.ShapeDtypeStruct`s (no memory is allocated)."""
  # Fresh containers for each caller: they may edit their copy.
  return {name: jax.tree_util.tree_map(lambda x: x, _component_shapes(name, modules[name]))
          for name in tuple(r for r in DENOISERS if r in modules) + ("vae",)
          + tuple(r for r in TOKENIZER_FOLDERS if r in modules)}
