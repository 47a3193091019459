"""Model shapes and measurement helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

from ti_jax.weights import presets

RESOLUTION = {"tiny": 64, "narrow": 256, "small": 256, "sd15": 512, "sd21": 768, "ldm": 256,
              "tiny-sdxl": 64, "sdxl": 1024}
# The Stable Diffusion-topology shapes (every benchmark takes these; tpu_compile also `ldm`).
MODELS = ("tiny", "narrow", "small", "sd15", "sd21")


def define_model_flags(models=MODELS, *, model: str = "small", dtype: str | None = "float32",
                       dtype_help: str = "Frozen model dtype.", batch: int | None = 1,
                       batch_help: str = "Per-device batch.", json_out: bool = True,
                       json_out_help: str = "Also write the results as JSON here.") -> None:
  """Defines the flags the benchmarks share: --model, --dtype, --batch, --json_out.

  `models` lists the shapes the script supports (keys of RESOLUTION; None:
  no --model); `dtype=None`, `batch=None` and `json_out=False` leave that flag
  out; the `*_help` strings say what the flag means in that script. The flags
  are listed under the calling script, so its `--help` shows them.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  caller = sys._getframe(1).f_globals.get("__name__", "")  # pylint: disable=protected-access
  # absl files the main script's flags under sys.argv[0]; --help lists that module's.
  kw = {"module_name": sys.argv[0] if caller == "__main__" else caller}
  if models is not None:
    flags.DEFINE_enum("model", model, list(models), "Model shape (random weights).", **kw)
  if dtype is not None:
    flags.DEFINE_enum("dtype", dtype, ["float32", "bfloat16"], dtype_help, **kw)
  if batch is not None:
    flags.DEFINE_integer("batch", batch, batch_help, **kw)
  if json_out:
    flags.DEFINE_string("json_out", "", json_out_help, **kw)


def model_configs(name: str) -> dict:
  """Component configs: the presets, plus `small` and `narrow` = SD 1.5 topology at reduced widths.

  `small`: UNet widths (128, 256, 512, 512); `narrow`: (64, 128, 256, 256). Both
  keep SD 1.5's 8 heads, its full text encoder and VAE widths (64, 128, 256, 256).
  """
  if name == "tiny":
    cfg = presets.preset("tiny-sd15")
    cfg["text_encoder"]["vocab_size"] = 1000
    return cfg
  if name in ("small", "narrow"):
    cfg = presets.preset("sd15")
    widths = [128, 256, 512, 512] if name == "small" else [64, 128, 256, 256]
    cfg["unet"].update(block_out_channels=widths, attention_head_dim=8)
    cfg["vae"].update(block_out_channels=[64, 128, 256, 256])
    return cfg
  return presets.preset(name)


def timed(fn, steps: int, warmup: int, sync) -> list[float]:
  """Runs `fn` warmup + steps times; returns the steady-state step times (seconds)."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t)
  return times


def max_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_json(path: str, record: dict) -> None:
  """Writes `record` as indented JSON to `path` ("" writes nothing)."""
  if path:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(record, f, indent=2)


def report(record: dict, json_out: str = "") -> None:
  """Prints the record as aligned `key: value` lines and optionally writes it as JSON."""
  for k, v in record.items():
    print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
  write_json(json_out, record)


def median(xs):
  return statistics.median(xs)


__all__ = ["RESOLUTION", "MODELS", "define_model_flags", "model_configs", "timed", "max_rss_bytes",
           "write_json", "report", "median"]
