"""TPU and GPU programs compiled ahead of time on this CPU host, without a TPU or a GPU.

The compile tests run `benchmarks/aot_compile.py` in a subprocess of their own:
the real TPU compiler (libtpu: XLA:TPU, Mosaic for the Pallas kernel) compiles
the tiny model's pmapped training step over a 4-chip v5e topology and its
sampling loop; the real GPU compiler (JAX's CUDA plugin, `jax[cuda12]`: XLA:GPU)
compiles the tiny step for two H100s. Each is skipped, saying why, where its
compiler is not installed (the CUDA plugin is several GB: the CI environment
leaves it out). The rest of this file runs on CPU without either.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, benchmark_module, config_module
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

from ti_jax.models import layers
from ti_jax.runtime import parallel
from ti_jax.weights import pipeline

BENCHMARKS = os.path.join(REPO, "benchmarks")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
NO_LIBTPU = ("libtpu is not installed, so nothing can be compiled for TPU here: install it with "
             "pip install -e '.[test]' (or pip install 'jax[tpu]')")


NO_CUDA_PLUGIN = ("the CUDA plugin is not installed, so nothing can be compiled for a GPU here: "
                  "install it in an environment of its own with pip install 'jax[cuda12]' "
                  "(several GB; no GPU needed)")
HAS_CUDA_PLUGIN = importlib.util.find_spec("jax_cuda12_plugin") is not None


def _aot_compile():
  benchmark_module("aot_targets")  # aot_compile imports these by name, as `common`
  benchmark_module("aot_mesh")
  return benchmark_module("aot_compile")


def _run_aot_compile(out, *args):
  """Runs benchmarks/aot_compile.py with `args`; returns its JSON results, written to `out`.

  JAX_PLATFORMS=cpu (from conftest): the programs run nothing, so no TPU or GPU backend
  starts. Their executables stay out of the suite's shared CPU compilation cache.
  """
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCHMARKS, "aot_compile.py"), *args, "--json_out", str(out)],
      capture_output=True, text=True, timeout=900, env=dict(env, JAX_PLATFORMS="cpu"),
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_v5e_2x2(tmp_path_factory):
  """The records of compiling the tiny step and sampler for v5e:2x2 with the Pallas kernel."""
  if not HAS_LIBTPU:
    pytest.skip(NO_LIBTPU)
  result = _run_aot_compile(
      tmp_path_factory.mktemp("tpu") / "tiny.json", "--topology", "v5e:2x2", "--model", "tiny",
      "--batch", "2", "--sample_batch", "2", "--attention_impl", "pallas_tpu",
      "--num_inference_steps", "4")
  return {r["program"]: r for r in result["records"]} | {"libtpu": result["libtpu"]}


def test_train_step_compiles_for_four_v5e_chips_with_pmean_and_pallas_kernel(tiny_v5e_2x2):
  step = tiny_v5e_2x2["train"]
  assert step["chips"] == 4 and step["per_chip_batch"] == 2
  assert step["attention_impl"] == "pallas_tpu"
  assert step["all_reduces"] >= 1, "the gradient pmean is missing from the TPU program"
  assert step["pallas_kernels"] > 0, "no Mosaic kernel: the Pallas attention was not compiled"
  assert step["fits"] and 0 < step["total_bytes"] < step["hbm_bytes"] == 16 * 2**30
  assert step["alias_bytes"] > 0, "the train state is not donated (updated in place)"
  assert step["xla_flops"] > 0 and step["compile_s"] > 0


def test_tpu_step_arguments_hold_one_copy_of_the_frozen_weights(tiny_v5e_2x2):
  """Per chip, the arguments are the weights + state + batch once. (Tiny arrays are padded to
  TPU tiles, so they take more than their bytes; a second copy would take twice that.)"""
  step = tiny_v5e_2x2["train"]
  # The frozen weights are arguments of the compiled step (not constants baked into it).
  assert step["argument_bytes"] >= step["weight_bytes"] > 0
  ratio = step["argument_bytes"] / step["expected_argument_bytes"]
  assert 1.0 <= ratio < 2.0, step


@pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
def test_sharded_mesh_step_compiles_for_v5e_with_a_share_of_the_weights_per_chip(
    tiny_v5e_2x2, tmp_path):
  """--shard_weights true: the mesh step of one concept over four v5e chips, the frozen
  weights FSDP-sharded, takes per chip less than one copy of the weights as arguments, so
  less than the pmapped step's replicated arguments (the fixture's). XLA attention: GSPMD
  cannot partition the Mosaic kernel."""
  result = _run_aot_compile(
      tmp_path / "sharded.json", "--topology", "v5e:2x2", "--model", "tiny", "--batch", "2",
      "--program", "train", "--attention_impl", "xla", "--shard_weights", "true")
  step, replicated = result["records"][0], tiny_v5e_2x2["train"]
  assert step["layout"] == "mesh" and step["shard_weights"] is True
  assert step["chips"] == 4 and step["per_chip_batch"] == 2 and step["fits"]
  assert step["all_reduces"] >= 1, "the gradient sum over the data axis is missing"
  assert step["weight_bytes"] == replicated["weight_bytes"]
  # Each chip's shards are under a copy of the weights (tile padding aside, about a quarter).
  assert step["expected_argument_bytes"] < 0.5 * step["weight_bytes"]
  assert step["argument_bytes"] < step["weight_bytes"] <= replicated["argument_bytes"]


def test_sampling_loop_compiles_for_v5e_with_pallas_kernel(tiny_v5e_2x2):
  sample = tiny_v5e_2x2["sample"]
  assert sample["chips"] == 4 and sample["per_chip_batch"] == 2 and sample["steps"] == 4
  assert sample["pallas_kernels"] > 0
  assert sample["all_reduces"] == 0  # generation needs no cross-chip reduction
  assert sample["fits"] and sample["argument_bytes"] >= sample["weight_bytes"]
  assert tiny_v5e_2x2["libtpu"] not in ("", "unknown")


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason=NO_CUDA_PLUGIN)
def test_train_step_compiles_for_two_h100s_with_pmean_and_one_copy_of_the_weights(tmp_path):
  """XLA:GPU compiles the tiny pmapped step for an H100 target from its target config
  (benchmarks/gpu_specs/h100_sxm.txtpb) on this CPU host: no GPU, no CUDA driver."""
  aot_targets = benchmark_module("aot_targets")
  result = _run_aot_compile(tmp_path / "tiny_h100.json", "--topology", "h100:2", "--model",
                            "tiny", "--batch", "1", "--program", "train")
  assert result["platform"] == "gpu" and result["device_kind"] == "NVIDIA H100 80GB HBM3"
  assert result["compiler"].startswith("jax-cuda12-plugin ") and "libtpu" not in result
  (step,) = result["records"]
  assert step["program"] == "train" and step["chips"] == 2 and step["per_chip_batch"] == 1
  # ti_jax's GPU default: jax.nn.dot_product_attention's own choice (XLA), no Pallas kernel.
  assert step["attention_impl"] == "default" and step["pallas_kernels"] == 0
  assert step["all_reduces"] >= 1, "the gradient pmean is missing from the GPU program"
  assert step["alias_bytes"] > 0, "the train state is not donated (updated in place)"
  # The budget is JAX's allocator's share (75%) of the H100's 84,942,979,072 bytes.
  assert result["device_memory_bytes"] == 84942979072
  assert aot_targets.JAX_GPU_MEMORY_FRACTION == 0.75
  assert step["hbm_bytes"] == int(0.75 * 84942979072)
  assert step["fits"] and 0 < step["total_bytes"] < step["hbm_bytes"]
  # Frozen weights are arguments, once: GPUs pad no tiles, so the bytes match exactly.
  assert step["argument_bytes"] >= step["weight_bytes"] > 0
  assert step["argument_bytes"] == step["expected_argument_bytes"], step
  # XLA:GPU compiled without a GPU gives no cost analysis; the analytic count stands alone.
  assert step["xla_flops"] is None and step["analytic_gflop_per_image"] > 0
  assert step["compile_s"] > 0 and "triton_gemm" not in step  # XLA's own matmul choices


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason=NO_CUDA_PLUGIN)
def test_every_gpu_target_config_describes_its_gpu():
  aot_targets = benchmark_module("aot_targets")
  kinds = {"h100": "NVIDIA H100 80GB HBM3", "a100-80g": "NVIDIA A100-SXM4-80GB"}
  assert set(kinds) == set(aot_targets.GPU_SPECS)
  for model, kind in kinds.items():
    devices = aot_targets.gpu_devices(f"{model}:8")
    assert len(devices) == 8 and {d.device_kind for d in devices} == {kind}
    assert {d.platform for d in devices} == {"gpu"}


def test_gpu_topologies_are_named_model_and_count_and_need_the_cuda_plugin(monkeypatch):
  """Runs without the plugin: naming, the spec files' memory, and the message when it is
  missing (the script prints it as `error: cannot describe topology 'h100:1': ...`)."""
  aot_targets = benchmark_module("aot_targets")
  assert aot_targets.is_gpu("h100:8") and aot_targets.is_gpu("A100-80G:1")
  assert not aot_targets.is_gpu("v5e:2x2") and not aot_targets.is_gpu("v4:2x2x1")
  assert aot_targets.parse_gpu_topology("h100:8") == ("h100", 8)
  assert aot_targets.parse_gpu_topology("h100") == ("h100", 1)
  for bad in ("h100:0", "h100:two", "h100:2x2"):
    with pytest.raises(ValueError, match="MODEL:N"):
      aot_targets.parse_gpu_topology(bad)
  with pytest.raises(ValueError, match="unknown GPU 'b200'"):
    aot_targets.gpu_target_config("b200")
  with pytest.raises(ValueError, match="unknown TPU generation 'b200'.*GPUs: h100, a100-80g"):
    aot_targets.chip_hbm("b200:1")
  memory = {m: aot_targets.spec_memory_bytes(aot_targets.gpu_target_config(m))
            for m in aot_targets.GPU_SPECS}
  assert memory == {"h100": 84942979072, "a100-80g": 85100068864}
  monkeypatch.setattr(aot_targets, "has_cuda_plugin", lambda: False)
  with pytest.raises(RuntimeError, match=r"CUDA plugin is not installed.*jax\[cuda12\]"):
    aot_targets.describe("h100:1")


@pytest.mark.skipif(not HAS_LIBTPU, reason=NO_LIBTPU)
def test_entry_points_stay_on_cpu_and_quiet_with_libtpu_installed(tmp_path):
  """With libtpu importable, a test's subprocess (JAX_PLATFORMS=cpu from conftest) neither starts
  a TPU backend nor prints libtpu's warnings."""
  assert os.environ.get("JAX_PLATFORMS") == "cpu"
  helped = subprocess.run([sys.executable, "-m", "ti_jax.train", "--help"], capture_output=True,
                          text=True, timeout=300, check=False)
  # (absl's --help exits with status 1)
  assert "--workdir" in helped.stdout and "TPU" not in helped.stderr, helped.stderr[-2000:]
  ran = subprocess.run([sys.executable, "-m", "ti_jax.tiny_model", "--out_dir",
                        str(tmp_path / "tiny")], capture_output=True, text=True, timeout=300,
                       check=False)
  assert ran.returncode == 0, ran.stderr[-2000:]
  assert "TPU" not in ran.stderr and "libtpu" not in ran.stderr, ran.stderr[-2000:]
  probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.devices()[0].platform)"],
                         capture_output=True, text=True, timeout=300, check=False)
  assert probe.stdout.strip() == "cpu" and "TPU" not in probe.stderr, probe.stderr[-2000:]


