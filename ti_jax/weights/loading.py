"""Loading diffusers-format latent diffusion folders (local or from the hub) into ti_jax models.

`load_stable_diffusion(name_or_path)` returns the Flax modules with
their params, the tokenizer(s) and the scheduler config. It reads Stable
Diffusion 1.x/2.x folders (`StableDiffusionPipeline`: unet, vae,
text_encoder = CLIP), Stable Diffusion XL folders (`StableDiffusionXLPipeline`:
also text_encoder_2 = OpenCLIP bigG with projection, tokenizer_2) and the paper's LDM-1.4B (`LDMTextToImagePipeline`:
unet, vqvae = a KL autoencoder, bert = LDMBert with a BERT tokenizer); the
components are addressed by role (unet, vae, text_encoder) whatever their
folder is called. Weights come from
PyTorch-layout `.safetensors` (preferred), diffusers/transformers Flax
`.msgpack`, or, only with `allow_pickle=True` and torch installed, `.bin`
pickles. Every failure is a `ModelLoadError` whose message is one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ti_jax import errors
from ti_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from ti_jax.models.config_utils import UnsupportedConfigError
from ti_jax.models.layers import resolve_attention_impl
from ti_jax.models.ldm_bert import LDMBertConfig, LDMBertModel, is_ldm_bert_config
from ti_jax.models.unet import UNet2DConditionModel, UNetConfig
from ti_jax.models.vae import AutoencoderKL, VAEConfig
from ti_jax.runtime import fileio
from ti_jax.weights import convert, presets, safetensors_io


class ModelLoadError(errors.UserError):
  """A model folder, file or config cannot be used; the message is one line for the user."""


# Weight file stems per component: diffusers models vs transformers models.
_WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                 "text_encoder": "model", "text_encoder_2": "model"}
_FLAX_FILES = {"unet": "diffusion_flax_model.msgpack", "vae": "diffusion_flax_model.msgpack",
               "text_encoder": "flax_model.msgpack", "text_encoder_2": "flax_model.msgpack"}
_BIN_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
              "text_encoder": "pytorch_model", "text_encoder_2": "pytorch_model"}
# The roles every supported pipeline has; SDXL adds text_encoder_2.
COMPONENTS = ("unet", "vae", "text_encoder")
# The tokenizer folder of each text encoder role.
TOKENIZER_FOLDERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}

# Per pipeline class: the folder of each component role, and the tokenizer
# classes its folder may name.
PIPELINE_FOLDERS = {
    "StableDiffusionPipeline": {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder"},
    "LDMTextToImagePipeline": {"unet": "unet", "vae": "vqvae", "text_encoder": "bert"},
    "StableDiffusionXLPipeline": {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder",
                                  "text_encoder_2": "text_encoder_2"},
}
# Model families (`StableDiffusion.family`).
FAMILIES = ("sd1", "sd2", "sdxl", "ldm")
_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast", "BertTokenizer", "BertTokenizerFast")


def component_spec(component: str, config: dict) -> convert.ComponentSpec:
  """How a component's checkpoint keys map onto its Flax tree (the text encoder's depends on its type)."""
  if component == "text_encoder":
    return convert.LDM_BERT if is_ldm_bert_config(config) else convert.TEXT_ENCODER
  if component == "text_encoder_2":
    return convert.TEXT_ENCODER_2
  return {"unet": convert.UNET, "vae": convert.VAE}[component]


@dataclasses.dataclass
class StableDiffusion:
  """A loaded model: frozen Flax modules, their params, tokenizer and scheduler config.

  Also the paper's LDM-1.4B: its vqvae is a KL autoencoder (`vae`), its bert
  an `LDMBertModel` (`text_encoder`) with a BERT `tokenizer`. SDXL also has
  `text_encoder_2` (a `CLIPTextModel` with `projection_dim`: transformers'
  `CLIPTextModelWithProjection`), its params and `tokenizer_2`; they are
  None for the other families. SDXL's conditioning: `ti_jax.models.sdxl`.
  """
  source: str  # what the user passed: a folder or a hub id
  path: str  # the local diffusers folder
  unet: UNet2DConditionModel
  unet_params: Any
  vae: AutoencoderKL
  vae_params: Any
  text_encoder: CLIPTextModel | LDMBertModel  # same calling convention (inputs_embeds, mask)
  text_encoder_params: Any
  tokenizer: Any  # a transformers CLIP or BERT tokenizer
  scheduler_config: dict
  model_index: dict
  text_encoder_2: CLIPTextModel | None = None
  text_encoder_2_params: Any = None
  tokenizer_2: Any = None

  @property
  def family(self) -> str:
    """"sd1", "sd2", "sdxl" or "ldm" (see `model_family`)."""
    return model_family(self.model_index, self.text_encoder.config)

  @property
  def is_sdxl(self) -> bool:
    """Whether this is Stable Diffusion XL (two text encoders, added UNet conditioning)."""
    return self.family == "sdxl"


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
  return "sd2" if getattr(text_encoder_config, "hidden_act", None) == "gelu" else "sd1"


def one_line(e: BaseException) -> str:
  """`Type: first line of the message`, for one-line errors that wrap another library's."""
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"


