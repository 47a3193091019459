"""Loading a transformers-format CLIP model for ti_jax's image/text similarity metrics.

`load_clip(name_or_path)` takes a local folder (`config.json`,
`model.safetensors`, tokenizer files, `preprocessor_config.json`), a hub id
such as "openai/clip-vit-base-patch32" (only those files are fetched), or
"tiny-clip", a random-weight CLIP written under the ti_jax cache on first use
for offline tests. `preprocess_images` reproduces transformers'
`CLIPImageProcessor` (PIL backend) and `image_features`/`text_features`
return L2-normalized features, so cosine similarities are plain dot products.
Every load failure is a `ModelLoadError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ti_jax.data import captions
from ti_jax.models.clip import CLIPConfig, CLIPModel
from ti_jax.models.config_utils import UnsupportedConfigError
from ti_jax.runtime import console
from ti_jax.weights import convert
from ti_jax.weights.loading import (
  DEFAULT_CACHE_DIR,
  read_json,
  read_safetensors,
  read_torch_pickle,
  safetensors_files,
)
from ti_jax.weights.pipeline import ModelLoadError, download_from_hub
from ti_jax.weights.tiny_models import ensure_written, random_params, write_json
from ti_jax.weights.tiny_tokenizer import write_tiny_clip_tokenizer

TINY_CLIP = "tiny-clip"

# transformers' CLIPModel checkpoint layout: every key under one of
# text_model./vision_model./the projections, plus the scalar logit_scale.
CLIP_SPEC = convert.ComponentSpec("clip", ignore=(r"(^|\.)position_ids$",))
_LOGIT_SCALE = "logit_scale"

_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                    "special_tokens_map.json", "tokenizer.json")
# Only what load_clip reads; the shard patterns match nothing in single-file repos.
HUB_PATTERNS = ("config.json", "model.safetensors", "model.safetensors.index.json",
                "model-*.safetensors", "preprocessor_config.json") + _TOKENIZER_FILES

# OpenAI CLIP's normalization (transformers' OPENAI_CLIP_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_BICUBIC = 3

_TRANSFORMERS_VERSION = "5.0.0"  # recorded in written configs; transformers only warns on old ones


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
  """`CLIPImageProcessor` settings: resize, center crop, rescale, normalize.

  `size` is the shortest edge after resizing (aspect ratio kept), or a
  `(height, width)` pair for a fixed resize; `crop_size` is `(height, width)`.
  """
  size: int | tuple[int, int] = 224
  crop_size: tuple[int, int] = (224, 224)
  mean: tuple[float, ...] = CLIP_MEAN
  std: tuple[float, ...] = CLIP_STD
  resample: int = _PIL_BICUBIC  # a PIL.Image.Resampling value
  rescale_factor: float = 1 / 255

  @classmethod
  def from_transformers(cls, cfg: dict, image_size: int) -> ImagePreprocessing:
    """Reads a `preprocessor_config.json` dict; absent fields take CLIP's defaults.

    CLIP's default resize and crop are its input size (224 for ViT-B/32), so
    `image_size` stands in for them when the file does not give them.

    Raises:
      ValueError: with a one-line message for a field it cannot honour.
    """
    for name in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
      if not cfg.get(name, True):
        raise ValueError(f"preprocessor_config: {name}=false is not supported (CLIP resizes, crops, "
                         "rescales and normalizes)")
    size = cfg.get("size", image_size)
    if isinstance(size, dict):
      if "shortest_edge" in size and not size.get("longest_edge"):
        size = size["shortest_edge"]
      elif "height" in size and "width" in size:
        size = (size["height"], size["width"])
      else:
        raise ValueError(f"preprocessor_config: size={size!r} is not supported "
                         "(shortest_edge or height/width)")
    crop = cfg.get("crop_size", image_size)
    if isinstance(crop, dict):
      crop = (crop.get("height"), crop.get("width"))
    elif isinstance(crop, int):
      crop = (crop, crop)
    mean = cfg.get("image_mean", CLIP_MEAN)
    std = cfg.get("image_std", CLIP_STD)
    mean = tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))
    std = tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3))
    resample = cfg.get("resample", _PIL_BICUBIC)
    if resample not in range(6):
      raise ValueError(f"preprocessor_config: resample={resample!r} is not a PIL resampling filter")
    try:
      return cls(size=size if isinstance(size, int) else (int(size[0]), int(size[1])),
                 crop_size=(int(crop[0]), int(crop[1])), mean=mean, std=std, resample=resample,
                 rescale_factor=float(cfg.get("rescale_factor", 1 / 255)))
    except (TypeError, ValueError, IndexError):
      raise ValueError(f"preprocessor_config: cannot read size={size!r}, crop_size={crop!r}") from None

  def to_transformers(self) -> dict:
    """The `preprocessor_config.json` dict transformers' `CLIPImageProcessor` reads."""
    size = ({"shortest_edge": self.size} if isinstance(self.size, int)
            else {"height": self.size[0], "width": self.size[1]})
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": size,
        "resample": self.resample, "do_center_crop": True,
        "crop_size": {"height": self.crop_size[0], "width": self.crop_size[1]},
        "do_rescale": True, "rescale_factor": self.rescale_factor, "do_normalize": True,
        "image_mean": list(self.mean), "image_std": list(self.std), "do_convert_rgb": True,
    }