class _Device:
  def __init__(self, platform):
    self.platform = platform


def test_default_attention_is_the_pallas_kernel_on_tpu_and_unchanged_elsewhere():
  assert layers.resolve_attention_impl("", [_Device("tpu")]) == layers.PALLAS_TPU
  assert layers.resolve_attention_impl(None, [_Device("tpu")]) == layers.PALLAS_TPU
  assert layers.resolve_attention_impl("", [_Device("gpu")]) is None
  assert layers.resolve_attention_impl("", [_Device("cpu")]) is None
  assert layers.resolve_attention_impl("xla", [_Device("tpu")]) == "xla"
  assert layers.resolve_attention_impl("cudnn", [_Device("gpu")]) == "cudnn"
  # Without devices: the default backend, CPU in the tests.
  assert layers.resolve_attention_impl("") is None


def test_replicate_and_shard_of_shapes_give_the_pmap_layout_without_arrays():
  devices = jax.devices()[:4]
  tree = {"w": jax.ShapeDtypeStruct((3, 5), jnp.bfloat16)}
  rep = parallel.replicate(tree, devices)
  assert rep["w"].shape == (4, 3, 5) and rep["w"].dtype == jnp.bfloat16
  assert isinstance(rep["w"], jax.ShapeDtypeStruct)
  shards = parallel.shard({"ids": jax.ShapeDtypeStruct((8, 77), jnp.int32)}, 4)
  assert shards["ids"].shape == (4, 2, 77) and isinstance(shards["ids"], jax.ShapeDtypeStruct)
  with pytest.raises(ValueError, match="does not split"):
    parallel.shard(jax.ShapeDtypeStruct((6,), jnp.int32), 4)
  # Real arrays keep their old behaviour.
  assert parallel.shard(np.zeros((8, 2)), 4).shape == (4, 2, 2)


