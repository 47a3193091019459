"""The chips `benchmarks/aot_compile.py` compiles for, described on a host that has none.

A target is named as `--topology` names it: a TPU topology as
`jax.experimental.topologies` knows it (`v5e:2x2`, `v4:2x2x1`; needs libtpu,
`pip install "jax[tpu]"`), or a GPU model and count (`h100:8`, `a100-80g:1`;
needs the CUDA plugin, `pip install "jax[cuda12]"`, and no GPU). For a GPU the
compiler is told which GPU it compiles for by a `GpuTargetConfigProto` text, kept
in `benchmarks/gpu_specs/` (the plugin ships none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re

GIB = 2 ** 30
# HBM per chip, by the generation prefix of the TPU topology name.
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5litepod": 16 * GIB, "v5p": 95 * GIB,
             "v6e": 32 * GIB}
# GPU model name in --topology -> its target description in benchmarks/gpu_specs/.
GPU_SPECS = {"h100": "h100_sxm.txtpb", "a100-80g": "a100_sxm_80.txtpb"}
GPU_SPEC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
# The share of a GPU's memory JAX's allocator takes at start-up (XLA_CLIENT_MEM_FRACTION,
# default 0.75): what `device.memory_stats()["bytes_limit"]` reports, and so the budget
# that remat="auto" and the sampler's batch check use on a real GPU.
JAX_GPU_MEMORY_FRACTION = 0.75
CUDA_PLUGIN = "jax_cuda12_plugin"
NO_CUDA_PLUGIN = ("the CUDA plugin is not installed, so nothing can be compiled for a GPU here: "
                  "install it in a separate environment with pip install \"jax[cuda12]\" "
                  "(several GB; no GPU needed)")


@dataclasses.dataclass(frozen=True)
class Target:
  """The compile-only devices of a topology and the memory one of them offers a program."""
  platform: str  # "tpu" or "gpu"
  devices: list
  memory_bytes: int  # the per-chip budget a program's memory plan is held against
  device_memory_bytes: int  # the chip's whole memory
  compiler: str  # "libtpu 0.0.42.1", "jax-cuda12-plugin 0.10.2"


def is_gpu(topology: str) -> bool:
  """Whether `topology` names GPUs ("h100:8") rather than TPU chips ("v5e:2x2")."""
  return topology.partition(":")[0].lower() in GPU_SPECS


def has_cuda_plugin() -> bool:
  """Whether JAX's CUDA plugin (`jax[cuda12]`), which compiles for GPUs, is importable."""
  return importlib.util.find_spec(CUDA_PLUGIN) is not None


def chip_hbm(topology: str) -> int:
  """HBM bytes of one chip of TPU `topology` ("v5e:2x2" -> 16 GiB)."""
  kind = topology.split(":")[0].split("-")[0].lower()
  if kind not in HBM_BYTES:
    raise ValueError(f"unknown TPU generation {kind!r} (known: {', '.join(HBM_BYTES)}; "
                     f"GPUs: {', '.join(GPU_SPECS)})")
  return HBM_BYTES[kind]


def tpu_devices(topology: str) -> list:
  """The chips of a TPU topology, compile-only (libtpu needed, no TPU).

  One device per chip, as Cloud TPU VMs run them (v4 in megacore mode), and
  all chips in this one process, so the pmapped program spans every chip.
  """
  # libtpu takes a lock file so that one process owns the chips; compiling opens
  # no chip, so several compiling processes (a test next to a benchmark) may share it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kind, _, layout = topology.partition(":")
  dims = tuple(int(d) for d in layout.lower().split("x")) if layout else ()
  kwargs = {"chip_config_name": "megacore"} if kind.lower() == "v4" else {}
  if dims:
    # libtpu's default host is 2x2x1 chips; a smaller layout (v5e:1x1) must say so.
    kwargs["chips_per_host_bounds"] = (dims + (1, 1, 1))[:3]
  return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                           **kwargs).devices)


