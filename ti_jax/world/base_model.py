"""Trains `tiny-world`: a small Stable Diffusion (KL VAE, CLIP text encoder, UNet) on the world.

Everything is ti_jax's own modules (`ti_jax.weights.pipeline.build_modules`
from diffusers-format configs), trained from scratch in three phases, each
resumable from its own checkpoint in the workdir:

1. checker: the attribute classifier of `ti_jax.world.checker`;
2. vae: the KL autoencoder, 32x32x3 -> 16x16x4, on fresh renders each step
   (mean squared error + a small KL term); afterwards the latent scaling factor
   is set to 1 / std of the latents, as Stable Diffusion's was;
3. diffusion: the UNet and the text encoder jointly, on the epsilon loss over
   VAE latents of a fixed set of captioned renders (encoded once with the
   frozen VAE), each caption replaced by the empty one 10% of the time so that
   classifier-free guidance works. An EMA of the weights is what is written.

All randomness is a function of (seed, phase, step), drawn on the host, so
results do not depend on the number of devices and a killed run resumes to the
same result. The step is pmapped (`ti_jax.runtime.parallel`). The result is a
diffusers-format folder (`StableDiffusionPipeline.from_pretrained` loads it)
with the checker files and a TRAINING.md beside the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ti_jax import errors
from ti_jax.runtime import parallel
from ti_jax.sampling import generation, noise_schedule
from ti_jax.training import train_lib
from ti_jax.weights import loading, pipeline, presets, tiny_models
from ti_jax.world import checker as checker_lib
from ti_jax.world import scenes
from ti_jax.world import tokenizer as world_tokenizer

PRESET = "tiny-world"
CAPTION_DROPOUT = 0.1  # share of captions replaced by "" (classifier-free guidance)
_KL_WEIGHT = 1e-6  # per latent element, against the per-pixel squared error
LATENT_SIZE = scenes.IMAGE_SIZE // 2  # the VAE downsamples once: 32x32x3 -> 16x16x4
# Min-SNR-gamma weighting of the epsilon loss (Hang et al. 2023): it moves the loss's weight
# from the nearly clean timesteps to the noisy ones, where the shape is decided.
SNR_GAMMA = 5.0


class WorldTrainingError(errors.UserError):
  """A tiny-world run cannot start (another run's workdir, a batch that does not split)."""


def model_configs(vocab_size: int, extra_tokens: int = 0) -> dict[str, dict]:
  """The `tiny-world` component configs (diffusers / transformers `config.json` fields).

  A KL VAE 32x32x3 -> 16x16x4 (one downsampling), a 2-layer CLIP text encoder
  64 wide reading 24-token prompts, and a 3-level UNet (32, 64 and 64 channels;
  cross-attention at the 8x8 and 4x4 levels) on the 16x16 latents, with SD
  1.x's noise schedule and DDIM sampling. About 1.7M UNet parameters: a few MB
  of float32.

  Why 16x16 latents: in 8x8 ones (Stable Diffusion's 8x downsampling would give
  4x4) a small shape covers 3x3 latent pixels and which shape it is lives in
  the channel values; a base model trained for the same time learnt colours
  and backgrounds but not shapes.

  `vocab_size` is the world tokenizer's; `extra_tokens` rows more are the
  training-only `scenes.HIDDEN_TOKENS` (ids after the tokenizer's specials).
  """
  base = presets.preset("sd15")
  configs = {
      "unet": dict(
          base["unet"], sample_size=LATENT_SIZE, block_out_channels=[32, 64, 64],
          layers_per_block=1,
          down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
          up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
          norm_num_groups=16, cross_attention_dim=64, attention_head_dim=2),
      "vae": dict(
          base["vae"], block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=16,
          down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
          sample_size=scenes.IMAGE_SIZE, scaling_factor=1.0),
      "text_encoder": dict(
          base["text_encoder"], vocab_size=vocab_size + extra_tokens, hidden_size=64, intermediate_size=256,
          num_hidden_layers=2, num_attention_heads=4, projection_dim=64,
          max_position_embeddings=world_tokenizer.MAX_LENGTH,
          # The world tokenizer's specials are its last two ids; pad is eos, as in SD 1.x.
          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
      "scheduler": dict(presets.preset("sd21")["scheduler"], prediction_type="epsilon"),
  }
  return copy.deepcopy(configs)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a `tiny-world` training run does (every field is part of its identity)."""
  seed: int = 0
  steps: int = 16000  # diffusion steps (may grow when resuming: the rate is constant)
  vae_steps: int = 800
  checker_steps: int = 2500
  batch_size: int = 64  # global, diffusion
  vae_batch_size: int = 32
  num_images: int = 20000  # captioned renders the diffusion phase trains on
  learning_rate: float = 3e-4
  vae_learning_rate: float = 1e-3
  warmup_steps: int = 200
  ema_decay: float = 0.999
  checkpoint_every: int = 500
  log_every: int = 50
  # Train on captions naming the held-out shape and style by `scenes.HIDDEN_TOKENS`
  # (dropped from the written model); False: they are never named at all.
  hidden_names: bool = True


# The settings the VAE phase depends on (its checkpoint's identity).
_VAE_FIELDS = ("seed", "vae_steps", "vae_batch_size", "vae_learning_rate", "warmup_steps")


# ---------------------------------------------------------------------------
# Checkpoints: one msgpack file per phase, written atomically.
# ---------------------------------------------------------------------------


def _save_state(path: str, state: Any, identity: dict) -> None:
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(
        {"identity": json.dumps(identity, sort_keys=True),
         "state": flax.serialization.to_state_dict(jax.device_get(state))}))
  os.replace(tmp, path)


def _restore_state(path: str, template: Any, identity: dict) -> Any | None:
  """The state saved at `path` if it exists and belongs to a run of the same identity."""
  if not os.path.isfile(path):
    return None
  with open(path, "rb") as f:
    saved = flax.serialization.msgpack_restore(f.read())
  if saved["identity"] != json.dumps(identity, sort_keys=True):
    raise WorldTrainingError(f"{path} belongs to another tiny-world run (other settings); "
                             "use a new --workdir")
  return flax.serialization.from_state_dict(template, saved["state"])


def _progress_bar(start: int, total: int, desc: str, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True,
              disable=not enabled, file=sys.stderr)


def _append_metrics(workdir: str, record: dict) -> None:
  with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")


def _loop(workdir: str, phase: str, state: Any, start: int, total: int, settings: Settings,
          identity: dict, ckpt: str, step_fn: Callable[[Any, int], tuple[Any, dict]],
          progress: bool) -> tuple[Any, dict]:
  """Runs `step_fn(state, step)` from `start` to `total`: logs, checkpoints, a progress bar."""
  bar = _progress_bar(start, total, phase, progress)
  metrics: dict = {}
  t0 = time.time()
  try:
    for step in range(start, total):
      state, metrics = step_fn(state, step)
      if (step + 1) % settings.log_every == 0 or step + 1 == total:
        metrics = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
        if not all(np.isfinite(v) for v in metrics.values()):
          raise FloatingPointError(f"{phase} step {step + 1}: non-finite metrics {metrics}")
        _append_metrics(workdir, {"phase": phase, "step": step + 1,
                                  "seconds": round(time.time() - t0, 1), **metrics})
        bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})
      if (step + 1) % settings.checkpoint_every == 0 or step + 1 == total:
        _save_state(ckpt, {"step": step + 1, "state": parallel.unreplicate(state)}, identity)
      bar.update(1)
  finally:
    bar.close()
  metrics = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
  return state, metrics or _last_logged(workdir, phase)


def _last_logged(workdir: str, phase: str) -> dict:
  """The metrics of `phase`'s last metrics.jsonl line (a resumed phase with no step left to run)."""
  last: dict = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        record = json.loads(line)
        if record.get("phase") == phase:
          last = {k: v for k, v in record.items() if k not in ("phase", "step", "seconds")}
  return last


# ---------------------------------------------------------------------------
# Phase 2: the autoencoder.
# ---------------------------------------------------------------------------


def _vae_step(vae, tx):
  """The pmapped VAE step: `(state, images [b,32,32,3], eps [b,16,16,4]) -> (state, metrics)`."""
  def step(state, images, eps):
    def loss_fn(params):
      mean, logvar = vae.apply({"params": params}, images, method=vae.encode)  # [b, 16, 16, 4]
      z = mean + jnp.exp(0.5 * logvar) * eps
      recon = vae.apply({"params": params}, z, method=vae.decode)  # [b, 32, 32, 3]
      mse = jnp.mean((recon - images) ** 2)
      kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
      return mse + _KL_WEIGHT * kl, {"mse": mse, "kl": kl}
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state["params"])
    grads, metrics = parallel.pmean((grads, metrics))
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, metrics
  return step


# The pmapped steps (and the VAE's encoder) by everything they are built from, as
# `checker._APPLY_CACHE`: a process that trains several times with the same settings
# (a resumed run, the tests) traces each program and loads it from the compilation
# cache once, not once per run. The values are pure functions of their keys.
_PROGRAM_CACHE: dict[tuple, Any] = {}


def _cached_program(key: tuple, build: Callable[[], Any]) -> Any:
  if key not in _PROGRAM_CACHE:
    _PROGRAM_CACHE[key] = build()
  return _PROGRAM_CACHE[key]


def _compiled_vae_step(vae, learning_rate: float, warmup_steps: int, vae_steps: int,
                       devices: tuple) -> tuple[optax.GradientTransformation, Callable]:
  """The VAE phase's optimizer and its pmapped step over `devices` (`_vae_step`)."""
  def build():
    tx = optax.adam(optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, min(warmup_steps, vae_steps // 2), vae_steps, learning_rate * 0.1))
    return tx, parallel.pmapped(_vae_step(vae, tx), devices, donate_argnums=(0,))
  return _cached_program(("vae_step", vae, learning_rate, warmup_steps, vae_steps, devices),
                         build)


def train_vae(workdir: str, modules: dict, params: Any, settings: Settings, identity: dict,
              devices: list, progress: bool) -> tuple[Any, dict]:
  """Trains (or resumes) the VAE; returns its params and the last metrics."""
  tx, step = _compiled_vae_step(modules["vae"], settings.vae_learning_rate,
                                settings.warmup_steps, settings.vae_steps, tuple(devices))
  host = {"params": params, "opt": tx.init(params)}
  ckpt = os.path.join(workdir, "vae.ckpt")
  saved = _restore_state(ckpt, {"step": 0, "state": host}, identity)
  start = 0
  if saved is not None:
    start, host = int(saved["step"]), saved["state"]
  n = len(devices)
  latent = LATENT_SIZE

  def run_step(state, i):
    images, _, _ = scenes.batch(settings.seed, i * settings.vae_batch_size, settings.vae_batch_size)
    eps = np.random.default_rng([settings.seed, 2, i]).standard_normal(
        (settings.vae_batch_size, latent, latent, 4), dtype=np.float32)
    x = images.astype(np.float32) / 127.5 - 1.0
    return step(state, *parallel.shard((x, eps), n))

  state = parallel.replicate(host, devices)
  state, metrics = _loop(workdir, "vae", state, start, settings.vae_steps, settings, identity,
                         ckpt, run_step, progress)
  return parallel.unreplicate(state)["params"], metrics


def encode_dataset(vae, vae_params: Any, settings: Settings,
                   chunk: int = 500) -> tuple[np.ndarray, list[str]]:
  """The posterior means [N, 16, 16, 4] (unscaled) and captions of the diffusion phase's renders.

  Scenes `10**9 ..` of the world seed: apart from the VAE's stream, which starts at 0.
  The captions are the training ones (`scenes.caption(hidden=settings.hidden_names)`).
  """
  encode = _cached_program(("encode", vae), lambda: jax.jit(
      lambda p, x: vae.apply({"params": p}, x, method=vae.encode)[0]))
  means, captions = [], []
  for start in range(0, settings.num_images, chunk):
    count = min(chunk, settings.num_images - start)
    images, texts, _ = scenes.batch(settings.seed, 10**9 + start, count,
                                    hidden=settings.hidden_names)
    means.append(np.asarray(encode(vae_params, images.astype(np.float32) / 127.5 - 1.0)))
    captions.extend(texts)
  return np.concatenate(means), captions


# ---------------------------------------------------------------------------
# Phase 3: the UNet and the text encoder.
# ---------------------------------------------------------------------------


def _diffusion_step(unet, text_encoder, tx, schedule, ema_decay: float):
  """The pmapped step: `(state, latents, ids, t, noise) -> (state, metrics)`.

  latents [b, 16, 16, 4] (scaled), ids [b, 24] (captions already dropped), t [b], noise like
  latents. The loss is min-SNR-weighted (`SNR_GAMMA`).
  """
  def step(state, latents, ids, t, noise):
    def loss_fn(params):
      context = text_encoder.apply({"params": params["text_encoder"]}, ids)  # [b, 24, 64]
      noisy = noise_schedule.add_noise(schedule, latents, noise, t)
      pred = unet.apply({"params": params["unet"]}, noisy, t, context)  # [b, 16, 16, 4]
      per_example = jnp.mean((pred - noise) ** 2, axis=(1, 2, 3))  # [b]
      return jnp.mean(train_lib.min_snr_weights(schedule, t, SNR_GAMMA) * per_example)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    loss, grads = parallel.pmean((loss, grads))
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                                 state["ema"], params)
    return {"params": params, "opt": opt, "ema": ema}, {"loss": loss}
  return step


def tokenize(tok, captions: list[str]) -> np.ndarray:
  """int32 [N, 24] token ids, padded with eos as Stable Diffusion's pipeline does."""
  return np.asarray(tok(captions, padding="max_length", max_length=tok.model_max_length,
                        truncation=True).input_ids, np.int32)


def _compiled_diffusion_step(unet, text_encoder, scheduler_config: dict, learning_rate: float,
                             warmup_steps: int, ema_decay: float, devices: tuple) -> tuple:
  """The diffusion phase's noise schedule, optimizer and pmapped step over `devices`."""
  def build():
    schedule = noise_schedule.noise_schedule_from_config(scheduler_config)
    # Warmup, then a constant rate (the EMA does the averaging, as in DDPM): no step
    # depends on the total, so a run resumed with a larger --steps continues exactly
    # as a run started with it would have.
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.linear_schedule(0.0, learning_rate, warmup_steps), weight_decay=1e-4))
    step = parallel.pmapped(_diffusion_step(unet, text_encoder, tx, schedule, ema_decay),
                            devices, donate_argnums=(0,))
    return schedule, tx, step
  return _cached_program(("diffusion_step", unet, text_encoder,
                          json.dumps(scheduler_config, sort_keys=True), learning_rate,
                          warmup_steps, ema_decay, devices), build)


