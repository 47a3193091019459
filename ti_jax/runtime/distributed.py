"""Process start-up: `jax.distributed.initialize` when several processes share a run, and
JAX's persistent compilation cache (`enable_compilation_cache`).

Detected automatically on TPU pod slices (several TPU workers), SLURM jobs
with several tasks and Open MPI launches; elsewhere set by flags or the
environment (TI_JAX_COORDINATOR_ADDRESS, TI_JAX_NUM_PROCESSES,
TI_JAX_PROCESS_ID), as the launch/ scripts do for GPU clusters.
"""

from __future__ import annotations

import os

import jax


def cluster_detected() -> bool:
  """True when the environment says this is one of several processes of a job."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return True
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    try:
      if int(os.environ.get(var, "1")) > 1:
        return True
    except ValueError:
      pass
  return False


def maybe_initialize(coordinator_address: str = "", num_processes: int = 0,
                     process_id: int = -1) -> bool:
  """Initialises JAX's multi-controller runtime if this run has several processes.

  Returns True if it did. Arguments fall back to the TI_JAX_* environment
  variables; with none of them, cluster environments are auto-detected.
  """
  coordinator_address = coordinator_address or os.environ.get("TI_JAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("TI_JAX_NUM_PROCESSES", "0") or 0)
  if process_id < 0:
    process_id = int(os.environ.get("TI_JAX_PROCESS_ID", "-1") or -1)
  explicit = bool(coordinator_address) or num_processes > 1
  if not explicit and not cluster_detected():
    return False
  # CPU processes need a collectives backend for cross-process psum/allgather;
  # the setting does nothing on GPU/TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address or None, num_processes or None,
                               process_id if process_id >= 0 else None)
  else:
    jax.distributed.initialize()
  return True


def define_flags() -> None:
  """The absl flags shared by train and sample for clusters without auto-detection."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for multi-process "
                      "runs on GPU clusters (TPU pods and SLURM are detected automatically). "
                      "Env: TI_JAX_COORDINATOR_ADDRESS.")
  flags.DEFINE_integer("num_processes", 0, "Number of processes (env TI_JAX_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", -1, "This process's index (env TI_JAX_PROCESS_ID).")


def enable_compilation_cache(path: str) -> None:
  """Turns on JAX's persistent compilation cache in `path` ("" leaves it off).

  It sets process-wide `jax.config` values, so only the entry point calls it
  (`python -m ti_jax.train` passes config.compilation_cache_dir), never `run`.
  """
  if not path:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
  # Cache every program that took over a second to compile (the train step does).
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