def gpu_target_config(model: str) -> str:
  """The `GpuTargetConfigProto` text of GPU `model` ("h100"), from benchmarks/gpu_specs/."""
  if model not in GPU_SPECS:
    raise ValueError(f"unknown GPU {model!r} (known: {', '.join(GPU_SPECS)})")
  with open(os.path.join(GPU_SPEC_DIR, GPU_SPECS[model]), encoding="utf-8") as f:
    return f.read()


def spec_memory_bytes(target_config: str) -> int:
  """The device memory a GPU target config describes (its `device_memory_size`)."""
  found = re.search(r"^\s*device_memory_size:\s*(\d+)", target_config, re.MULTILINE)
  if not found:
    raise ValueError("the GPU target config has no device_memory_size")
  return int(found.group(1))


def parse_gpu_topology(topology: str) -> tuple[str, int]:
  """("h100", 8) for "h100:8"; a bare "h100" is one GPU."""
  model, _, count = topology.lower().partition(":")
  if count and not count.isdigit() or count and int(count) < 1:
    raise ValueError(f"GPU topology {topology!r}: say how many GPUs as MODEL:N, e.g. h100:8")
  return model, int(count or 1)


def gpu_devices(topology: str) -> list:
  """The GPUs of `topology` ("h100:8": eight H100s in one host), compile-only.

  The CUDA plugin compiles for them from the target config alone: no GPU, no
  CUDA driver, and so no autotuning (XLA takes its default GEMM and fusion
  configurations where a GPU would time candidates).
  """
  if not has_cuda_plugin():
    raise RuntimeError(NO_CUDA_PLUGIN)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  model, count = parse_gpu_topology(topology)
  # "1x1xN": one process (slice) of one host holding N GPUs, as an 8-GPU box runs.
  return list(topologies.get_topology_desc(platform="cuda",
                                           target_config=gpu_target_config(model),
                                           topology=f"1x1x{count}").devices)


@contextlib.contextmanager
def cudnn_checks_for(devices):
  """JAX's cuDNN attention checks answered for `devices` (compile-only GPUs), not this host.

  `jax.nn.dot_product_attention(implementation="cudnn")` decides in Python what cuDNN
  supports from the compute capability of the local GPU; without one it takes the target
  for pre-Hopper (head dims <= 128, where an H100 takes 256). Inside this block those two
  checks read the target's capability instead, so the program is the one a real GPU of
  the target's kind would trace. A no-op for other devices.
  """
  # pylint: disable=import-outside-toplevel,protected-access
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
  if not devices or devices[0].platform != "gpu":
    yield
    return
  version = lambda v: tuple(int(x) for x in v.split("."))
  target = version(devices[0].compute_capability)
  saved = (cudnn_attention.check_compute_capability,
           cudnn_attention.is_cuda_compute_capability_equal)
  cudnn_attention.check_compute_capability = lambda c: target >= version(c)
  cudnn_attention.is_cuda_compute_capability_equal = lambda c: target == version(c)
  try:
    yield
  finally:
    (cudnn_attention.check_compute_capability,
     cudnn_attention.is_cuda_compute_capability_equal) = saved


def _version(package: str) -> str:
  try:
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    return metadata.version(package)
  except Exception:  # pylint: disable=broad-except
    return "unknown"


def describe(topology: str, gpu_memory_fraction: float = JAX_GPU_MEMORY_FRACTION) -> Target:
  """The `Target` of `topology`: TPU chips with their HBM, or GPUs with `gpu_memory_fraction`
  of their memory as the budget (JAX's allocator's share by default)."""
  if is_gpu(topology):
    model, _ = parse_gpu_topology(topology)
    memory = spec_memory_bytes(gpu_target_config(model))
    return Target("gpu", gpu_devices(topology), int(memory * gpu_memory_fraction), memory,
                  f"jax-cuda12-plugin {_version('jax-cuda12-plugin')}")
  hbm = chip_hbm(topology)
  return Target("tpu", tpu_devices(topology), hbm, hbm, f"libtpu {_version('libtpu')}")