def _hub_patterns(variant: str | None, allow_pickle: bool) -> list[str]:
  """The first fetch: model_index, configs, tokenizers and safetensors weights.

  model_index.json is not known before the download: ask for the folders of
  every supported pipeline (patterns that match nothing cost nothing). The
  Flax/pickle fallbacks are fetched only for components without safetensors
  (`_fallback_patterns`): hub repos such as SDXL's hold both, and the Flax
  UNet alone is 10 GB.
  """
  var = f".{variant}" if variant else ""
  patterns = ["model_index.json", "scheduler/*.json"]
  patterns += [f"{sub}/*" for sub in TOKENIZER_FOLDERS.values()]
  pairs = {(role, sub) for folders in PIPELINE_FOLDERS.values() for role, sub in folders.items()}
  for comp, sub in sorted(pairs):
    stem = _WEIGHT_STEMS[comp]
    patterns += [f"{sub}/config.json", f"{sub}/{stem}{var}.safetensors",
                 f"{sub}/{stem}{var}.safetensors.index.json",
                 f"{sub}/{stem}{var}-*.safetensors"]
  return patterns


def _fallback_patterns(folder: str, variant: str | None, allow_pickle: bool) -> list[str]:
  """The second fetch: Flax (and with `allow_pickle`, `.bin`) weights of components without safetensors."""
  index_path = os.path.join(folder, "model_index.json")
  if not os.path.isfile(index_path):
    return []  # read_configs reports the missing file
  try:
    folders = component_folders(read_json(index_path, "model_index.json"))
  except ModelLoadError:
    return []  # reported, with the folder, by read_configs
  var = f".{variant}" if variant else ""
  patterns = []
  for comp, sub in folders.items():
    if safetensors_files(os.path.join(folder, sub), _WEIGHT_STEMS[comp], variant):
      continue
    patterns.append(f"{sub}/{_FLAX_FILES[comp]}")
    if allow_pickle:
      patterns.append(f"{sub}/{_BIN_FILES[comp]}{var}.bin")
  return patterns


def fetch_model_from_hub(name: str, *, variant: str | None, revision: str | None,
                         allow_pickle: bool) -> str:
  """Fetches the files a hub model needs (safetensors first, fallbacks only where missing)."""
  folder = download_from_hub(name, revision=revision,
                             allow_patterns=_hub_patterns(variant, allow_pickle), what="model")
  fallbacks = _fallback_patterns(folder, variant, allow_pickle)
  if fallbacks:
    folder = download_from_hub(name, revision=revision, allow_patterns=fallbacks, what="model")
  return folder


TINY_MODELS = presets.TINY_MODELS  # kept importable here: the names this module resolves
DEFAULT_CACHE_DIR = "~/.cache/ti_jax"


def resolve_model_dir(name_or_path: str, *, variant: str | None = None,
                      revision: str | None = None, allow_pickle: bool = False,
                      cache_dir: str = DEFAULT_CACHE_DIR) -> str:
  """Returns a local diffusers folder for `name_or_path`.

  A folder is used as is; "tiny-world" is the trained model shipped in the package
  (`presets.SHIPPED_MODELS`); "tiny-sd15"/"tiny-sd21"/"tiny-ldm" name ti_jax's
  random-weight test models, written under `cache_dir` on first use; anything else is a hub
  id, of which only the needed files are fetched.
  """
  if os.path.isdir(name_or_path):
    return name_or_path
  if name_or_path in presets.SHIPPED_MODELS:
    folder = presets.SHIPPED_MODELS[name_or_path]
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
      raise ModelLoadError(f"the shipped model {name_or_path} is missing from {folder}; "
                           "reinstall ti_jax")
    return folder
  if name_or_path in TINY_MODELS:
    from ti_jax.testing.tiny_models import ensure_tiny_model  # pylint: disable=import-outside-toplevel
    return ensure_tiny_model(os.path.join(os.path.expanduser(cache_dir), name_or_path),
                             preset=name_or_path)
  return fetch_model_from_hub(name_or_path, variant=variant, revision=revision,
                              allow_pickle=allow_pickle)


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
        f"(offline, unknown id or no access?): {one_line(e)}") from None