@dataclasses.dataclass(frozen=True)
class CLIP:
  """A loaded CLIP: the Flax module, its params, tokenizer and image preprocessing.

  It holds no compiled functions: `image_features`/`text_features` run one
  jitted program keyed by the (hashable) module, so CLIPs that share a module
  also share its compilations.
  """
  source: str  # what the caller passed: a folder, a hub id or "tiny-clip"
  path: str  # the local folder read
  model: CLIPModel
  params: Any
  tokenizer: Any  # transformers.CLIPTokenizer
  preprocessing: ImagePreprocessing

  @property
  def image_size(self) -> int:
    return self.model.config.vision.image_size

  @property
  def max_text_length(self) -> int:
    return self.model.config.text.max_position_embeddings


def resolve_clip_dir(name_or_path: str, *, revision: str | None = None,
                     cache_dir: str = DEFAULT_CACHE_DIR, allow_pickle: bool = False) -> str:
  """A local CLIP folder for `name_or_path`: a folder as is, "tiny-clip" (written once), or a hub id.

  Raises:
    ModelLoadError: a missing folder, or a hub id that cannot be fetched.
  """
  if os.path.isdir(name_or_path):
    return name_or_path
  if name_or_path == TINY_CLIP:
    return ensure_tiny_clip(os.path.join(os.path.expanduser(cache_dir), TINY_CLIP))
  patterns = list(HUB_PATTERNS) + (["pytorch_model.bin"] if allow_pickle else [])
  return download_from_hub(name_or_path, revision=revision, allow_patterns=patterns,
                           what="CLIP model")