def test_analytic_flops_of_the_sd15_step_are_1_70_tflop_per_image():
  """UNet forward + backward to the context + text encoder at 512 px, from the config alone."""
  aot_compile = _aot_compile()
  modules = pipeline.build_modules(aot_compile.common.model_configs("sd15"))
  flops = aot_compile.analytic_step_flops(modules, 512)
  assert flops["total"] == pytest.approx(1.70e12, rel=0.01), flops
  # The backward pass is activation gradients only (no weight gradients): at most the
  # forward's FLOPs for dense/conv layers, twice for attention products.
  assert 0.8 * flops["unet_forward"] < flops["unet_backward"] < 1.3 * flops["unet_forward"]
  # The count scales with the latent area: 768 px has 2.25x the pixels (attention grows faster).
  sd21 = aot_compile.analytic_step_flops(
      pipeline.build_modules(aot_compile.common.model_configs("sd21")), 768)
  assert sd21["unet_forward"] > 2.25 * flops["unet_forward"]


def test_sweep_finds_the_largest_batch_that_fits():
  aot_compile = _aot_compile()
  for limit, start in ((13, 8), (13, 1), (1, 4), (0, 4), (300, 8)):
    calls = []

    def compile_at(b, limit=limit, calls=calls):
      calls.append(b)
      return {"fits": b <= limit}
    best, records = aot_compile.sweep(compile_at, start, 256, lambda r: None)
    assert best == min(limit, 256), (limit, start, calls)
    assert len(records) == len(calls) <= 2 * 9, calls  # doubling then bisection