def train_diffusion(workdir: str, modules: dict, params: Any, latents: np.ndarray,
                    ids: np.ndarray, empty_ids: np.ndarray, scheduler_config: dict,
                    settings: Settings, identity: dict, devices: list,
                    progress: bool) -> tuple[Any, dict]:
  """Trains (or resumes) the UNet and text encoder; returns the EMA params and last metrics."""
  schedule, tx, step = _compiled_diffusion_step(
      modules["unet"], modules["text_encoder"], scheduler_config, settings.learning_rate,
      settings.warmup_steps, settings.ema_decay, tuple(devices))
  host = {"params": params, "opt": tx.init(params), "ema": params}
  ckpt = os.path.join(workdir, "diffusion.ckpt")
  saved = _restore_state(ckpt, {"step": 0, "state": host}, identity)
  start = 0
  if saved is not None:
    start, host = int(saved["step"]), saved["state"]
  if start > settings.steps:
    raise WorldTrainingError(f"{ckpt} is at step {start}, past --steps {settings.steps}; "
                             f"pass --steps {start} or more")
  n, b = len(devices), settings.batch_size

  def run_step(state, i):
    rng = np.random.default_rng([settings.seed, 3, i])
    idx = rng.integers(0, len(latents), b)
    drop = rng.random(b) < CAPTION_DROPOUT
    batch_ids = np.where(drop[:, None], empty_ids[None], ids[idx])  # [b, 24]
    t = rng.integers(0, schedule.num_train_timesteps, b).astype(np.int32)
    noise = rng.standard_normal(latents[idx].shape, dtype=np.float32)
    return step(state, *parallel.shard((latents[idx], batch_ids, t, noise), n))

  state = parallel.replicate(host, devices)
  state, metrics = _loop(workdir, "diffusion", state, start, settings.steps, settings, identity,
                         ckpt, run_step, progress)
  return parallel.unreplicate(state)["ema"], metrics


