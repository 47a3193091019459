"""Issue 12, the run directory: locking, checkpoint identity, failed saves, unreadable
checkpoints, non-finite training, limits and signals. Each test reproduces one fault."""

import errno
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboardX import record_writer
from test_tensorboard import _FailingFile, _finishes
from test_train import _cli, _config

from ti_jax import errors
from ti_jax.embeddings import embedding_io, embedding_writer
from ti_jax.runtime import fileio, run_dir
from ti_jax.training import config as training_config
from ti_jax.training import inputs as run_inputs
from ti_jax.training import loop, trainer
from ti_jax.weights import safetensors_io


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
  """The vectors of an uninterrupted 4-step run, to compare resumed runs with."""
  return trainer.run(_config(cache_dir, max_train_steps=4), str(tmp_path_factory.mktemp("ref")),
                   progress=False)["embeds"]


def _chattr(flag, *paths):
  """chattr on paths; False where the file system does not support it."""
  out = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True)
  return out.returncode == 0


def _non_daemon_threads():
  return [t.name for t in threading.enumerate()
          if t is not threading.main_thread() and not t.daemon and t.is_alive()]


# --- 1. the workdir lock and the checkpoint's identity ---------------------------------------


def _hold_lock(workdir):
  """A separate process that holds the workdir lock until killed."""
  code = ("import sys, time; from ti_jax.runtime import run_dir; "
          "run_dir.lock_workdir(sys.argv[1]); print('locked', flush=True); time.sleep(600)")
  proc = subprocess.Popen([sys.executable, "-c", code, str(workdir)], stdout=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_locked_workdir_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(
    tmp_path, cache_dir):
  workdir = tmp_path / "w"
  holder = _hold_lock(workdir)
  try:
    with pytest.raises(run_dir.WorkdirError) as err:
      trainer.run(_config(cache_dir, max_train_steps=1), str(workdir), progress=False)
    message = str(err.value)
    assert f"pid {holder.pid} on {socket.gethostname()}" in message and "\n" not in message
    assert "in use by another training run" in message
    assert os.listdir(workdir) == [fileio.LOCK_NAME]  # the refused run wrote nothing
  finally:
    holder.kill()
    holder.wait()
  # The kernel dropped the dead holder's lock: the next run takes it.
  lock = run_dir.lock_workdir(str(workdir))
  record = json.loads((workdir / fileio.LOCK_NAME).read_text())
  assert record["pid"] == os.getpid()
  lock.release()


def test_gs_lock_is_exclusive_and_takes_over_only_a_dead_process_of_this_host(
    tmp_path, monkeypatch):
  """The gs:// path of DirLock, with create-if-absent done by O_EXCL on a local file."""
  def create_if_absent(path, data):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
      return False
    os.write(fd, data)
    os.close(fd)
    return True
  monkeypatch.setattr(fileio, "is_remote", lambda path: True)
  monkeypatch.setattr(fileio, "gcs_create_if_absent", create_if_absent)
  path = tmp_path / fileio.LOCK_NAME
  first = fileio.DirLock(str(tmp_path))
  first.acquire()
  with pytest.raises(fileio.LockHeld) as held:
    fileio.DirLock(str(tmp_path)).acquire()
  assert held.value.holder["pid"] == os.getpid()  # alive: refused
  first.release()
  assert not path.exists()
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  path.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
  taker = fileio.DirLock(str(tmp_path))
  taker.acquire()  # a dead process of this host: taken over
  assert json.loads(path.read_text())["pid"] == os.getpid()
  path.write_text(json.dumps({"pid": int(dead), "host": "another-host", "token": "x"}))
  with pytest.raises(run_dir.WorkdirError, match=f"delete {path}"):
    run_dir.lock_workdir(str(tmp_path))  # another host's record: cannot tell, refused
  taker.release()  # no longer its record: left in place
  assert json.loads(path.read_text())["host"] == "another-host"


def test_checkpoint_of_another_concept_is_refused_even_without_run_json(tmp_path, cache_dir):
  workdir = tmp_path / "w"
  trainer.run(_config(cache_dir, max_train_steps=2), str(workdir), progress=False)
  (workdir / "run.json").unlink()
  for override, field in (({"placeholder_token": "<other>"}, "placeholder_token"),
                          ({"seed": 7}, "seed")):
    with pytest.raises(run_dir.WorkdirError, match="was made by another run") as err:
      trainer.run(_config(cache_dir, max_train_steps=4, **override), str(workdir), progress=False)
    assert field in str(err.value)
    assert not (workdir / "run.json").exists()  # nothing claimed for the other concept
  assert run_dir.Checkpoints(str(workdir)).all_steps() == [2]
  # The same run resumes and run.json, a cache of the identity, is written again.
  result = trainer.run(_config(cache_dir, max_train_steps=4), str(workdir), progress=False)
  assert result["step"] == 4 and (workdir / "run.json").exists()


def test_checkpoint_with_the_old_rng_entry_still_resumes(tmp_path, cache_dir, monkeypatch,
                                                         reference):
  """Checkpoints of earlier versions also stored the seed's rng key data."""
  save = run_dir.Checkpoints.save
  old_rng = np.asarray([0, 0], np.uint32)
  monkeypatch.setattr(run_dir.Checkpoints, "save",
                      lambda self, step, state, meta: save(self, step, dict(state, rng=old_rng),
                                                           meta))
  workdir = tmp_path / "old"
  trainer.run(_config(cache_dir, max_train_steps=2), str(workdir), progress=False)
  monkeypatch.setattr(run_dir.Checkpoints, "save", save)
  untyped, _ = run_dir.Checkpoints(str(workdir)).restore_untyped(2)
  assert "rng" in untyped
  resumed = trainer.run(_config(cache_dir, max_train_steps=4), str(workdir), progress=False)
  np.testing.assert_array_equal(resumed["embeds"], reference)


# --- 2. failed checkpoint writes -----------------------------------------------------------


@pytest.mark.parametrize("fault", [PermissionError(errno.EPERM, "Operation not permitted"),
                                   OSError(errno.ENOSPC, "No space left on device")])
def test_failed_save_is_one_line_naming_the_last_good_step_and_the_rerun_resumes_exactly(
    tmp_path, cache_dir, monkeypatch, fault, reference):
  workdir = tmp_path / "w"
  save = ocp.CheckpointManager.save

  def failing_save(self, step, *args, **kwargs):
    if step == 4:
      raise fault
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
  before = set(_non_daemon_threads())
  with pytest.raises(run_dir.CheckpointWriteError) as err:
    trainer.run(_config(cache_dir, max_train_steps=4), str(workdir), progress=False)
  message = str(err.value)
  assert "cannot write checkpoint 4" in message and "last good checkpoint is step 2" in message
  assert fault.strerror in message and "\n" not in message
  assert set(_non_daemon_threads()) <= before  # nothing left waiting
  assert run_dir.Checkpoints(str(workdir)).all_steps() == [2]
  if fault.errno == errno.ENOSPC:
    return  # resuming after the fault is the same for both: checked once
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)  # the fault is fixed
  resumed = trainer.run(_config(cache_dir, max_train_steps=4), str(workdir), progress=False)
  np.testing.assert_array_equal(resumed["embeds"], reference)