def test_remat_auto_rematerialises_only_when_the_plain_step_does_not_fit():
  """train_lib.remat_if_needed (config.remat="auto"): XLA's memory plan of the plain step
  against the limit decides; the step is compiled, never run (here on one CPU device)."""
  from ti_jax.training import train_lib  # pylint: disable=import-outside-toplevel
  aot_compile = _aot_compile()
  devices = jax.devices()[:1]
  built = aot_compile.train_step_args("tiny", 1, jnp.float32, "", False, devices)
  pieces = (built["settings"], built["optimizer"], built["lr"], devices, built["args"])
  plain = train_lib.make_pmapped_step(*pieces[:4]).lower(*built["args"]).compile()
  need = train_lib.compiled_memory_bytes(plain)
  assert need > built["expected_argument_bytes"] > 0
  # (That remat recomputes, with the same gradient, is tests/test_train.py's remat test.)
  for limit, expect_remat in ((None, False), (need, False), (need - 1, True)):
    settings, _, remat = train_lib.remat_if_needed(*pieces, limit)
    assert remat is expect_remat and settings.unet.remat is expect_remat, limit


def test_remat_setting_accepts_true_false_and_auto_only(tmp_path):
  from ti_jax.training import config as training_config  # pylint: disable=import-outside-toplevel
  object_config = config_module("object")
  c = object_config.get_config("tiny")
  c.train_data_dir = str(tmp_path)
  assert c.remat == "auto"  # the default
  for ok in (True, False, "auto"):
    c.remat = ok
    training_config.validate_config(c)
  c.remat = "sometimes"
  with pytest.raises(training_config.ConfigError, match="config.remat must be True, False or auto"):
    training_config.validate_config(c)