# ---------------------------------------------------------------------------
# The whole run.
# ---------------------------------------------------------------------------


def _init_params(modules: dict, seed: int) -> dict:
  """LeCun-normal kernels (flax's default), drawn with numpy: no XLA compile of `init`."""
  shapes = pipeline.param_shapes(modules)
  rng = np.random.default_rng([seed, 1])
  return {name: tiny_models.random_params(shapes[name], rng) for name in sorted(shapes)}


def train_world(workdir: str, out_dir: str | None = None, settings: Settings = Settings(),
                num_devices: int | None = None, progress: bool = True,
                command: str = "") -> dict:
  """Trains `tiny-world` in `workdir` (resuming what is there) and writes its model folder.

  Args:
    workdir: checkpoints, metrics.jsonl and the checker of the run.
    out_dir: the diffusers folder to write (default: `workdir/tiny-world`).
    settings: the run's sizes, seed and schedule.
    num_devices: local devices to shard over (default: all).
    progress: show progress bars.
    command: the command line, recorded in TRAINING.md.

  Returns:
    {"out_dir", "checker_accuracy", "vae", "diffusion" (last metrics), "seconds"}.
  """
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  out_dir = out_dir or os.path.join(workdir, PRESET)
  identity = dataclasses.asdict(settings)
  # Not part of what a step computes: a run can be resumed with more steps.
  for key in ("checkpoint_every", "log_every", "steps"):
    identity.pop(key)
  # The VAE's checkpoint depends on its own fields only: a run with more or fewer
  # diffusion steps (or images) resumes with the trained VAE.
  vae_identity = {k: identity[k] for k in _VAE_FIELDS}
  devices = parallel.local_devices(num_devices)
  for b in (settings.batch_size, settings.vae_batch_size):
    if b % len(devices):
      raise WorldTrainingError(f"batch size {b} does not split over {len(devices)} devices")

  # 1. The checker (seconds to minutes), kept in the workdir once trained.
  checker_dir = os.path.join(workdir, "checker")
  try:
    checker = checker_lib.load(checker_dir)
    if checker.info["train"]["steps"] != settings.checker_steps:
      raise checker_lib.CheckerError("trained with other settings")
  except checker_lib.CheckerError:
    checker = checker_lib.train_checker(seed=settings.seed, steps=settings.checker_steps)
    checker_lib.save(checker, checker_dir)
  accuracy = checker_lib.accuracy(checker, seed=settings.seed + 7_000_001)

  tok, vocab_size = training_tokenizer(settings.hidden_names)
  extra = len(tok) - vocab_size
  configs = model_configs(vocab_size, extra)
  modules = pipeline.build_modules(configs)
  params = _init_params(modules, settings.seed)

  # 2. The VAE, then its latent scale.
  vae_params, vae_metrics = train_vae(workdir, modules, params["vae"], settings, vae_identity,
                                      devices, progress)
  means, captions = encode_dataset(modules["vae"], vae_params, settings)
  scaling = float(1.0 / means.std())
  configs["vae"]["scaling_factor"] = scaling

  # 3. The UNet and the text encoder on scaled latents.
  ids, empty_ids = tokenize(tok, captions), tokenize(tok, [""])[0]
  trained, diffusion_metrics = train_diffusion(
      workdir, modules, {"unet": params["unet"], "text_encoder": params["text_encoder"]},
      means * scaling, ids, empty_ids, configs["scheduler"], settings, identity, devices,
      progress)

  seconds = time.time() - t0
  final = {"vae": vae_metrics, "diffusion": diffusion_metrics}
  # The written model has no word for the held-out shape and style: cut their rows.
  configs["text_encoder"]["vocab_size"] = vocab_size
  trained["text_encoder"] = drop_hidden_rows(trained["text_encoder"], vocab_size)
  write_folder(out_dir, configs, {"vae": vae_params, **trained}, checker_dir,
               training_md(settings, command, final, accuracy, scaling, seconds))
  return {"out_dir": out_dir, "checker_accuracy": accuracy, **final, "seconds": seconds}