def test_cli_exits_within_seconds_with_one_error_line_when_checkpoints_become_immutable(
    tmp_path, cache_dir):
  workdir = tmp_path / "w"
  probe = tmp_path / "probe"
  probe.mkdir()
  if not _chattr("+i", probe):
    pytest.skip("chattr +i is not supported here")
  _chattr("-i", probe)
  proc = subprocess.Popen(_cli(workdir, cache_dir, "--config.max_train_steps=100000",
                               "--config.checkpointing_steps=20", "--config.log_every_steps=20"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  ckpts = workdir / "checkpoints"
  try:
    deadline = time.time() + 300
    while not (ckpts / "20").exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert _chattr("+i", ckpts)
    made_immutable = time.time()
    _, err = proc.communicate(timeout=60)  # a hang fails here
    elapsed = time.time() - made_immutable
  finally:
    _chattr("-i", ckpts)
    if proc.poll() is None:
      proc.kill()
  lines = [l for l in err.replace("\r", "\n").splitlines() if l.startswith("error:")]
  assert proc.returncode == 1, err[-2000:]
  assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
  assert "cannot write checkpoint" in lines[0] and "the last good checkpoint is step" in lines[0]
  assert "compiling the training step" in err  # said before the long first compile
  assert elapsed < 30, elapsed
  last_good = int(lines[0].rsplit("step ", 1)[1].split()[0])
  assert max(run_dir.Checkpoints(str(workdir)).all_steps()) == last_good


# --- 3. unreadable checkpoints -------------------------------------------------------------


def _truncate_data_files(workdir, step):
  files = glob.glob(str(workdir / "checkpoints" / str(step) / "state" / "d" / "*"))
  assert files
  for f in files:
    with open(f, "r+b") as fh:
      fh.truncate(10)


@pytest.mark.parametrize("damage", ["truncated_data", "garbled_json"])
def test_unreadable_newest_checkpoint_names_a_good_step_and_train_falls_back(
    tmp_path, cache_dir, capsys, damage):
  workdir = tmp_path / "w"
  first = trainer.run(_config(cache_dir, max_train_steps=4), str(workdir), progress=False)
  if damage == "truncated_data":
    _truncate_data_files(workdir, 4)
  else:
    (workdir / "checkpoints" / "4" / "metadata" / "metadata").write_text("{garbled")
  with pytest.raises(run_dir.WorkdirError) as err:
    run_dir.learned_from_workdir(str(workdir))  # what sample/export/evaluate call
  assert "checkpoint 4" in str(err.value) and "use --step 2" in str(err.value)
  assert "\n" not in str(err.value)
  capsys.readouterr()
  again = trainer.run(_config(cache_dir, max_train_steps=4), str(workdir), progress=False)
  log = capsys.readouterr().err
  assert "warning: skipping checkpoint 4" in log and "resuming from step 2" in log
  np.testing.assert_array_equal(again["embeds"], first["embeds"])  # redone exactly
  assert os.listdir(workdir / "unreadable_checkpoints")[0].startswith("4-")  # kept aside
  vectors, meta = run_dir.learned_from_workdir(str(workdir))
  assert meta["step"] == 4


# --- 4. non-finite training ----------------------------------------------------------------


def test_diverging_run_stops_at_a_log_step_and_writes_no_non_finite_checkpoint(
    tmp_path, cache_dir):
  """3 sane steps (checkpoint 3), then a resumed run at lr 1e30 diverges at once: the log of
  step 5 stops it before checkpoint 6, and checkpoint 3 stays the newest."""
  workdir = tmp_path / "w"
  trainer.run(_config(cache_dir, max_train_steps=3, checkpointing_steps=3), str(workdir),
              progress=False)
  (workdir / "learned_embeds.safetensors").unlink()  # the sane run's export, not wanted here
  with pytest.raises(loop.DivergedError) as err:
    trainer.run(_config(cache_dir, learning_rate=1e30, max_train_steps=20, log_every_steps=5,
                        checkpointing_steps=3), str(workdir), progress=False)
  message = str(err.value)
  assert "training diverged by step 5" in message and "\n" not in message
  assert "the last finite checkpoint, step 3, is kept" in message
  ckpts = run_dir.Checkpoints(str(workdir))
  assert ckpts.all_steps() == [3]  # nothing written after the divergence
  state, _ = ckpts.restore_untyped(3)
  assert np.all(np.isfinite(state["state"]["params"]["embeds"]))
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3]  # the diverged step 5 is not logged
  assert not (workdir / "learned_embeds.safetensors").exists()


def test_checkpoint_with_non_finite_vectors_is_refused_on_restore(tmp_path, cache_dir):
  workdir = tmp_path / "w"
  trainer.run(_config(cache_dir, max_train_steps=2), str(workdir), progress=False)
  ckpts = run_dir.Checkpoints(str(workdir), max_to_keep=None)
  state, meta = ckpts.restore_untyped(2)
  state["state"]["params"]["embeds"][0, 0] = np.nan
  ckpts._manager.save(3, args=ocp.args.Composite(  # bypasses the write-side check
      state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(dict(meta, step=3))))
  ckpts.close()
  with pytest.raises(run_dir.WorkdirError, match=r"checkpoint 3 .*non-finite.*--step 2"):
    run_dir.learned_from_workdir(str(workdir))
  with pytest.raises(run_dir.CheckpointWriteError, match="non-finite"):
    run_dir.Checkpoints(str(workdir)).save(5, state, meta)
  # The writer of the final learned_embeds.safetensors refuses them too, writing nothing.
  with pytest.raises(embedding_io.EmbeddingFileError, match="holds NaN or inf"):
    embedding_writer.save_embedding(str(tmp_path / "x.safetensors"), embedding_io.Concept(
        "<toy>", np.full((1, 4), np.inf, np.float32), "x"), "diffusers")
  assert not (tmp_path / "x.safetensors").exists()


def test_non_finite_init_embedding_is_refused(tmp_path, cache_dir):
  path = tmp_path / "nan.safetensors"
  safetensors_io.save(str(path), {"<nan>": np.full((1, 32), np.nan, np.float32)})
  with pytest.raises(errors.UserError) as err:
    trainer.run(_config(cache_dir, init_embedding=str(path)), str(tmp_path / "w"), progress=False)
  assert "finite" in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "w").exists()