def read_json(path: str, what: str) -> dict:
  """A JSON object from `path`; `ModelLoadError` naming `what` if missing or unreadable."""
  if not os.path.isfile(path):
    raise ModelLoadError(f"missing {what}: {path}")
  try:
    obj = json.loads(fileio.read_small_file(path).decode("utf-8"))  # never a pipe or device
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise ModelLoadError(f"cannot read {what} {path}: {one_line(e)}") from None
  if not isinstance(obj, dict):
    raise ModelLoadError(f"cannot read {what} {path}: not a JSON object")
  return obj


def safetensors_files(folder: str, stem: str, variant: str | None = None) -> list[str]:
  """`folder/stem[.variant].safetensors`, or the shards its index names; [] if neither exists."""
  var = f".{variant}" if variant else ""
  single = os.path.join(folder, f"{stem}{var}.safetensors")
  if os.path.isfile(single):
    return [single]
  index = single + ".index.json"
  if os.path.isfile(index):
    weight_map = read_json(index, "safetensors index").get("weight_map", {})
    # A hand-edited or truncated index must fail here in one line, not as a TypeError
    # from os.path.join below.
    if not isinstance(weight_map, dict) or not all(
        isinstance(f, str) and f for f in weight_map.values()):
      raise ModelLoadError(f"cannot read safetensors index {index}: weight_map must map "
                           "tensor names to shard file names")
    return [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
  return []


def read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
  """One state dict from safetensors files (shards); one-line errors for missing or bad files."""
  state: dict[str, np.ndarray] = {}
  for f in files:
    if not os.path.isfile(f):
      raise ModelLoadError(f"missing weight shard: {f}")
    try:
      state.update(safetensors_io.load(f))
    except (OSError, ValueError) as e:
      raise ModelLoadError(f"cannot read {f}: {one_line(e)}") from None
  return state


def read_torch_pickle(path: str, allow_pickle: bool, how_to_allow: str) -> dict[str, np.ndarray]:
  """A PyTorch `.bin` state dict as numpy, only if `allow_pickle` (pickles can run code).

  `how_to_allow` names the switch in the refusal, e.g. "--allow_pickle".
  Half-precision tensors come back as float32 (numpy has no bfloat16).
  """
  if not allow_pickle:
    raise ModelLoadError(
        f"{path} is a pickle, which can run code when loaded; convert it to safetensors "
        f"or pass allow_pickle ({how_to_allow}) if you trust it")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ModelLoadError(f"{path} is a PyTorch pickle and needs torch installed") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many types for bad pickles
    raise ModelLoadError(f"cannot read {path}: {one_line(e)}") from None
  return {k: v.float().numpy() if v.dtype in (torch.bfloat16, torch.float16) else v.numpy()
          for k, v in state.items()}


def load_component_weights(folder: str, component: str, *, variant: str | None = None,
                           allow_pickle: bool = False, subfolder: str | None = None
                           ) -> tuple[str, Any]:
  """Reads one component's weights from `folder/subfolder` (default subfolder: the role name).

  Returns `("torch", {key: array})` for PyTorch-layout weights or
  `("flax", tree)` for a Flax msgpack. Raises `ModelLoadError` if none is usable.
  """
  sub = os.path.join(folder, subfolder or component)
  files = safetensors_files(sub, _WEIGHT_STEMS[component], variant)
  if files:
    return "torch", read_safetensors(files)
  flax_file = os.path.join(sub, _FLAX_FILES[component])
  if os.path.isfile(flax_file):
    from flax import serialization  # pylint: disable=import-outside-toplevel
    try:
      with open(flax_file, "rb") as fh:
        return "flax", serialization.msgpack_restore(fh.read())
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
      raise ModelLoadError(f"cannot read {flax_file}: {one_line(e)}") from None
  var = f".{variant}" if variant else ""
  bin_file = os.path.join(sub, f"{_BIN_FILES[component]}{var}.bin")
  if os.path.isfile(bin_file):
    return "torch", read_torch_pickle(bin_file, allow_pickle, "--config.allow_pickle=True")
  raise ModelLoadError(
      f"no weights for {component} in {sub} (looked for {_WEIGHT_STEMS[component]}{var}.safetensors, "
      f"its sharded index, {_FLAX_FILES[component]} and {_BIN_FILES[component]}{var}.bin)")


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
  """
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


def init_fns(modules: dict[str, Any]) -> dict[str, Callable[[jax.Array], Any]]:
  """Per component, `rng -> {"params": ...}` on minimal dummy inputs (shapes only matter)."""
  unet, vae = modules["unet"], modules["vae"]
  vdown = 2 ** (len(vae.config.block_out_channels) - 1)
  fns = {
      "unet": lambda rng: unet.init(rng, *unet_dummy_inputs(unet.config)),
      "vae": lambda rng: vae.init(rng, jnp.zeros((1, vdown, vdown, vae.config.in_channels))),
  }
  for role in TOKENIZER_FOLDERS:
    if role in modules:
      fns[role] = lambda rng, text=modules[role]: text.init(rng, jnp.zeros((1, 1), jnp.int32))
  return fns


def param_shapes(modules: dict[str, Any]) -> dict[str, Any]:
  """Per component, the param tree of `jax.ShapeDtypeStruct`s (no memory is allocated)."""
  return {name: jax.eval_shape(fn, jax.random.key(0))["params"]
          for name, fn in init_fns(modules).items()}


def component_folders(model_index: dict) -> dict[str, str]:
  """Role -> subfolder for a model_index.json (one-line error for unsupported pipelines)."""
  cls = model_index.get("_class_name") or "StableDiffusionPipeline"
  if cls not in PIPELINE_FOLDERS:
    raise ModelLoadError(f"pipeline {cls!r} is not supported (ti_jax loads "
                         f"{' and '.join(PIPELINE_FOLDERS)} folders)")
  folders = PIPELINE_FOLDERS[cls]
  vae_class = (model_index.get(folders["vae"]) or [None, None])[1]
  if vae_class not in (None, "AutoencoderKL"):
    raise ModelLoadError(f"{folders['vae']} is a {vae_class}; ti_jax supports AutoencoderKL "
                         "latent spaces only")
  return folders


def read_configs(folder: str) -> dict[str, dict]:
  """Reads model_index.json and each component's config (keyed by role) from a diffusers folder."""
  if not os.path.isdir(folder):
    raise ModelLoadError(f"model folder not found: {folder}")
  index = read_json(os.path.join(folder, "model_index.json"), "model_index.json")
  try:
    folders = component_folders(index)
  except ModelLoadError as e:
    raise ModelLoadError(f"{folder}: {e}") from None
  configs = {"model_index": index}
  for comp in folders:
    configs[comp] = read_json(os.path.join(folder, folders[comp], "config.json"),
                               f"{folders[comp]} config")
  configs["scheduler"] = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"),
                                    "scheduler config")
  return configs


