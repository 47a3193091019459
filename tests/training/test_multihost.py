"""Multi-process runs: 2 processes x 2 CPU devices equal 1 process x 4 devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from conftest import xla_flags
from test_train import REPO, TOY, _config

from ti_jax.sampling import runner
from ti_jax.runtime import run_dir
from ti_jax.training import trainer
from ti_jax.weights import safetensors_io

ENV = dict(os.environ, XLA_FLAGS=xla_flags(2))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(args):
  """Runs `python -m ARGS --coordinator... ` as processes 0 and 1; returns their stderr."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", *args, f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"],
      env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  return [err for _, err in outs]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  cache = root / "cache"
  workdir = root / "two"
  errs = _two_processes([
      "ti_jax.train", "--config", os.path.join(REPO, "configs/object.py:tiny"),
      "--workdir", str(workdir), f"--config.cache_dir={cache}", f"--config.train_data_dir={TOY}",
      "--config.validation_prompt=", "--config.train_batch_size=2",
      "--config.max_train_steps=4", "--config.checkpointing_steps=2",
      f"--config.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"])
  return {"root": root, "cache": cache, "workdir": workdir, "stderr": errs}


def test_two_processes_match_one_process_and_checkpoint_restores_alone(two_process_run):
  run = two_process_run
  single = trainer.run(_config(run["cache"], train_batch_size=2, max_train_steps=4),
                     str(run["root"] / "one"), devices=jax.local_devices()[:4], progress=False)
  assert "on 4 device(s)" in run["stderr"][0]  # process 0 logs; the step spans both processes
  assert "training [" not in run["stderr"][1]  # process 1 stays quiet
  two = np.asarray(safetensors_io.load(str(run["workdir"] / "learned_embeds.safetensors"))["<toy>"])
  np.testing.assert_allclose(two, single["embeds"], rtol=0, atol=1e-5)
  # The checkpoint the two processes wrote together restores in this single process.
  vectors, meta = run_dir.learned_from_workdir(str(run["workdir"]))
  assert meta["step"] == 4
  np.testing.assert_array_equal(vectors, two)


def test_two_process_sampling_matches_one_process(two_process_run):
  run = two_process_run
  out2 = run["root"] / "samples2"
  _two_processes(["ti_jax.sample", "--workdir", str(run["workdir"]), "--prompt",
                  "a photo of a <toy>", "--num_images", "4", "--num_inference_steps", "3",
                  "--output_dir", str(out2)])
  files = sorted(f for f in os.listdir(out2) if "_grid" not in f)
  assert len(files) == 4  # written once, by process 0
  out1 = run["root"] / "samples1"
  runner.run(prompts=["a photo of a <toy>"], workdir=str(run["workdir"]), num_images=4,
             num_inference_steps=3, output_dir=str(out1), devices=jax.local_devices()[:4])
  for name in files:
    a = np.asarray(Image.open(out2 / name)).astype(int)
    b = np.asarray(Image.open(out1 / name)).astype(int)
    assert np.abs(a - b).max() <= 1, name


def test_locked_workdir_stops_both_processes_with_one_line(tmp_path):
  """Process 0 takes the lock for the run; its refusal ends process 1 as well."""
  from test_hardening_run import _hold_lock  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "w"
  holder = _hold_lock(workdir)
  port = _free_port()
  try:
    procs = [subprocess.Popen(
        [sys.executable, "-m", "ti_jax.train", "--config",
         os.path.join(REPO, "configs/object.py:tiny"), "--workdir", str(workdir),
         f"--config.cache_dir={tmp_path / 'cache'}", f"--config.train_data_dir={TOY}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    holder.kill()
    holder.wait()
  for p, err in zip(procs, errs):
    assert p.returncode == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
  lines = [l for l in errs[0].splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and f"pid {holder.pid}" in lines[0], errs[0][-2000:]
  assert os.listdir(workdir) == ["ti_jax.lock"]  # neither process wrote anything
