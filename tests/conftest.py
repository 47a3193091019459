"""Shared fixtures. Eight fake CPU devices are configured before JAX is imported."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent XLA cache per test session, shared with the subprocesses the
# tests start, so each distinct program compiles once (compiles dominate on CPU).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ti_jax-xla-")
else:
  _OWN_XLA_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from ti_jax import tiny_model  # noqa: E402

# Parity figures (name, max relative error, tolerance) reported at the end of the run.
PARITY_FIGURES: list[tuple[str, float, float]] = []


def record_parity(name: str, rel_err: float, tol: float) -> None:
  """Records a parity figure for the summary and asserts it is within `tol`."""
  PARITY_FIGURES.append((name, rel_err, tol))
  assert rel_err <= tol, f"{name}: max relative error {rel_err:.3g} > {tol:g}"


def offline_config(c, cache_dir, **overrides):
  """A training config for tests: tiny models under `cache_dir`, the session's XLA cache, no
  validation images; then `overrides` (field=value)."""
  c.cache_dir = str(cache_dir)
  c.compilation_cache_dir = os.environ["JAX_COMPILATION_CACHE_DIR"]
  c.validation_prompt = ""
  for k, v in overrides.items():
    c[k] = v
  return c


def pytest_terminal_summary(terminalreporter):
  if PARITY_FIGURES:
    terminalreporter.section("parity vs PyTorch diffusers/transformers (max |a-b| / max |b|)")
    for name, err, tol in PARITY_FIGURES:
      terminalreporter.write_line(f"{name:<55s} {err:.2e}  (tolerance {tol:g})")


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> str:
  """A tiny random SD 1.x-shaped diffusers folder written by ti_jax."""
  return tiny_model.write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "sd15"), "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sd21(tmp_path_factory) -> str:
  """A tiny random SD 2.x-shaped diffusers folder written by ti_jax."""
  return tiny_model.write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "sd21"), "tiny-sd21")


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_XLA_CACHE:
    shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)
