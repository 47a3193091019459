"""TPU programs compiled ahead of time on this CPU host, with libtpu and without a TPU.

The compile test runs `benchmarks/tpu_compile.py` in a subprocess of its own:
the real TPU compiler (XLA:TPU, Mosaic for the Pallas kernel) compiles the
tiny model's pmapped training step over a 4-chip v5e topology and its
sampling loop. The rest of this file runs on CPU without libtpu.
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

from ti_jax.models import layers
from ti_jax.runtime import parallel
from ti_jax.weights import pipeline

BENCHMARKS = os.path.join(REPO, "benchmarks")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
NO_LIBTPU = ("libtpu is not installed, so nothing can be compiled for TPU here: install it with "
             "pip install -e '.[test]' (or pip install 'jax[tpu]')")


def _tpu_compile():
  return benchmark_module("tpu_compile")


@pytest.fixture(scope="module")
def tiny_v5e_2x2(tmp_path_factory):
  """The records of compiling the tiny step and sampler for v5e:2x2 with the Pallas kernel."""
  if not HAS_LIBTPU:
    pytest.skip(NO_LIBTPU)
  out = tmp_path_factory.mktemp("tpu") / "tiny.json"
  # JAX_PLATFORMS=cpu (from conftest): the program runs nothing, so no TPU backend starts.
  # Its TPU executables stay out of the suite's shared CPU compilation cache.
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  proc = subprocess.run(
      [sys.executable, os.path.join(BENCHMARKS, "tpu_compile.py"), "--topology", "v5e:2x2",
       "--model", "tiny", "--batch", "2", "--sample_batch", "2", "--attention_impl",
       "pallas_tpu", "--num_inference_steps", "4", "--json_out", str(out)],
      capture_output=True, text=True, timeout=900, env=dict(env, JAX_PLATFORMS="cpu"),
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
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


def test_sampling_loop_compiles_for_v5e_with_pallas_kernel(tiny_v5e_2x2):
  sample = tiny_v5e_2x2["sample"]
  assert sample["chips"] == 4 and sample["per_chip_batch"] == 2 and sample["steps"] == 4
  assert sample["pallas_kernels"] > 0
  assert sample["all_reduces"] == 0  # generation needs no cross-chip reduction
  assert sample["fits"] and sample["argument_bytes"] >= sample["weight_bytes"]
  assert tiny_v5e_2x2["libtpu"] not in ("", "unknown")


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
  tpu_compile = _tpu_compile()
  modules = pipeline.build_modules(tpu_compile.common.model_configs("sd15"))
  flops = tpu_compile.analytic_step_flops(modules, 512)
  assert flops["total"] == pytest.approx(1.70e12, rel=0.01), flops
  # The backward pass is activation gradients only (no weight gradients): at most the
  # forward's FLOPs for dense/conv layers, twice for attention products.
  assert 0.8 * flops["unet_forward"] < flops["unet_backward"] < 1.3 * flops["unet_forward"]
  # The count scales with the latent area: 768 px has 2.25x the pixels (attention grows faster).
  sd21 = tpu_compile.analytic_step_flops(
      pipeline.build_modules(tpu_compile.common.model_configs("sd21")), 768)
  assert sd21["unet_forward"] > 2.25 * flops["unet_forward"]


def test_sweep_finds_the_largest_batch_that_fits():
  tpu_compile = _tpu_compile()
  for limit, start in ((13, 8), (13, 1), (1, 4), (0, 4), (300, 8)):
    calls = []

    def compile_at(b, limit=limit, calls=calls):
      calls.append(b)
      return {"fits": b <= limit}
    best, records = tpu_compile.sweep(compile_at, start, 256, lambda r: None)
    assert best == min(limit, 256), (limit, start, calls)
    assert len(records) == len(calls) <= 2 * 9, calls  # doubling then bisection


def test_remat_auto_rematerialises_only_when_the_plain_step_does_not_fit():
  """train_lib.remat_if_needed (config.remat="auto"): XLA's memory plan of the plain step
  against the limit decides; the step is compiled, never run (here on one CPU device)."""
  from ti_jax.training import train_lib  # pylint: disable=import-outside-toplevel
  tpu_compile = _tpu_compile()
  devices = jax.devices()[:1]
  built = tpu_compile.train_step_args("tiny", 1, jnp.float32, "", False, devices)
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
  assert _tpu_compile()._compile(_Refused(oom), record) is None  # pylint: disable=protected-access
  assert record["fits"] is False and "Exceeded hbm capacity by 5.38M" in record["compiler_oom"]