# --- 6. run.json, read-only workdirs, signals ----------------------------------------------


@pytest.mark.parametrize("content, needle", [(b"[1, 2]", "not an object"),
                                             (b"\xff\xfe{}", "not UTF-8")])
def test_run_json_that_is_not_a_utf8_object_is_one_line(tmp_path, cache_dir, content, needle):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "run.json").write_bytes(content)
  with pytest.raises(run_dir.WorkdirError, match=needle) as err:
    trainer.run(_config(cache_dir), str(workdir), progress=False)
  assert "\n" not in str(err.value)
  assert (workdir / "run.json").read_bytes() == content
  with pytest.raises(run_dir.WorkdirError, match=needle):
    run_dir.read_identity(str(workdir))


def test_rerun_of_a_finished_run_in_a_read_only_workdir(tmp_path, cache_dir, monkeypatch):
  workdir = tmp_path / "w"
  done = trainer.run(_config(cache_dir, max_train_steps=2), str(workdir), progress=False)
  files = [workdir / f for f in os.listdir(workdir)]
  # The directory alone immutable: the run completes without writing anything new.
  if _chattr("+i", workdir):
    try:
      again = trainer.run(_config(cache_dir, max_train_steps=2), str(workdir), progress=False)
      np.testing.assert_array_equal(again["embeds"], done["embeds"])
      # Everything immutable, as on a read-only mount: the lock cannot be taken.
      assert _chattr("+i", *files)
      with pytest.raises(run_dir.WorkdirError, match="cannot lock --workdir") as err:
        trainer.run(_config(cache_dir, max_train_steps=2), str(workdir), progress=False)
      assert "\n" not in str(err.value)
    finally:
      _chattr("-i", workdir, *files)
  # The same refusal by fault injection, where chattr is unavailable.
  def read_only(self):
    raise OSError(errno.EROFS, "Read-only file system")
  monkeypatch.setattr(fileio.DirLock, "acquire", read_only)
  with pytest.raises(run_dir.WorkdirError, match="Read-only file system"):
    trainer.run(_config(cache_dir, max_train_steps=2), str(workdir), progress=False)


