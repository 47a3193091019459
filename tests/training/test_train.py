"""Training: what changes, what does not, determinism across devices and restarts, bad input."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, config_module, offline_config, step_pieces

from ti_jax import errors
from ti_jax.data import choices, image_loader
from ti_jax.embeddings import pseudo_words
from ti_jax.runtime import parallel, run_dir
from ti_jax.sampling import noise_schedule
from ti_jax.training import train_lib, trainer
from ti_jax.weights.loading import load_stable_diffusion

TOY = os.path.join(REPO, "examples", "toy")


def _config(cache_dir, **overrides):
  object_config = config_module("object")
  return offline_config(object_config.get_config("tiny"), cache_dir, **{
      "train_data_dir": TOY, "max_train_steps": 4, "checkpointing_steps": 2,
      "log_every_steps": 1, "validation_prompt": "", **overrides})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def setup(tiny_sd15):
  """A tiny SD, placeholder tokens, cached latents and the step pieces (1 device)."""
  return step_pieces(tiny_sd15, 2)


def _batch(setup, step, size, seed=0):
  index = np.arange(size)
  view, tmpl = choices.example_choices(seed, step, index, global_batch_size=size,
                                    num_images=setup["num_images"], flip_p=0.5,
                                    num_templates=len(setup["template_ids"]))
  return {"input_ids": setup["template_ids"][tmpl], "view_index": view,
          "example_index": index.astype(np.int32)}


def _pieces(lr_value=5e-3):
  lr = optax.constant_schedule(lr_value)
  return lr, train_lib.make_optimizer(lr, 0.9, 0.999, 1e-8, 1e-2)


_STEPS = {}  # learning rate -> (pmapped one-device step, its optimizer), built once per module


def _one_device_step(setup, lr_value=5e-3, start_vectors=None):
  """(pmapped step, fresh replicated state, replicated frozen, optimizer) on one device.

  The step of a learning rate is built once and shared by the tests: each new step
  function is traced again and its program loaded again (seconds each)."""
  devices = jax.local_devices()[:1]
  if lr_value not in _STEPS:
    lr, opt = _pieces(lr_value)
    _STEPS[lr_value] = (train_lib.make_pmapped_step(setup["settings"], opt, lr, devices), opt)
  step_fn, opt = _STEPS[lr_value]
  vectors = setup["init"].vectors if start_vectors is None else start_vectors
  state = parallel.replicate(train_lib.init_state({"embeds": vectors}, opt), devices)
  frozen = parallel.replicate(setup["frozen"], devices)
  return step_fn, state, frozen, opt


def test_frozen_params_unchanged_and_only_placeholder_rows_differ(setup):
  step_fn, state, frozen, _ = _one_device_step(setup)
  for step in range(3):
    state, _ = step_fn(state, frozen, parallel.shard(_batch(setup, step, 2), 1))
  after = parallel.unreplicate(frozen)
  flat_before = jax.tree_util.tree_leaves(setup["frozen"])
  flat_after = jax.tree_util.tree_leaves(after)
  assert len(flat_before) == len(flat_after)
  for b, a in zip(flat_before, flat_after):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  learned = np.asarray(parallel.unreplicate(state).params["embeds"])
  assert not np.allclose(learned, setup["init"].vectors)
  # What the text encoder sees after training: every id of the vocabulary plus the
  # placeholders, looked up through the step's own splice. Only the placeholder
  # rows may differ from the frozen table, and they hold the learned vectors.
  table = np.asarray(setup["frozen"].text_encoders[0]["embeddings"]["token_embedding"]["embedding"])
  all_ids = np.arange(max(setup["ids"]) + 1, dtype=np.int32)[None]  # [1, V + n]
  looked_up = np.asarray(pseudo_words.embed_tokens(
      jnp.asarray(table), jnp.asarray(learned), jnp.asarray(setup["ids"], jnp.int32),
      jnp.asarray(all_ids)))[0]  # [V + n, D]
  changed = np.flatnonzero(np.any(looked_up[: table.shape[0]] != table, axis=1))
  assert changed.size == 0  # no row of the vocabulary moved
  np.testing.assert_array_equal(looked_up[setup["ids"]], learned)
  # merged_token_table (what export hands a diffusers user) agrees with that lookup.
  merged = pseudo_words.merged_token_table(table, learned, setup["ids"])
  np.testing.assert_array_equal(merged, looked_up)


def test_optimizer_keeps_no_state_for_frozen_leaves():
  lr, opt = _pieces()
  params = {"embeds": jnp.zeros((2, 8)), "frozen_table": jnp.zeros((1000, 8))}
  opt_state = opt.init(params)
  sizes = [x.size for x in jax.tree_util.tree_leaves(opt_state) if hasattr(x, "size")]
  # Adam's two moments for the [2, 8] vectors (+ a step count); nothing of the 1000-row table.
  assert max(sizes) == 16
  updates, _ = opt.update({"embeds": jnp.ones((2, 8)), "frozen_table": jnp.ones((1000, 8))},
                          opt_state, params)
  assert not np.any(np.asarray(updates["frozen_table"]))
  assert np.all(np.asarray(updates["embeds"]) != 0)


def test_step_flops_show_no_weight_gradient_work(setup):
  """Backward w.r.t. the context only: the step costs under 2.4x the forward pass (XLA count)."""
  step_fn, state, frozen, opt = _one_device_step(setup)
  # Batch 2: the program the other one-device step tests run, compiled once for all of them.
  batch = parallel.shard(_batch(setup, 0, 2), 1)
  step_flops = step_fn.lower(state, frozen, batch).compile().cost_analysis()["flops"]
  forward = jax.jit(lambda p, f, b: train_lib.loss_fn(p, f, b, 0, setup["settings"]))
  host_batch = jax.tree_util.tree_map(lambda x: x[0], batch)
  fwd_flops = forward.lower(train_lib.init_state({"embeds": setup["init"].vectors}, opt).params,
                            setup["frozen"], host_batch).compile().cost_analysis()["flops"]
  ratio = step_flops / fwd_flops
  print(f"step/forward FLOPs ratio: {ratio:.2f} ({step_flops:.3g} / {fwd_flops:.3g})")
  assert ratio < 2.4, ratio


def test_v_prediction_target_matches_diffusers_get_velocity(tiny_sd21):
  torch = pytest.importorskip("torch")
  from diffusers import DDPMScheduler
  sd = load_stable_diffusion(tiny_sd21)
  assert sd.scheduler_config["prediction_type"] == "v_prediction"
  schedule = noise_schedule.noise_schedule_from_config(sd.scheduler_config)
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
  noise = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
  t = np.array([1, 500, 999])
  ref = DDPMScheduler.from_config(sd.scheduler_config).get_velocity(
      torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  np.testing.assert_allclose(
      np.asarray(noise_schedule.training_target(schedule, x0, noise, t)), ref,
      rtol=1e-5, atol=1e-6)


def test_loss_decreases_on_learnable_case(setup):
  """From a far-off start, 40 steps lower the loss on a fixed evaluation set of examples."""
  start = np.random.default_rng(1).standard_normal(setup["init"].vectors.shape).astype(np.float32)
  step_fn, state, frozen, _ = _one_device_step(setup, 2e-2, start)
  # One compiled forward (the step an argument, the frozen weights arguments rather than
  # constants of the program), run on each of the 4 evaluation batches.
  loss = jax.jit(train_lib.loss_fn, static_argnums=4)
  eval_loss = lambda p: np.mean([
      loss(p, setup["frozen"], _batch(setup, 10_000 + i, 8), 10_000 + i, setup["settings"])
      for i in range(4)])
  before = float(eval_loss({"embeds": jnp.asarray(start)}))
  for step in range(40):
    state, _ = step_fn(state, frozen, parallel.shard(_batch(setup, step, 8), 1))
  after = float(eval_loss(parallel.unreplicate(state).params))
  print(f"eval loss {before:.4f} -> {after:.4f}")
  assert after < before * 0.97, (before, after)


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory, cache_dir):
  """(workdir, result) of a 4-step run at global batch 8 on one device, with a checkpoint
  after every step (all kept): its step-1 vectors are those of a 1-step run. Read it only."""
  workdir = str(tmp_path_factory.mktemp("one") / "run")
  result = trainer.run(_config(cache_dir, train_batch_size=8, checkpointing_steps=1,
                               checkpoints_total_limit=4), workdir,
                       devices=jax.local_devices()[:1], progress=False)
  return workdir, result


def test_eight_devices_equal_one_device(tmp_path, cache_dir, one_device_run):
  assert jax.local_device_count() >= 8, "conftest sets 8 fake CPU devices"
  one_dir, one = one_device_run
  # The same global batch, set once for any device count (train_batch_size is then ignored).
  eight = trainer.run(_config(cache_dir, train_batch_size=3, global_batch_size=8),
                    str(tmp_path / "eight"), devices=jax.local_devices()[:8], progress=False)
  # Same examples and noise; only the order of float sums differs.
  np.testing.assert_allclose(eight["embeds"], one["embeds"], rtol=0, atol=1e-5)
  initial, _ = run_dir.learned_from_workdir(one_dir, step=1)
  assert np.abs(initial - one["embeds"]).max() > 1e-3  # training moved the vectors


def _cli(workdir, cache_dir, *extra):
  return [sys.executable, "-m", "ti_jax.train", "--config", os.path.join(REPO, "configs/object.py:tiny"),
          "--workdir", str(workdir), f"--config.cache_dir={cache_dir}",
          f"--config.train_data_dir={TOY}", "--config.validation_prompt=",
          f"--config.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}", *extra]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, cache_dir):
  common = ("--config.max_train_steps=12", "--config.checkpointing_steps=3")
  full = subprocess.run(_cli(tmp_path / "full", cache_dir, *common), capture_output=True,
                        text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-2000:]
  killed_dir = tmp_path / "killed"
  proc = subprocess.Popen(_cli(killed_dir, cache_dir, *common, "--config.log_every_steps=1"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = killed_dir / "checkpoints" / "6"
  deadline = time.time() + 300
  while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.kill()  # SIGKILL: no chance to save anything
  proc.wait()
  steps = run_dir.Checkpoints(str(killed_dir)).all_steps()
  assert steps and max(steps) < 12, steps
  resumed = subprocess.run(_cli(killed_dir, cache_dir, *common), capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from step" in resumed.stderr
  logged = [json.loads(l)["step"] for l in (killed_dir / "metrics.jsonl").read_text().splitlines()]
  assert logged == sorted(set(logged)) and logged[-1] == 12  # steps redone after the kill logged once
  from ti_jax.weights import safetensors_io
  a = safetensors_io.load(str(tmp_path / "full" / "learned_embeds.safetensors"))["<toy>"]
  b = safetensors_io.load(str(killed_dir / "learned_embeds.safetensors"))["<toy>"]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, cache_dir):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(_cli(workdir, cache_dir, "--config.max_train_steps=100000",
                               "--config.checkpointing_steps=100000"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and metrics.read_text().count("\n") >= 2:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-2000:]
  assert "checkpoint saved" in err and "Traceback" not in err
  steps = run_dir.Checkpoints(str(workdir)).all_steps()
  assert steps and 0 < steps[-1] < 100000
  meta = run_dir.Checkpoints(str(workdir)).restore_metadata(steps[-1])
  assert meta["placeholder_tokens"] == ["<toy>"] and meta["step"] == steps[-1]


@pytest.mark.parametrize("override, needle", [
    ({"placeholder_token": "toy"}, "already in the tokenizer's vocabulary"),
    ({"pretrained_model_name_or_path": "/no/such/model"}, "model folder not found"),
    ({"train_data_dir": "/no/such/images"}, "does not exist"),
    ({"learnable_property": "texture"}, "learnable_property"),
    ({"resolution": 60}, "multiple of 8"),
    ({"checkpoints_total_limit": 0}, "checkpoints_total_limit must be >= 1"),
    ({"validation_prompt": "a {}", "validation_scheduler": "heun"}, "validation_scheduler"),
    ({"validation_prompt": "a {}", "num_validation_images": 0}, "num_validation_images"),
    ({"attention_impl": "flash"}, "attention_impl"),
    ({"attention_impl": "pallas_tpu"}, "needs TPU devices"),
    ({"placeholder_token": "Toy"}, "already in the tokenizer's vocabulary"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number"),
    ({"adam_beta1": float("nan")}, "adam_beta1 must be a finite number"),
    ({"adam_beta2": 1.0}, "adam_beta2 must be in [0, 1)"),
    ({"num_vectors": 1000}, "at most 75 fit"),
    ({"num_vectors": 70}, "leaving room for at most 68 vectors"),  # the templates' exact limit
    ({"resolution": 10016}, "above the limit of 2048 px"),
    ({"pretrained_model_name_or_path": "tiny-flux"}, "cannot train with it yet"),
])
def test_bad_input_is_one_line_error(tmp_path, cache_dir, override, needle):
  with pytest.raises(errors.UserError) as err:
    trainer.run(_config(cache_dir, **override), str(tmp_path / "w"), progress=False)
  assert needle in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "w" / "run.json").exists()  # a failed start claims nothing


def test_workdir_of_another_concept_is_refused_and_kept(cache_dir, one_device_run):
  workdir = pathlib.Path(one_device_run[0])  # the shared run: the refusal must leave it as it is
  before = (workdir / "run.json").read_text()
  with pytest.raises(run_dir.WorkdirError, match="holds another run"):
    trainer.run(_config(cache_dir, placeholder_token="<other>"), str(workdir), progress=False)
  assert (workdir / "run.json").read_text() == before
  assert run_dir.Checkpoints(str(workdir)).all_steps() == [1, 2, 3, 4]


def test_run_leaves_jax_config_alone_and_the_cli_turns_the_cache_on(tmp_path, cache_dir):
  """config.compilation_cache_dir is the entry point's business: `run` (here one that fails
  at start-up) does not touch jax.config; `python -m ti_jax.train` fills that cache."""
  before = jax.config.jax_compilation_cache_dir
  other = tmp_path / "other-xla"
  with pytest.raises(image_loader.DataError):
    trainer.run(_config(cache_dir, compilation_cache_dir=str(other),
                        train_data_dir=str(tmp_path / "missing")), str(tmp_path / "w"),
                progress=False)
  assert jax.config.jax_compilation_cache_dir == before and not other.exists()
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  cmd = [c for c in _cli(tmp_path / "cli", cache_dir, "--config.max_train_steps=1")
         if not c.startswith("--config.compilation_cache_dir=")]
  out = subprocess.run(cmd + [f"--config.compilation_cache_dir={other}"], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert other.is_dir() and os.listdir(other)  # the step's program, cached by the CLI


def test_cli_unknown_config_field_is_one_line(tmp_path, cache_dir):
  out = subprocess.run(_cli(tmp_path / "w", cache_dir, "--config.no_such_field=1"),
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "error: unknown config field no_such_field" in out.stderr
  assert "Traceback" not in out.stderr


def test_final_outputs_are_written(tmp_path, cache_dir):
  workdir = tmp_path / "w"
  result = trainer.run(_config(cache_dir, max_train_steps=3, validation_prompt="a photo of {}",
                             validation_steps=3, num_validation_images=2,
                             validation_inference_steps=2), str(workdir), progress=False)
  from ti_jax.weights import safetensors_io
  saved = safetensors_io.load(str(workdir / "learned_embeds.safetensors"))
  np.testing.assert_array_equal(np.asarray(saved["<toy>"]), result["embeds"])
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3]
  assert all({"loss", "lr"} <= set(l) for l in lines)
  # Step 1 only compiled: it carries no timing rather than a meaningless one.
  assert "step_time_s" not in lines[0]
  assert all({"step_time_s", "images_per_sec"} <= set(l) for l in lines[1:])
  pngs = sorted(os.listdir(workdir / "validation"))
  assert pngs == ["step000003_0.png", "step000003_1.png"]


def test_train_step_compiles_once_over_many_steps(setup):
  """No recompilation after the first step: the backend compiles nothing on later steps."""
  import jax.monitoring
  step_fn, state, frozen, _ = _one_device_step(setup)
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.jit(lambda x: x * 1.2345 + 6.789)(jnp.ones(7)).block_until_ready()
    assert compiles, "the compile listener sees compilations"
    state, metrics = step_fn(state, frozen, parallel.shard(_batch(setup, 0, 2), 1))
    jax.block_until_ready(metrics)
    first = len(compiles)
    for step in range(1, 6):
      state, metrics = step_fn(state, frozen, parallel.shard(_batch(setup, step, 2), 1))
    jax.block_until_ready(metrics)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(compiles) == first, f"{len(compiles) - first} recompilation(s) after step 1"


def test_embedding_regulariser_adds_its_exact_gradient(setup):
  """embedding_reg_weight w adds w * mean_i ||v_i - init_i||^2, whose gradient is 2w(v - init)/n."""
  batch = _batch(setup, 0, 2)
  init = setup["init"].vectors
  vectors = init + 0.1 * np.random.default_rng(2).standard_normal(init.shape).astype(np.float32)
  params = {"embeds": jnp.asarray(vectors)}
  settings = dataclasses.replace(setup["settings"], embedding_reg_weight=0.5)
  # Compiled once, the initial vectors an argument: started at `vectors` themselves the pull
  # is zero, so the difference of the two gradients is the regulariser's alone. (The UNet's
  # backward run op by op takes most of a minute on CPU.)
  grad_fn = jax.jit(jax.grad(train_lib.loss_fn), static_argnums=4)
  grad = lambda start: grad_fn(params, dataclasses.replace(setup["frozen"], init_embeds=(start,)),
                               batch, 0, settings)["embeds"]
  expected = 2 * 0.5 * (vectors - init) / vectors.shape[0]
  np.testing.assert_allclose(np.asarray(grad(init) - grad(vectors)), expected, rtol=1e-4,
                             atol=1e-6)


def test_progressive_words_adds_one_trained_vector_every_n_steps(tmp_path, cache_dir):
  """progressive_words=2 with 3 vectors: vector i starts moving at step 2i, not before."""
  assert [train_lib.active_vectors(s, 3, 2) for s in range(7)] == [1, 1, 2, 2, 3, 3, 3]
  # One 4-step run, checkpointed and validated at step 2: its step-2 vectors are a 2-step run's
  # (the rate is constant), its step-2 image the one a 2-step run writes at its end.
  result = trainer.run(_config(cache_dir, num_vectors=3, progressive_words=2, max_train_steps=4,
                               checkpointing_steps=2, validation_prompt="a photo of {}",
                               validation_steps=2, num_validation_images=1,
                               validation_inference_steps=2),
                       str(tmp_path / "run"), devices=jax.local_devices()[:1], progress=False)
  sd = load_stable_diffusion("tiny-sd15", cache_dir=str(cache_dir))
  table = np.asarray(sd.text_encoder_params["embeddings"]["token_embedding"]["embedding"])
  init = pseudo_words.initializer_vectors(sd.tokenizer, table, "toy", 3).vectors
  ckpts = run_dir.Checkpoints(str(tmp_path / "run"), max_to_keep=None)
  try:  # every vector, the inactive ones too (learned_from_workdir gives the active ones)
    at_step_2 = np.asarray(ckpts.restore_untyped(2)[0]["state"]["params"]["embeds"])
  finally:
    ckpts.close()
  moved = {steps: np.abs(vectors - init).max(axis=1) > 0
           for steps, vectors in ((2, at_step_2), (4, result["embeds"]))}
  assert moved[2].tolist() == [True, False, False]
  assert moved[4].tolist() == [True, True, False]
  # The validation prompt names the active vectors only, as the training prompts do.
  from PIL import Image
  with Image.open(tmp_path / "run" / "validation" / "step000002_0.png") as png:
    assert png.text["prompt"] == "a photo of <toy> <toy>_1"


def test_remat_unet_gives_the_same_gradient_and_recomputes(setup):
  """config.remat: the same gradient; XLA's FLOP count shows the recomputed forward."""
  plain = setup["settings"]
  settings = dataclasses.replace(plain, unet=plain.unet.clone(remat=True))
  params = {"embeds": jnp.asarray(setup["init"].vectors)}
  batch = _batch(setup, 0, 2)
  compile_grad = lambda s: jax.jit(jax.grad(train_lib.loss_fn), static_argnums=4).lower(
      params, setup["frozen"], batch, 0, s).compile()
  compiled = {"plain": compile_grad(plain), "remat": compile_grad(settings)}
  cost = lambda c: c.cost_analysis()[0] if isinstance(c.cost_analysis(), list) else c.cost_analysis()
  flops = {k: cost(c)["flops"] for k, c in compiled.items()}
  assert flops["remat"] > 1.1 * flops["plain"], flops
  grads = {k: c(params, setup["frozen"], batch, 0)["embeds"] for k, c in compiled.items()}
  np.testing.assert_allclose(np.asarray(grads["remat"]), np.asarray(grads["plain"]),
                             rtol=1e-5, atol=1e-7)
