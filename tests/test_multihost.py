"""Multi-process training: 2 processes x 2 CPU devices equal 1 process x 4 devices."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from ti_jax import checkpointing, safetensors_io, train
from test_train import REPO, TOY, _config


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_and_checkpoint_restores_alone(tmp_path):
  cache = tmp_path / "cache"
  single = train.run(_config(cache, train_batch_size=2, max_train_steps=4), str(tmp_path / "one"),
                     devices=jax.local_devices()[:4], progress=False)
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  workdir = tmp_path / "two"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "ti_jax.train", "--config",
       os.path.join(REPO, "configs/object.py:tiny"), "--workdir", str(workdir),
       f"--config.cache_dir={cache}", f"--config.train_data_dir={TOY}",
       "--config.validation_prompt=", "--config.train_batch_size=2",
       "--config.max_train_steps=4", "--config.checkpointing_steps=2",
       f"--config.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert "on 4 device(s)" in outs[0][1]  # process 0 logs; the step spans both processes
  assert outs[1][1].count("training [") == 0  # process 1 stays quiet
  two = np.asarray(safetensors_io.load(str(workdir / "learned_embeds.safetensors"))["<toy>"])
  np.testing.assert_allclose(two, single["embeds"], rtol=0, atol=1e-5)
  # The checkpoint the two processes wrote together restores in this single process.
  vectors, meta = checkpointing.learned_from_workdir(str(workdir))
  assert meta["step"] == 4
  np.testing.assert_array_equal(vectors, two)