def test_second_sigterm_during_the_stop_checkpoint_does_not_cut_it_short(
    tmp_path, cache_dir, monkeypatch):
  """SIGTERM during step 3, then another while the stop checkpoint (step 4) is written."""
  class Bar:
    n = 0

    def update(self, k):
      self.n += k
      if self.n == 3:
        os.kill(os.getpid(), signal.SIGTERM)

    def set_postfix(self, _):
      pass

    def close(self):
      pass
  monkeypatch.setattr(loop, "progress_bar", lambda *a: Bar())
  save = run_dir.Checkpoints.save
  signalled = []

  def save_hit_by_a_signal(self, step, state, meta):
    signalled.append(step)
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, mid-save
    return save(self, step, state, meta)
  monkeypatch.setattr(run_dir.Checkpoints, "save", save_hit_by_a_signal)
  workdir = tmp_path / "w"
  result = trainer.run(_config(cache_dir, max_train_steps=100, checkpointing_steps=100),
                     str(workdir), progress=False)
  assert result["interrupted"] and result["step"] == 4 and signalled == [4]
  assert run_dir.Checkpoints(str(workdir)).all_steps() == [4]


# --- 12. validation at the final step of a resumed run ---------------------------------------


def test_final_step_of_a_resumed_run_gets_validation_images(tmp_path, cache_dir):
  workdir = tmp_path / "w"
  settings = dict(validation_prompt="a photo of {}", validation_steps=100,
                  num_validation_images=1, validation_inference_steps=2)
  trainer.run(_config(cache_dir, max_train_steps=2, **settings), str(workdir), progress=False)
  trainer.run(_config(cache_dir, max_train_steps=3, **settings), str(workdir), progress=False)
  assert sorted(os.listdir(workdir / "validation")) == ["step000002_0.png", "step000003_0.png"]