def training_tokenizer(hidden_names: bool = True):
  """The world tokenizer the diffusion phase reads captions with, and the shipped vocab size.

  With `hidden_names`, `scenes.HIDDEN_TOKENS` are added after its specials
  (ids vocab_size, vocab_size + 1, ...), each one token.
  """
  with tempfile.TemporaryDirectory() as tmp:
    vocab_size = world_tokenizer.write_world_tokenizer(tmp)
    tok = loading.load_tokenizer(tmp, subfolder="")
  if hidden_names:
    tok.add_tokens(list(scenes.HIDDEN_TOKENS.values()))
  return tok, vocab_size


def drop_hidden_rows(text_encoder_params: dict, vocab_size: int) -> dict:
  """The text encoder's params with the token embedding cut to the shipped `vocab_size` rows."""
  emb = text_encoder_params["embeddings"]
  table = emb["token_embedding"]["embedding"]  # [vocab_size + hidden, 64]
  return {**text_encoder_params,
          "embeddings": {**emb, "token_embedding": {"embedding": table[:vocab_size]}}}


def write_folder(out_dir: str, configs: dict, params: dict, checker_dir: str,
                 training_notes: str) -> None:
  """Writes the diffusers folder, the checker files and TRAINING.md (replacing `out_dir`)."""
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tiny-world-", dir=parent)
  try:
    tiny_models.write_model_folder(tmp, configs, params, world_tokenizer.write_world_tokenizer)
    for name in (checker_lib.WEIGHTS_FILE, checker_lib.CONFIG_FILE):
      shutil.copy(os.path.join(checker_dir, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, "TRAINING.md"), "w", encoding="utf-8") as f:
      f.write(training_notes)
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def training_md(settings: Settings, command: str, final: dict, accuracy: dict, scaling: float,
                seconds: float) -> str:
  """TRAINING.md: how the folder was made and what the training ended at."""
  lines = [
      f"# {PRESET}: how this model was trained", "",
      ("A tiny Stable Diffusion (KL VAE 32x32x3 -> 16x16x4, 2-layer CLIP text encoder, "
      "3-level UNet) trained from scratch on the procedural world of `ti_jax.world.scenes`, "
      "by `ti_jax/world/base_model.py`."), "",
      "```", command or "python -m ti_jax.train_world", "```", "",
      f"- seed: {settings.seed}",
      f"- settings: `{json.dumps(dataclasses.asdict(settings), sort_keys=True)}`",
      (f"- jax {jax.__version__}, {len(jax.local_devices())} local "
      f"{jax.local_devices()[0].platform} device(s), wall clock of this invocation "
      f"{seconds / 60:.1f} min (a resumed run counts only what it ran; metrics.jsonl has each "
      "phase's seconds)"),
      f"- VAE final: {json.dumps(final['vae'], sort_keys=True)}; latent scaling_factor {scaling:.5f}",
      f"- diffusion final (epsilon MSE): {json.dumps(final['diffusion'], sort_keys=True)}",
      f"- checker accuracy on fresh renders: {json.dumps(accuracy, sort_keys=True)}",
      "",
      ("The checker (`checker.safetensors`, `checker.json`) is `ti_jax.world.checker`'s "
      "attribute classifier, the stand-in for CLIP in this world."), "",
  ]
  return "\n".join(lines)


