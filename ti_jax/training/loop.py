"""The training loop: steps, logs, sanity checks, checkpoints, validation and stop signals.

`trainer.run` calls `train_loop` once, with the compiled step, the replicated
state and frozen arrays (one `Frozen` per bucket), and gets back the state at
the step it stopped. Each step's batch is built while the device computes the
previous one (`inputs.batch_for`). Every log_every_steps it writes one
metrics.jsonl record (and TensorBoard scalars) and stops a diverged run
(`DivergedError`: a non-finite loss or a vector norm above `norm_limit`);
every checkpointing_steps, and at the end, it saves a checkpoint; at validation
steps it renders the validation images (`validation`). SIGINT or SIGTERM stops
it at the next step boundary with a checkpoint; a second signal aborts without
one (`Aborted`), except while a checkpoint is being written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from ti_jax import errors
from ti_jax.runtime import console, fileio, parallel, run_dir
from ti_jax.training import tensorboard, train_lib, validation
from ti_jax.training.inputs import RunInputs, batch_for, frozen_for, step_bucket

_log = console.log

# A learned vector whose L2 norm exceeds this many times the largest norm of the
# model's token table (or of the initial vectors) has diverged: the text encoder
# has never seen inputs of that size. Normal runs stay within about 10x.
MAX_NORM_FACTOR = 1000.0


class DivergedError(errors.UserError):
  """The loss or the learned vectors stopped being finite (or sane); one-line message."""


class Aborted(Exception):
  """A second stop signal ended the run before its checkpoint was written."""


@dataclasses.dataclass
class LogInterval:
  """The loop's record since its last log step."""
  time: float  # perf_counter at the last log (or checkpoint, validation: not step time)
  step: int
  loss_sum: Any = None  # on device: summed without a host sync between logs
  loss_count: int = 0

  def restart(self, step: int) -> None:
    self.time, self.step = time.perf_counter(), step


def train_loop(config, inputs: RunInputs, step_fn, state, frozen, start: int,
               ckpts: run_dir.Checkpoints, metadata: dict,
               validator: validation.Validation | None, limit: float, workdir: str,
               progress: bool, tb: tensorboard.Writer | None = None) -> tuple[Any, int, bool]:
  """Steps from `start` to config.max_train_steps; returns (replicated state, step, interrupted).

  Logs every log_every_steps (to metrics.jsonl, and to `tb` if given; the caller
  closes it), checkpoints every checkpointing_steps and at the end, and stops
  (with a checkpoint) at the first step boundary after a signal. `frozen` is
  `inputs.bucket_frozen`'s list: each step gets its bucket's.
  """
  is_main = jax.process_index() == 0
  metrics_log = open_metrics_log(workdir, start, is_main)
  bar = progress_bar(start, config.max_train_steps, progress and is_main)
  flag = StopFlag()
  interval = LogInterval(time.perf_counter(), start)
  step, interrupted = start, False
  compiled_buckets: set[int] = set()  # with buckets: those whose program has compiled
  try:
    with stop_on_signals(flag):
      next_batch = batch_for(config, inputs, step) if step < config.max_train_steps else None
      if step < config.max_train_steps:
        _log("compiling the training step (the first step takes a while)")
      while step < config.max_train_steps:
        drawn = step_bucket(config, inputs, step)
        new_bucket = drawn is not None and drawn[0] not in compiled_buckets
        if new_bucket:
          compiled_buckets.add(drawn[0])
        state, metrics = step_fn(state, frozen_for(config, inputs, frozen, step), next_batch)
        step += 1
        interval.loss_sum = (metrics["loss"] if interval.loss_sum is None
                             else interval.loss_sum + metrics["loss"])
        interval.loss_count += 1
        if step == start + 1:  # the first call compiles; keep that out of the step times
          jax.block_until_ready(metrics)
          _log(f"compiled and ran the first step in {time.perf_counter() - interval.time:.1f}s")
          interval.restart(step)
        elif new_bucket:  # a bucket's first step compiles its shape's program: not a step time
          jax.block_until_ready(metrics)
          w, h = inputs.images.buckets[drawn[0]]
          _log(f"compiled the step for bucket {w}x{h} at step {step}")
          interval.restart(step)
        # Build the next batch while the device computes this one.
        next_batch = batch_for(config, inputs, step) if step < config.max_train_steps else None
        # Every process stops at the same step when any of them was signalled; with
        # several processes that takes a collective, so it is asked at log steps only.
        at_log = step % config.log_every_steps == 0 or step == config.max_train_steps
        stop = (parallel.any_process(flag.signal is not None)
                if at_log or jax.process_count() == 1 else False)
        if at_log or stop:
          log_metrics(interval, step, metrics, inputs.global_batch, metrics_log, bar, limit,
                      ckpts, tb)
        bar.update(1)
        if step % config.checkpointing_steps == 0:
          save_checkpoint(ckpts, state, step, metadata, config, flag, limit)
          interval.restart(step)
        if validator and not stop and validation.is_due(config, step):
          host = parallel.unreplicate(state).params
          validation.write_images(validator, step, tuple(host[c.key] for c in inputs.concepts),
                                  tb)
          interval.restart(step)
        if stop:
          interrupted = True
          break
      save_checkpoint(ckpts, state, step, metadata, config, flag, limit)
  except OSError as e:  # metrics.jsonl (validation warns instead; checkpoints raise their own)
    last = ckpts.latest_step()
    raise run_dir.WorkdirError(
        f"cannot write to {workdir} at step {step}: {console.one_line(e, limit=300)}; "
        "the last good "
        f"checkpoint is step {last if last is not None else 'none'}") from None
  except KeyboardInterrupt:
    last = ckpts.latest_step()
    raise Aborted(f"aborted by a second signal at step {step} without saving; the last "
                  f"checkpoint is step {last if last is not None else 'none'}") from None
  finally:
    bar.close()  # ends the bar's line, so an error message starts on its own line
    metrics_log.close()  # never raises after a failed write (that error is the one reported)
  return state, step, interrupted