# --- the same kind of hole elsewhere -------------------------------------------------------


def test_interrupted_file_write_keeps_the_previous_file(tmp_path):
  path = tmp_path / "learned_embeds.safetensors"
  path.write_bytes(b"previous")

  def dies_half_way(local):
    with open(local, "wb") as f:
      f.write(b"half")
    raise OSError(errno.ENOSPC, "No space left on device")
  with pytest.raises(OSError):
    fileio.write_via_local_file(str(path), dies_half_way)
  assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == [path.name]


# --- issue 28: side channels on a full disk; sizes that cannot fit -------------------------


class _StepHook:
  """A progress bar that calls `hook(step)` after each step (stands in for tqdm)."""

  def __init__(self, hook):
    self.n, self.hook = 0, hook

  def update(self, k):
    self.n += k
    self.hook(self.n)

  def set_postfix(self, _):
    pass

  def close(self):
    pass


def test_full_disk_with_tensorboard_is_one_error_line_without_thread_tracebacks_and_resumes(
    tmp_path, cache_dir, monkeypatch, capfd, reference):
  """The disk fills after step 3: the event file and checkpoint 4 fail. tensorboardX's
  thread printed tracebacks (and hung the run once its queue was full)."""
  workdir = tmp_path / "w"
  full = OSError(errno.ENOSPC, "No space left on device")
  files = []
  open_file = record_writer.open_file
  monkeypatch.setattr(record_writer, "open_file",
                      lambda path: files.append(_FailingFile(open_file(path), full)) or files[-1])

  def fill_the_disk(step):
    if step == 3:
      for f in files:
        f.armed = True
  monkeypatch.setattr(loop, "progress_bar", lambda *a: _StepHook(fill_the_disk))
  save = ocp.CheckpointManager.save

  def save_on_a_full_disk(self, step, *args, **kwargs):
    if step > 3:
      raise full
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "save", save_on_a_full_disk)
  before = set(_non_daemon_threads())
  c = _config(cache_dir, max_train_steps=4, report_to="tensorboard")
  with pytest.raises(run_dir.CheckpointWriteError) as err:
    _finishes(lambda: trainer.run(c, str(workdir), progress=False), 300)
  message = str(err.value)
  assert "cannot write checkpoint 4" in message and "last good checkpoint is step 2" in message
  assert "\n" not in message
  log = capfd.readouterr().err
  assert "Traceback" not in log and "Exception" not in log, log[-3000:]
  assert len([l for l in log.splitlines() if l.startswith("warning: TensorBoard is off")]) == 1
  assert set(_non_daemon_threads()) <= before  # nothing left waiting
  # Space again: the re-run resumes from step 2 and ends where an uninterrupted run does.
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  monkeypatch.setattr(record_writer, "open_file", open_file)
  monkeypatch.setattr(loop, "progress_bar", lambda *a: _StepHook(lambda step: None))
  resumed = _finishes(lambda: trainer.run(c, str(workdir), progress=False), 300)
  np.testing.assert_array_equal(resumed["embeds"], reference)