def load_tokenizer(folder: str, model_index: dict | None = None, max_length: int | None = None,
                   subfolder: str = "tokenizer"):
  """The tokenizer of a diffusers folder: the class model_index.json names (CLIP or BERT).

  `max_length` (the text encoder's positions) caps `model_max_length`: BERT
  tokenizers declare 512, but LDMBert reads 77 tokens, and every prompt is
  padded or cut to `model_max_length`. `subfolder` "tokenizer_2" is SDXL's second.
  """
  path = os.path.join(folder, subfolder)
  if not os.path.isdir(path):
    raise ModelLoadError(f"missing tokenizer folder: {path}")
  entry = (model_index or {}).get(subfolder) or [None, "CLIPTokenizer"]
  name = entry[1] or "CLIPTokenizer"
  if name not in _TOKENIZERS:
    raise ModelLoadError(f"{path}: tokenizer class {name!r} is not supported "
                         f"(supported: {', '.join(_TOKENIZERS)})")
  import transformers  # pylint: disable=import-outside-toplevel
  try:
    tokenizer = getattr(transformers, name).from_pretrained(path, local_files_only=True)
  except Exception as e:  # transformers raises OSError/ValueError/TypeError for bad folders
    raise ModelLoadError(f"cannot load tokenizer from {path}: {one_line(e)}") from None
  if max_length and tokenizer.model_max_length > max_length:
    tokenizer.model_max_length = max_length
  return tokenizer