def log_metrics(interval: LogInterval, step: int, metrics: dict, global_batch: int,
                metrics_log: fileio.LineLog, bar, limit: float,
                ckpts: run_dir.Checkpoints, tb: tensorboard.Writer | None = None) -> None:
  """Writes one metrics.jsonl record (loss averaged since the last log), and its numbers to
  TensorBoard if `tb`, and checks sanity."""
  m = {k: float(parallel.unreplicate(v)) for k, v in metrics.items()}
  m["loss"] = float(parallel.unreplicate(interval.loss_sum)) / interval.loss_count
  interval.loss_sum, interval.loss_count = None, 0
  # A nan in any step since the last log makes the summed loss nan.
  check_sane(step, m["loss"], m["max_vector_norm"], limit, ckpts)
  record = {"step": step, **m, "time": time.time()}
  postfix = {"loss": f"{m['loss']:.4f}", "lr": f"{m['lr']:.2e}"}
  now = time.perf_counter()
  if step > interval.step:  # no timing for an interval that held only the compile
    step_time = (now - interval.time) / (step - interval.step)
    record.update(step_time_s=step_time, images_per_sec=global_batch / step_time)
    postfix.update(step_s=f"{step_time:.3f}", img_s=f"{global_batch / step_time:.1f}")
  interval.time, interval.step = now, step
  metrics_log.write(json.dumps(record) + "\n")
  if tb is not None:
    tb.scalars(step, record)
  bar.set_postfix(postfix)


def norm_limit(table: np.ndarray, init_vectors: np.ndarray) -> float:
  """The vector norm above which a run has diverged (see MAX_NORM_FACTOR)."""
  return MAX_NORM_FACTOR * max(float(np.linalg.norm(table, axis=-1).max()),
                               float(np.linalg.norm(init_vectors, axis=-1).max()))


def check_sane(step: int, loss: float | None, norm: float, limit: float,
               ckpts: run_dir.Checkpoints) -> None:
  """Raises DivergedError if the loss is not finite or a vector's norm exceeds `limit`."""
  bad = [f"loss {loss}"] if loss is not None and not math.isfinite(loss) else []
  if not norm <= limit:  # also catches nan
    bad.append(f"largest vector norm {norm:.3g} (limit {limit:.3g})")
  if bad:
    last = ckpts.latest_step()
    kept = (f"the last finite checkpoint, step {last}, is kept" if last is not None
            else "no checkpoint was written")
    raise DivergedError(f"training diverged by step {step} ({', '.join(bad)}); {kept}. Lower "
                        "config.learning_rate or check the adam_* settings")


def save_checkpoint(ckpts: run_dir.Checkpoints, state, step: int, metadata: dict, config,
                    flag: StopFlag, limit: float) -> None:
  """Checks the replicated `state` is sane and saves it as checkpoint `step`."""
  host_state = parallel.unreplicate(state)
  norm = max(float(np.linalg.norm(np.asarray(v), axis=-1).max())
             for v in host_state.params.values())
  check_sane(step, None, norm, limit, ckpts)
  # With progressive_words, later vectors may not have entered training yet.
  active = train_lib.active_vectors(step, config.num_vectors, config.progressive_words)
  flag.saving = True  # a further signal waits for this write instead of cutting it short
  try:
    ckpts.save(step, {"state": host_state}, dict(metadata, step=step, active_vectors=int(active)))
  finally:
    flag.saving = False


def open_metrics_log(workdir: str, start: int, enabled: bool) -> fileio.LineLog:
  """metrics.jsonl, its records past `start` dropped (a killed run logged steps it redoes)."""
  path = fileio.join(workdir, "metrics.jsonl")
  try:
    return fileio.LineLog(path, enabled=enabled,
                          keep=lambda line: json.loads(line).get("step", 0) <= start)
  except (OSError, UnicodeDecodeError) as e:
    raise run_dir.WorkdirError(f"cannot open {path}: {console.one_line(e, limit=300)}") from None


class StopFlag:
  """Turns SIGINT/SIGTERM into a flag the loop checks at step boundaries.

  A second signal aborts without saving, except while a checkpoint is being
  written (`saving`): that write always completes, so no step is lost.
  """

  def __init__(self):
    self.signal: int | None = None
    self.saving = False

  def __call__(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.saving:
      _log(f"received {name} while writing a checkpoint: finishing the write first")
      if self.signal is None:
        self.signal = signum
      return
    if self.signal is not None:  # second signal: the user insists
      raise KeyboardInterrupt
    self.signal = signum
    _log(f"\nreceived {name}: saving a checkpoint after this step "
         "(press Ctrl-C again to abort without saving)")


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag):
  previous = {}
  for sig in (signal.SIGINT, signal.SIGTERM):
    try:
      previous[sig] = signal.signal(sig, flag)
    except ValueError:  # not the main thread (e.g. tests): no handler
      pass
  try:
    yield flag
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def progress_bar(start: int, total: int, enabled: bool):
  """The training steps' progress bar on stderr (from `start` of `total`; silent unless
  `enabled`: process 0 with progress on)."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
              disable=not enabled, file=sys.stderr)