def test_checkpoint_failing_in_orbax_threads_is_one_line_without_their_tracebacks(
    tmp_path, cache_dir, monkeypatch, capfd, caplog):
  """A disk that fills during a checkpoint fails the writes in Orbax's worker threads,
  which logged each failure with its traceback before the save raised it."""
  async def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  save = ocp.CheckpointManager.save

  def save_on_a_full_disk(self, step, *args, **kwargs):
    if step == 4:  # the array writes of this save fail in Orbax's threads
      monkeypatch.setattr(ocp.type_handlers.NumpyHandler, "_open_and_write", no_space)
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "save", save_on_a_full_disk)
  with pytest.raises(run_dir.CheckpointWriteError) as err:
    trainer.run(_config(cache_dir, max_train_steps=4), str(tmp_path / "w"), progress=False)
  message = str(err.value)
  assert "cannot write checkpoint 4" in message and "No space left on device" in message
  assert "last good checkpoint is step 2" in message and "\n" not in message
  logged = [r for r in caplog.records if r.levelname == "ERROR"]
  assert not logged, [r.getMessage()[:200] for r in logged]
  log = capfd.readouterr().err
  assert "Traceback" not in log and "Exception" not in log, log[-3000:]
  # Orbax's error logs are shown again once the failed run's checkpoints are closed.
  assert not [f for f in logging.getLogger("absl").filters
              if type(f).__name__ == "_QuietOrbaxErrors"]


def test_metrics_log_on_a_full_disk_is_one_error_line(tmp_path, cache_dir, monkeypatch):
  """metrics.jsonl's failed write was reported, then its close wrote the same buffer again
  and that second OSError replaced the one-line error with a traceback."""
  real_open = open

  def open_on_a_full_disk(path, mode="r", *args, **kwargs):
    if str(path).endswith("metrics.jsonl") and "a" in mode:
      return real_open("/dev/full", mode, *args, **kwargs)  # every flush: ENOSPC
    return real_open(path, mode, *args, **kwargs)
  monkeypatch.setattr(fileio, "open", open_on_a_full_disk, raising=False)
  with pytest.raises(run_dir.WorkdirError) as err:
    trainer.run(_config(cache_dir, max_train_steps=2), str(tmp_path / "w"), progress=False)
  message = str(err.value)
  assert "at step 1: OSError: [Errno 28] No space left on device" in message
  assert "\n" not in message


def test_metrics_log_that_is_not_a_regular_file_is_refused_in_one_line(tmp_path, cache_dir):
  """metrics.jsonl is read whole when a run starts: a named pipe there blocked it forever."""
  workdir = tmp_path / "w"
  workdir.mkdir()
  os.mkfifo(workdir / "metrics.jsonl")
  with pytest.raises(run_dir.WorkdirError) as err:
    _finishes(lambda: trainer.run(_config(cache_dir, max_train_steps=2), str(workdir),
                                  progress=False), 120)
  message = str(err.value)
  assert f"cannot open {workdir / 'metrics.jsonl'}" in message and "\n" not in message
  assert "a named pipe, not a regular file" in message