def load_stable_diffusion(name_or_path: str, *, dtype: Any = jnp.float32,
                          param_dtype: Any = jnp.float32, variant: str | None = None,
                          revision: str | None = None, allow_pickle: bool = False,
                          attention_impl: str | None = None,
                          cache_dir: str = DEFAULT_CACHE_DIR,
                          vae_dtype: Any = None, remat: bool = False,
                          tokenizer: str | None = None) -> StableDiffusion:
  """Loads a diffusers-format Stable Diffusion 1.x/2.x/XL or LDM-1.4B text-to-image model.

  A file instead of a folder is an original-layout single-file checkpoint
  (`ti_jax/weights/single_file.py`).

  Args:
    name_or_path: a local diffusers folder or a hub id such as
      "stable-diffusion-v1-5/stable-diffusion-v1-5",
      "stabilityai/stable-diffusion-xl-base-1.0" or
      "CompVis/ldm-text2im-large-256" (only the needed files are fetched).
    dtype: compute dtype of the Flax modules (float32 or bfloat16).
    param_dtype: dtype the weights are stored in on the host/device.
    variant: weight file variant, e.g. "fp16" for `*.fp16.safetensors`.
    revision: hub revision.
    allow_pickle: permit `.bin` pickles (which can execute code) when no
      safetensors/msgpack weights exist. Needs torch.
    attention_impl: `jax.nn.dot_product_attention` implementation, or "pallas_tpu"; None or ""
      chooses (the Pallas kernel on a TPU host, JAX's choice elsewhere).
    cache_dir: where the tiny random-weight models are written.
    vae_dtype: compute and param dtype of the VAE (default: `dtype`/`param_dtype`; float32
      for SDXL, whose VAE overflows in half precision).
    remat: rematerialise the UNet's resnets and transformers when differentiated.
    tokenizer: single files only (a folder has its own): a tokenizer folder or hub id;
      None: the model family's.

  Raises:
    ModelLoadError: with a one-line message for any unusable input.
  """
  # --- single-file checkpoints (A1111/ComfyUI layout): owned by single_file.py ---
  from ti_jax.weights import single_file  # pylint: disable=import-outside-toplevel
  if single_file.is_single_file(name_or_path):
    return single_file.load_single_file(
        name_or_path, tokenizer=tokenizer, dtype=dtype, param_dtype=param_dtype,
        allow_pickle=allow_pickle, attention_impl=attention_impl, vae_dtype=vae_dtype,
        remat=remat)
  # --- end single-file ---
  folder = resolve_model_dir(name_or_path, variant=variant, revision=revision,
                             allow_pickle=allow_pickle, cache_dir=cache_dir)
  configs = read_configs(folder)
  folders = component_folders(configs["model_index"])
  if vae_dtype is None and "text_encoder_2" in folders:
    vae_dtype = jnp.float32  # SDXL's VAE overflows in fp16 (diffusers' force_upcast)
  modules = build_modules(configs, dtype=dtype, param_dtype=param_dtype,
                          attention_impl=attention_impl, vae_dtype=vae_dtype, remat=remat)
  shapes = param_shapes(modules)
  params = {}
  for comp in folders:
    store_dtype = (vae_dtype or param_dtype) if comp == "vae" else param_dtype
    kind, weights = load_component_weights(folder, comp, variant=variant,
                                           allow_pickle=allow_pickle, subfolder=folders[comp])
    try:
      if kind == "torch":
        tree = convert.convert_torch_state_dict(component_spec(comp, configs[comp]), weights,
                                                shapes[comp],
                                                dtype=np.dtype(store_dtype))
      else:
        tree = convert.normalize_legacy_flax_tree(weights)
        convert.check_flax_tree(comp, tree, shapes[comp])
        tree = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(np.dtype(store_dtype)), tree)
    except convert.ConversionError as e:
      raise ModelLoadError(f"{folder}: {e}") from None
    params[comp] = tree
  tokenizers = {role: load_tokenizer(folder, configs["model_index"],
                                     modules[role].config.max_position_embeddings, sub)
                for role, sub in TOKENIZER_FOLDERS.items() if role in modules}
  return StableDiffusion(
      source=name_or_path, path=folder,
      unet=modules["unet"], unet_params=params["unet"],
      vae=modules["vae"], vae_params=params["vae"],
      text_encoder=modules["text_encoder"], text_encoder_params=params["text_encoder"],
      tokenizer=tokenizers["text_encoder"],
      scheduler_config=configs["scheduler"],
      model_index=configs["model_index"],
      text_encoder_2=modules.get("text_encoder_2"),
      text_encoder_2_params=params.get("text_encoder_2"),
      tokenizer_2=tokenizers.get("text_encoder_2"))