def _read_weights(folder: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  files = safetensors_files(folder, "model")
  if files:
    return read_safetensors(files)
  pickle = os.path.join(folder, "pytorch_model.bin")
  if os.path.isfile(pickle):
    return read_torch_pickle(pickle, allow_pickle, "--allow_pickle")
  raise ModelLoadError(f"no CLIP weights in {folder} (looked for model.safetensors, its "
                       "sharded index and pytorch_model.bin)")


def param_shapes(model: CLIPModel) -> Any:
  """The model's param tree as `jax.ShapeDtypeStruct`s (nothing is allocated)."""
  return jax.eval_shape(lambda rng: model.init(rng, *model.dummy_inputs()),
                        jax.random.key(0))["params"]


def torch_state_dict_to_params(state: dict[str, Any], shapes: Any, dtype: Any = np.float32) -> dict:
  """transformers `CLIPModel` state dict (numpy, PyTorch layout) -> Flax params of `shapes`.

  `logit_scale` goes around `ti_jax.weights.convert`, whose layout ops always return
  arrays of rank >= 1 (a 0-d scalar would come back as shape (1,)).

  Raises:
    convert.ConversionError: one line naming the key and shapes that do not fit.
  """
  state = dict(state)
  if _LOGIT_SCALE not in state:
    raise convert.ConversionError(f"clip: checkpoint lacks {_LOGIT_SCALE!r}")
  scale = np.asarray(state.pop(_LOGIT_SCALE))
  if scale.size != 1:
    raise convert.ConversionError(
        f"clip: shape mismatch for {_LOGIT_SCALE!r}: checkpoint {scale.shape} vs model ()")
  tower_shapes = {k: v for k, v in shapes.items() if k != _LOGIT_SCALE}
  params = convert.convert_torch_state_dict(CLIP_SPEC, state, tower_shapes, dtype=dtype)
  params[_LOGIT_SCALE] = scale.reshape(()).astype(dtype)
  return params


def params_to_torch_state_dict(params: Any) -> dict[str, np.ndarray]:
  """Inverse of `torch_state_dict_to_params`: keys and layouts of transformers' `CLIPModel`."""
  towers = {k: v for k, v in params.items() if k != _LOGIT_SCALE}
  state = convert.flax_params_to_torch_state_dict(CLIP_SPEC, towers)
  # convert would name a top-level leaf ".logit_scale" and make it rank 1.
  state[_LOGIT_SCALE] = np.asarray(params[_LOGIT_SCALE]).reshape(())
  return state


def _load_tokenizer(folder: str):
  from transformers import CLIPTokenizer  # pylint: disable=import-outside-toplevel
  if not any(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "tokenizer.json")):
    raise ModelLoadError(f"missing CLIP tokenizer files in {folder} (vocab.json and merges.txt, "
                         "or tokenizer.json)")
  try:
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
  except Exception as e:  # noqa: BLE001  transformers raises OSError/ValueError/TypeError for bad folders
    raise ModelLoadError(
        f"cannot load CLIP tokenizer from {folder}: {console.one_line(e)}") from None


def load_clip(name_or_path: str, *, dtype: Any = jnp.float32, revision: str | None = None,
              cache_dir: str = DEFAULT_CACHE_DIR, attention_impl: str | None = None,
              allow_pickle: bool = False) -> CLIP:
  """Loads a transformers-format CLIP (e.g. "openai/clip-vit-base-patch32") into Flax.

  Args:
    name_or_path: a local folder, a hub id (only config, safetensors weights,
      tokenizer and preprocessor files are fetched) or "tiny-clip".
    dtype: compute and parameter dtype of the model (features are returned
      as float32 either way).
    revision: hub revision.
    cache_dir: where "tiny-clip" is written.
    attention_impl: `jax.nn.dot_product_attention` implementation.
    allow_pickle: read `pytorch_model.bin` (a pickle, which can run code) when
      the model has no safetensors weights. Needs torch.

  Raises:
    ModelLoadError: with a one-line message for any unusable input.
  """
  folder = resolve_clip_dir(name_or_path, revision=revision, cache_dir=cache_dir,
                            allow_pickle=allow_pickle)
  cfg = read_json(os.path.join(folder, "config.json"), "CLIP config")
  try:
    config = CLIPConfig.from_transformers(cfg)
  except UnsupportedConfigError as e:
    raise ModelLoadError(f"{folder}: {e}") from None
  pre_path = os.path.join(folder, "preprocessor_config.json")
  pre_cfg = read_json(pre_path, "preprocessor config") if os.path.exists(pre_path) else {}
  try:
    preprocessing = ImagePreprocessing.from_transformers(pre_cfg, config.vision.image_size)
  except ValueError as e:
    raise ModelLoadError(f"{folder}: {e}") from None
  if preprocessing.crop_size != (config.vision.image_size,) * 2:
    raise ModelLoadError(
        f"{folder}: preprocessor crop_size {list(preprocessing.crop_size)} does not match the vision "
        f"model's image_size {config.vision.image_size}")
  model = CLIPModel(config, dtype=dtype, param_dtype=dtype, attention_impl=attention_impl)
  state = _read_weights(folder, allow_pickle)
  try:
    params = torch_state_dict_to_params(state, param_shapes(model), dtype=np.dtype(dtype))
  except convert.ConversionError as e:
    raise ModelLoadError(f"{folder}: {e}") from None
  return CLIP(source=name_or_path, path=folder, model=model, params=params,
              tokenizer=_load_tokenizer(folder), preprocessing=preprocessing)