class _Refused:
  """A step whose compile fails as `error`: lower() gives itself, compile() raises."""

  def __init__(self, error):
    self.error = error

  def lower(self, *args):
    del args
    return self

  def compile(self):
    raise self.error


def test_a_step_the_tpu_compiler_refuses_for_memory_does_not_fit_and_other_errors_raise():
  """XLA:TPU does not plan a program larger than the chip: it fails to compile with
  RESOURCE_EXHAUSTED (CompileTimeHbmOom). remat="auto" and the sweep read that as "does not fit"."""
  from ti_jax.training import train_lib  # pylint: disable=import-outside-toplevel
  oom = jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of "
      "memory in memory space hbm. Used 15.75G of 15.75G hbm. Exceeded hbm capacity by 5.38M.")
  assert train_lib.is_out_of_memory(oom)
  assert train_lib.fits_memory(_Refused(oom), (), 2**40) is False
  other = jax.errors.JaxRuntimeError("INTERNAL: something else broke")
  assert not train_lib.is_out_of_memory(other)
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    train_lib.fits_memory(_Refused(other), (), 2**40)
  record = {}
  assert _aot_compile()._compile(_Refused(oom), record) is None  # pylint: disable=protected-access
  assert record["fits"] is False and "Exceeded hbm capacity by 5.38M" in record["compiler_oom"]


class _Untiled:
  """A GPU program whose first compile fails as XLA:GPU does when, without autotuning, it finds
  no Triton tiling for a matmul; compiled with `compiler_options` it succeeds."""

  def __init__(self):
    self.options = []

  def compile(self, compiler_options=None):
    self.options.append(compiler_options)
    if compiler_options is None:
      raise jax.errors.JaxRuntimeError(
          "INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.601 = "
          "bf16[154,32]{1,0} dot(%bitcast.3006, %parameter_1.10)")
    return "compiled"


def test_a_gpu_matmul_without_a_triton_tiling_is_compiled_again_with_cublas():
  """(The tiny model at per-GPU batch 2 meets this for its [154, 32] CLIP projections.)"""
  aot_compile = _aot_compile()
  record, program = {}, _Untiled()
  assert aot_compile._compile(program, record) == "compiled"  # pylint: disable=protected-access
  assert program.options == [None, {"xla_gpu_enable_triton_gemm": False}]
  assert record["triton_gemm"] is False and record["compile_s"] >= 0


class _Gpu:
  platform = "gpu"
  compute_capability = "9.0"


def test_cudnn_attention_checks_read_the_target_gpu_not_this_host():
  """JAX decides cuDNN attention's limits from the local GPU; compiling for an H100 on a host
  without one, the script makes those checks read the target's compute capability."""
  aot_targets = benchmark_module("aot_targets")
  saved = cudnn_attention.check_compute_capability
  assert cudnn_attention.check_compute_capability("9.0") is False  # this CPU host
  with aot_targets.cudnn_checks_for([_Gpu()]):
    assert cudnn_attention.check_compute_capability("9.0")
    assert cudnn_attention.check_compute_capability("8.0")
    assert not cudnn_attention.check_compute_capability("10.0")
    assert cudnn_attention.is_cuda_compute_capability_equal("9.0")
    assert not cudnn_attention.is_cuda_compute_capability_equal("10.3")
  assert cudnn_attention.check_compute_capability is saved
  with aot_targets.cudnn_checks_for(jax.devices()[:1]):  # CPU devices: nothing changes
    assert cudnn_attention.check_compute_capability is saved