def sample_check(model_dir: str, prompts: list[str], num_images: int = 32, *,
                 guidance_scale: float = 4.0, num_inference_steps: int = 25, seed: int = 0,
                 devices: list | None = None,
                 checker_dir: str | None = None) -> dict[str, dict[str, float]]:
  """Does the model draw what its captions name? Samples each prompt, asks the folder's checker
  (or the one in `checker_dir`).

  Returns, per prompt, the share of its `num_images` samples showing each
  attribute the prompt names (`scenes.named_attributes`) and "all" of them.
  """
  model = loading.load_stable_diffusion(model_dir)
  checker = checker_lib.load(checker_dir or model_dir)
  gen = generation.ImageGenerator(model, num_inference_steps=num_inference_steps,
                                  guidance_scale=guidance_scale, height=scenes.IMAGE_SIZE,
                                  width=scenes.IMAGE_SIZE, devices=devices)
  report = {}
  for prompt in prompts:
    images = generation.generate_images(gen, prompt, num_images, seed=seed)  # [N, 32, 32, 3]
    named = scenes.named_attributes(prompt)
    shares = {name: float(checker_lib.shows(checker, images, {name: value}).mean())
              for name, value in named.items()}
    shares["all"] = float(checker_lib.shows(checker, images, named).mean()) if named else 1.0
    report[prompt] = shares
  return report