@pytest.mark.parametrize("override, needle", [
    ({"train_batch_size": 10**8}, "config.train_batch_size 100000000 is above the limit of "
     "65536 examples per step"),
    ({"gradient_accumulation_steps": 10**8}, "gradient_accumulation_steps 100000000 is above"),
    ({"gradient_accumulation_steps": 3 * 10**9}, "gradient_accumulation_steps 3000000000 is"),
    ({"global_batch_size": 2**17}, "config.global_batch_size 131072 is above the limit"),
    ({"lr_warmup_steps": 10**12, "lr_scheduler": "cosine"},
     "config.lr_warmup_steps 1000000000000 is above 2147483647: the training step counts"),
    ({"max_train_steps": 2**31}, "config.max_train_steps 2147483648 is above 2147483647"),
    ({"progressive_words": 2**31}, "config.progressive_words 2147483648 is above"),
    ({"seed": 2**32}, "config.seed must be >= 0 and < 2**32"),
    ({"validation_prompt": "a {}", "num_validation_images": 10**8},
     "config.num_validation_images 100000000 is above the limit of 64 validation images"),
    ({"validation_prompt": "a {}", "validation_batch_size": 10**6},
     "config.validation_batch_size 1000000 is above the limit of 64"),
])
def test_sizes_that_cannot_fit_are_refused_in_one_line_before_anything_is_written(
    tmp_path, cache_dir, override, needle):
  """They ran out of host memory (MemoryError, numpy's 22.4 GiB array), overflowed int32
  inside the jitted step (OverflowError), or made JAX's keys repeat another seed's."""
  c = _config(cache_dir, **override)
  # validate_config first: before the fix `run` would try to allocate (safe to fail here).
  with pytest.raises(training_config.ConfigError) as err:
    training_config.validate_config(c)
  assert needle in str(err.value) and "\n" not in str(err.value)
  with pytest.raises(training_config.ConfigError):
    trainer.run(c, str(tmp_path / "w"), progress=False)
  assert not (tmp_path / "w").exists()


def test_batch_over_the_devices_that_cannot_fit_is_refused_before_the_workdir(tmp_path,
                                                                            cache_dir):
  c = _config(cache_dir, train_batch_size=40000, gradient_accumulation_steps=1)
  with pytest.raises(training_config.ConfigError) as err:
    run_inputs.batch_sizes(c, 2)  # each field is under the limit, their product is not
  assert ("config.train_batch_size 40000 x 2 devices x 1 accumulation steps = 80000 examples "
          "per step, above the limit of 65536") in str(err.value)
  with pytest.raises(training_config.ConfigError, match="80000 examples per step"):
    trainer.run(c, str(tmp_path / "w"), devices=jax.local_devices()[:2], progress=False)
  assert not (tmp_path / "w").exists()


def test_largest_accepted_sizes_still_train(tmp_path, cache_dir):
  """The limits refuse only what cannot work: the largest seed and warmup are taken, and
  step counts used only on the host (checkpoints, logs, validation) may be any size."""
  c = _config(cache_dir, max_train_steps=2, seed=2**32 - 1, lr_scheduler="cosine",
              lr_warmup_steps=2**31 - 1, checkpoints_total_limit=10**12,
              checkpointing_steps=10**12, log_every_steps=10**12, validation_steps=10**12)
  result = trainer.run(c, str(tmp_path / "w"), progress=False)
  assert result["step"] == 2 and np.all(np.isfinite(result["embeds"]))
  assert run_dir.Checkpoints(str(tmp_path / "w")).all_steps() == [2]


@pytest.mark.parametrize("extra, needle", [
    (("--config.gradient_accumulation_steps=3000000000",),
     "config.gradient_accumulation_steps 3000000000 is above the limit"),
    (("--config.lr_warmup_steps=1000000000000", "--config.lr_scheduler=cosine"),
     "config.lr_warmup_steps 1000000000000 is above 2147483647"),
    (("--config.validation_prompts=/dev/zero", "--dry_run"),
     "cannot read config.validation_prompts /dev/zero: a character device, not a regular file"),
])
def test_cli_refuses_sizes_and_special_files_in_one_line(tmp_path, cache_dir, extra, needle):
  workdir = tmp_path / "w"
  out = subprocess.run(_cli(workdir, cache_dir, *extra), capture_output=True, text=True,
                       timeout=300)
  lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert out.returncode == 1 and len(lines) == 1, out.stderr[-2000:]
  assert needle in lines[0] and "Traceback" not in out.stderr
  assert not workdir.exists()