def _resize_output_size(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
  """`(height, width)` after resizing, as transformers computes it (the long side truncated)."""
  if not isinstance(size, int):
    return size
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


def preprocess_images(images: np.ndarray | Sequence[np.ndarray],
                      preprocessing: ImagePreprocessing = ImagePreprocessing()) -> np.ndarray:
  """uint8 RGB images -> CLIP's normalized input, float32 `[N, crop_h, crop_w, 3]` (NHWC).

  The steps and their rounding are transformers' `CLIPImageProcessor` (PIL
  backend): PIL resize of the uint8 image (shortest edge to `size`, the long
  edge truncated to an integer), center crop (zero-padded if the image is
  smaller), rescale in float64 then cast to float32, then `(x - mean) / std`
  in float32.

  Args:
    images: uint8 `[N, H, W, 3]`, or a sequence of `[H, W, 3]` uint8 images
      of possibly different sizes.
    preprocessing: the settings (from `load_clip(...).preprocessing`).

  Raises:
    ValueError: for an image that is not uint8 RGB.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  ch, cw = preprocessing.crop_size
  out = np.zeros((len(images), ch, cw, 3), np.float32)  # [N, crop_h, crop_w, 3]
  mean = np.asarray(preprocessing.mean, np.float32)
  std = np.asarray(preprocessing.std, np.float32)
  for i, image in enumerate(images):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"image {i}: expected uint8 [H, W, 3] RGB, got {image.dtype} {list(image.shape)}")
    h, w = _resize_output_size(image.shape[0], image.shape[1], preprocessing.size)
    resized = np.asarray(Image.fromarray(image).resize((w, h), resample=preprocessing.resample))
    # Where the crop is larger than the image, the processor pads with zeros,
    # centred with the extra pixel (odd difference) before the image.
    canvas = np.zeros((max(h, ch), max(w, cw), 3), np.uint8)
    pt, pl = math.ceil((canvas.shape[0] - h) / 2), math.ceil((canvas.shape[1] - w) / 2)
    canvas[pt:pt + h, pl:pl + w] = resized
    top, left = (canvas.shape[0] - ch) // 2, (canvas.shape[1] - cw) // 2
    crop = canvas[top:top + ch, left:left + cw]
    scaled = (crop.astype(np.float64) * preprocessing.rescale_factor).astype(np.float32)
    out[i] = (scaled - mean) / std
  return out


def _unit(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  # The floor only matters for an all-zero feature, which would otherwise give NaN.
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("model", "kind"))
def _unit_features(params: Any, batch: jax.Array, *, model: CLIPModel, kind: str) -> jax.Array:
  """Unit features `[B, P]` of pixels `[B, S, S, 3]` (kind "image") or token ids `[B, T]` ("text")."""
  method = {"image": CLIPModel.get_image_features, "text": CLIPModel.get_text_features}[kind]
  return _unit(model.apply({"params": params}, batch, method=method))


def _batched(fn: Callable, params: Any, inputs: np.ndarray, batch_size: int) -> np.ndarray:
  """Runs `fn` over `inputs` in chunks of `batch_size`, padding the last chunk.

  Every chunk has the same shape, so the function compiles once per
  `batch_size` (or once for the input size when it is smaller).
  """
  n = inputs.shape[0]
  if n == 0:
    raise ValueError("no inputs")
  chunk = min(n, batch_size)
  outs = []
  for start in range(0, n, chunk):
    part = inputs[start:start + chunk]
    short = chunk - part.shape[0]
    if short:
      part = np.concatenate([part, np.repeat(part[-1:], short, axis=0)])
    outs.append(np.asarray(fn(params, part))[:chunk - short])
  return np.concatenate(outs)


def image_features(clip: CLIP, pixels: np.ndarray | Sequence[np.ndarray],
                   batch_size: int = 64) -> np.ndarray:
  """L2-normalized CLIP image features, float32 `[N, P]`.

  Args:
    clip: from `load_clip`.
    pixels: float `[N, S, S, 3]` from `preprocess_images`, or uint8 images
      (`[N, H, W, 3]` or a list of `[H, W, 3]`), which are preprocessed with
      `clip.preprocessing` first.
    batch_size: images per compiled call.
  """
  if isinstance(pixels, np.ndarray) and pixels.dtype != np.uint8:
    batch = pixels.astype(np.float32)
  else:
    batch = preprocess_images(pixels, clip.preprocessing)
  fn = functools.partial(_unit_features, model=clip.model, kind="image")
  return _batched(fn, clip.params, batch, batch_size)


def text_features(clip: CLIP, prompts: Sequence[str], batch_size: int = 256) -> np.ndarray:
  """L2-normalized CLIP text features of `prompts`, float32 `[N, P]`.

  Prompts are padded to the model's context length and truncated to it (the
  tokenizer keeps the eos), as CLIP's own tokenization does.
  """
  ids = captions.tokenize(clip.tokenizer, prompts, clip.max_text_length)  # [N, T]
  fn = functools.partial(_unit_features, model=clip.model, kind="text")
  return _batched(fn, clip.params, ids, batch_size)


# Tiny random-weight CLIP: the CLIPModel topology at toy widths.
def tiny_clip_config(vocab_size: int) -> dict:
  """The transformers `config.json` of the tiny CLIP for a tokenizer of `vocab_size` tokens.

  The tiny tokenizer's specials are its last two ids (pad is eos), so the
  eos id is not the legacy 2 and pooling takes the first eos.
  """
  text = {"model_type": "clip_text_model", "vocab_size": vocab_size, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
          "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
          "pad_token_id": vocab_size - 1, "projection_dim": 16}
  vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
            "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": 16}
  return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 16,
          "logit_scale_init_value": 2.6592, "text_config": text, "vision_config": vision,
          "transformers_version": _TRANSFORMERS_VERSION, "dtype": "float32"}


def write_tiny_clip(out_dir: str, seed: int = 0) -> str:
  """Writes a tiny random-weight CLIP folder (transformers' CLIPModel format); returns out_dir.

  Weights are drawn with numpy (no torch); the folder loads in transformers'
  `CLIPModel.from_pretrained`, `CLIPTokenizer` and `CLIPImageProcessor`.
  """
  os.makedirs(out_dir, exist_ok=True)
  vocab_size = write_tiny_clip_tokenizer(out_dir)
  cfg = tiny_clip_config(vocab_size)
  config = CLIPConfig.from_transformers(cfg)
  params = random_params(param_shapes(CLIPModel(config)), np.random.default_rng(seed))
  params[_LOGIT_SCALE] = np.float32(config.logit_scale_init_value)
  state = {k: v.astype(np.float32) for k, v in params_to_torch_state_dict(params).items()}
  # safetensors' own writer: ti_jax.weights.safetensors_io stores a 0-d logit_scale as
  # shape [1] (np.ascontiguousarray promotes scalars), which transformers
  # rejects as a size mismatch. The reader handles 0-d tensors fine.
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  size = config.vision.image_size
  write_json(os.path.join(out_dir, "preprocessor_config.json"),
              ImagePreprocessing(size=size, crop_size=(size, size)).to_transformers())
  write_json(os.path.join(out_dir, "config.json"), cfg)
  return out_dir


def ensure_tiny_clip(out_dir: str, seed: int = 0) -> str:
  """Writes the tiny CLIP unless `out_dir` holds one; concurrent or interrupted writers are safe."""
  return ensure_written(out_dir, "config.json", lambda folder: write_tiny_clip(folder, seed))
