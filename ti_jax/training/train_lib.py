"""Pure pieces of textual-inversion training: state, loss, optimizer and the per-device step.

Only the learned vectors are trainable. The frozen UNet, text encoder, cached
VAE posteriors and noise schedule travel as a `Frozen` argument (replicated
once, never closed over), and gradients are taken with respect to the learned
vectors alone, so XLA does no weight-gradient work for the frozen models.

Two layouts of the same pieces: `train_step`, pmapped over the devices (one concept,
replicated weights: the default), and `mesh_step`, K concepts stacked `[K, ...]` and
vmapped through one UNet call, jitted over a (concept, data) mesh with the weights
replicated or sharded (`make_mesh_step`; each concept its own seed, rate and active flag).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ti_jax.embeddings.pseudo_words import embed_tokens, token_table
from ti_jax.models import sdxl
from ti_jax.runtime import parallel
from ti_jax.sampling import noise_schedule

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


@flax.struct.dataclass
class TrainState:
  """What changes during training; everything else is frozen."""
  step: jax.Array  # int32 scalar: number of completed steps
  # The learned pseudo-word vectors of each text encoder, "embeds" + its suffix
  # (`weights.pipeline.TextEncoder.suffix`): {"embeds": [n, D] float32}, SDXL also
  # "embeds_2": [n, D2], the same pseudo-word in its second text encoder (1280 wide
  # for OpenCLIP bigG), under the same optimizer. With the per-image-token ablation
  # also "image_embeds": [N, D], one per training image. The keys are the checkpoints'.
  params: dict
  opt_state: optax.OptState


@flax.struct.dataclass
class Frozen:
  """Arrays the step reads but never changes (replicated on every device).

  The per-encoder tuples follow `StepSettings.text_encoders` (SD 1.x/2.x and LDM:
  one entry, SDXL: two; each encoder numbers the placeholder in its own tokenizer).
  """
  unet: Any
  text_encoders: tuple  # each text encoder's params, its original token table included
  latent_mean: jax.Array  # [V, h, w, C] posterior mean of each distinct training view
  latent_std: jax.Array  # [V, h, w, C]
  # Per encoder: [n (+ N)] int32, the token id of each learned vector (then image tokens).
  placeholder_ids: tuple
  schedule: noise_schedule.NoiseSchedule  # alphas_cumprod [T] and the prediction type
  init_embeds: tuple | None = None  # per encoder: [n, D] initial vectors, for embedding_reg_weight
  # SDXL only (None for SD 1.x/2.x and LDM): each view's micro-conditioning (sdxl.time_ids).
  time_ids: jax.Array | None = None  # [V, 6] float32, one row per view of latent_mean


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Static (hashable) settings of the step: modules and scalar hyper-parameters."""
  unet: Any
  text_encoders: tuple  # the text encoder modules, in the pipeline's order (SDXL: two)
  scaling_factor: float
  shift_factor: float
  seed: int
  # Weight of the squared L2 pull of the vectors toward their initial values
  # (the paper's regularisation ablation); 0 disables it.
  embedding_reg_weight: float = 0.0
  # Paper ablation (progressive extension): vector i trains from step i * N on
  # (N = progressive_words); 0 trains every vector from the start.
  progressive_words: int = 0
  # Micro-batches per optimizer step: the device's batch [A * b] is cut into A
  # micro-batches of b run one after another (lax.scan), their gradients averaged.
  gradient_accumulation_steps: int = 1
  # Min-SNR-gamma loss weighting (Hang et al. 2023): each example's squared error is
  # weighted by min(SNR(t), gamma) / SNR(t) (epsilon), / (SNR(t) + 1) (v); 0 = off.
  snr_gamma: float = 0.0
  # Std of a per-example, per-channel constant added to the diffusion noise; 0 = off.
  noise_offset: float = 0.0
  # Each encoder's `TextEncoder.suffix` ("", "_2"): encoder e learns params["embeds" + suffix]
  # and reads batch["input_ids" + suffix].
  suffixes: tuple[str, ...] = ("",)
  # SDXL: where its last encoder pools the projected text embedding, the tokenizer's real
  # eos id (see `trainer.step_inputs` for why not transformers' legacy rule); None otherwise.
  pool_eos_token_id: int | None = None


# Schedule, optimizer and pmapped step are memoized by their inputs: a process that trains
# again (a sweep, a notebook, the tests) reuses the traced step instead of re-tracing it.
@functools.lru_cache(maxsize=32)
def learning_rate_schedule(base_lr: float, schedule: str, warmup_steps: int,
                           total_steps: int) -> optax.Schedule:
  """Learning rate by step: constant, constant_with_warmup, linear or cosine decay after warmup."""
  if schedule not in LR_SCHEDULES:
    raise ValueError(f"lr_scheduler {schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
  warmup = max(int(warmup_steps), 0)
  if schedule == "constant":
    return optax.constant_schedule(base_lr)
  ramp = optax.linear_schedule(0.0, base_lr, warmup) if warmup else optax.constant_schedule(base_lr)
  decay_steps = max(total_steps - warmup, 1)
  after = {
      "constant_with_warmup": optax.constant_schedule(base_lr),
      "linear": optax.linear_schedule(base_lr, 0.0, decay_steps),
      "cosine": optax.cosine_decay_schedule(base_lr, decay_steps),
  }[schedule]
  return optax.join_schedules([ramp, after], [warmup])


# The learned vectors' keys in TrainState.params: "embeds" + an encoder's suffix, and the
# per-image tokens' "image_embeds".
TRAINABLE = ("embeds", "image_embeds")


def trainable_labels(params: dict) -> dict:
  """Optimizer labels: the learned vectors train; any other leaf is frozen."""
  return {k: jax.tree_util.tree_map(lambda _: "train" if k.startswith(TRAINABLE) else "frozen", v)
          for k, v in params.items()}


OPTIMIZERS = ("adamw", "lion", "prodigy", "adafactor", "sgd")


def _inner_optimizer(name: str, lr: optax.Schedule, b1: float, b2: float, eps: float,
                     weight_decay: float) -> optax.GradientTransformation:
  """The optax optimizer `name` for the learned vectors (see OPTIMIZERS)."""
  if name == "adamw":
    return optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if name == "lion":  # its own betas (0.9, 0.99); decoupled weight decay, scaled by lr
    return optax.lion(lr, weight_decay=weight_decay)
  if name == "prodigy":  # lr multiplies the step size Prodigy estimates (1.0 is its default)
    return optax.contrib.prodigy(lr, weight_decay=weight_decay)
  if name == "adafactor":
    # optax's adafactor adds weight_decay_rate * params unscaled by the learning rate;
    # scaling it by lr gives weight_decay the decoupled meaning it has for AdamW.
    decay = (lambda count: lr(count) * weight_decay) if weight_decay else None
    return optax.adafactor(lr, weight_decay_rate=decay)
  if name == "sgd":  # plain SGD: no momentum, no weight decay
    return optax.sgd(lr)
  raise ValueError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")


@functools.lru_cache(maxsize=32)
def make_optimizer(lr: optax.Schedule, b1: float, b2: float, eps: float,
                   weight_decay: float, name: str = "adamw") -> optax.GradientTransformation:
  """Optimizer `name` (AdamW by default) on the learned vectors; frozen leaves get zero
  updates and no optimizer state (multi_transform gives the inner optimizer only the
  trainable leaves). b1, b2 and eps are AdamW's; weight_decay is decoupled (scaled by the
  learning rate) for adamw, lion, prodigy and adafactor."""
  return optax.multi_transform(
      {"train": _inner_optimizer(name, lr, b1, b2, eps, weight_decay),
       "frozen": optax.set_to_zero()},
      trainable_labels)


def init_state(initial: dict, optimizer: optax.GradientTransformation) -> TrainState:
  """Step 0: the initial vectors by key of `TrainState.params` ("embeds": `[n, D]`; SDXL
  also "embeds_2": `[n, D2]`; the per-image ablation's "image_embeds": `[N, D]`)."""
  params = {k: jnp.asarray(v, jnp.float32) for k, v in initial.items()}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


# Folded into an example's key for its noise-offset draw: a stream of its own, so
# the posterior, noise and timestep draws are those of a run without the offset.
_NOISE_OFFSET_STREAM = 1


def _example_noise(seed: int, step: jax.Array, example_index: jax.Array, latent_shape,
                   num_timesteps: int, noise_offset: float = 0.0):
  """Posterior sample noise, diffusion noise and timestep for one global example.

  A pure function of (seed, step, global example index): the same example
  gets the same draws however the batch is split over devices and hosts.
  With `noise_offset`, the diffusion noise gets `noise_offset * n_c` added in
  each channel c, n_c standard normal, constant over the latent's pixels.
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), example_index)
  k_post, k_noise, k_t = jax.random.split(key, 3)
  noise = jax.random.normal(k_noise, latent_shape, jnp.float32)  # [h, w, C]
  if noise_offset:
    k_offset = jax.random.fold_in(key, _NOISE_OFFSET_STREAM)
    offset = jax.random.normal(k_offset, (1, 1, latent_shape[-1]), jnp.float32)  # [1, 1, C]
    noise = noise + noise_offset * offset
  return (jax.random.normal(k_post, latent_shape, jnp.float32), noise,
          jax.random.randint(k_t, (), 0, num_timesteps))


def min_snr_weights(schedule: noise_schedule.NoiseSchedule, timesteps: jax.Array,
                    snr_gamma: float) -> jax.Array:
  """Per-example loss weights `[b]` of min-SNR-gamma weighting at `timesteps` `[b]`.

  SNR(t) = a_t / (1 - a_t) (a: alphas_cumprod). The weight is min(SNR, gamma)
  divided by SNR for an epsilon target and by SNR + 1 for a v target, so that
  the weighted loss equals min(SNR, gamma) times the error in x0 (or its v
  equivalent); a "sample" target is weighted by min(SNR, gamma) itself.
  """
  acp = schedule.alphas_cumprod[timesteps]  # [b]
  snr = acp / (1.0 - acp)
  clipped = jnp.minimum(snr, snr_gamma)
  if schedule.prediction_type == "epsilon":
    # A zero-terminal-SNR schedule has SNR 0 at its last step, where
    # min(SNR, gamma) / SNR tends to 1.
    return jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
  if schedule.prediction_type == "v_prediction":
    return clipped / (snr + 1.0)
  return clipped


def loss_fn(params: dict, frozen: Frozen, batch: dict, step: jax.Array,
            settings: StepSettings, seed: jax.Array | None = None) -> jax.Array:
  """Mean squared error of the UNet's prediction for this device's examples (float32).

  batch: {"input_ids": [b, T] int32, "view_index": [b] int32, "example_index": [b] int32}.
  `seed` (a traced uint32, the mesh step's per-concept seed) replaces settings.seed.
  """
  mean = frozen.latent_mean[batch["view_index"]]  # [b, h, w, C]
  std = frozen.latent_std[batch["view_index"]]
  draw = functools.partial(_example_noise, settings.seed if seed is None else seed, step,
                           latent_shape=mean.shape[1:], num_timesteps=frozen.schedule.num_train_timesteps,
                           noise_offset=settings.noise_offset)
  post_eps, noise, t = jax.vmap(draw)(batch["example_index"])
  # A sample of the cached posterior: the same distribution as encoding each step.
  latents = (mean + std * post_eps - settings.shift_factor) * settings.scaling_factor
  noisy = noise_schedule.add_noise(frozen.schedule, latents, noise, t)
  target = noise_schedule.training_target(frozen.schedule, latents, noise, t)

  context, added = text_conditioning(params, frozen, batch, settings)
  pred = settings.unet.apply({"params": frozen.unet}, noisy.astype(mean.dtype), t,
                            context, added)  # [b, h, w, C]
  if settings.snr_gamma:
    per_example = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))  # [b]
    loss = jnp.mean(per_example * min_snr_weights(frozen.schedule, t, settings.snr_gamma))
  else:
    loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target))
  if settings.embedding_reg_weight:  # each encoder's vectors pulled toward their start
    for suffix, init in zip(settings.suffixes, frozen.init_embeds):
      drift = params["embeds" + suffix] - init  # [n, D]
      loss = loss + settings.embedding_reg_weight * jnp.mean(jnp.sum(jnp.square(drift), axis=-1))
  return loss


def text_conditioning(params: dict, frozen: Frozen, batch: dict,
                      settings: StepSettings) -> tuple[jax.Array, dict | None]:
  """The UNet's conditioning of a batch with the learned vectors spliced into every encoder.

  Encoder e reads batch["input_ids" + suffix] ([b, T], the same prompts from its own
  tokenizer) and learns params["embeds" + suffix] (then "image_embeds" + suffix, the
  per-image tokens'). Returns (context [b, T, D], None) for one encoder; SDXL's
  (context [b, T, D1 + D2], added_cond with text_embeds [b, P] and each example's
  view's time_ids [b, 6]).
  """
  encoders = settings.text_encoders
  tables = [token_table(m, p) for m, p in zip(encoders, frozen.text_encoders)]  # [V, D] each
  ids = [batch["input_ids" + suffix] for suffix in settings.suffixes]  # [b, T] each
  embeds = []  # [b, T, D] each
  for table, suffix, placeholder_ids, input_ids in zip(tables, settings.suffixes,
                                                       frozen.placeholder_ids, ids):
    learned = params["embeds" + suffix]  # [n, D]
    if "image_embeds" + suffix in params:
      learned = jnp.concatenate([learned, params["image_embeds" + suffix]])  # [n + N, D]
    embeds.append(embed_tokens(table, learned, placeholder_ids, input_ids))
  if len(encoders) == 1:
    context = encoders[0].apply({"params": frozen.text_encoders[0]}, ids[0],
                                inputs_embeds=embeds[0])  # [b, T, D]
    return context, None
  # SDXL: both encoders' penultimate states side by side, the last one's pooled projection.
  context, pooled = sdxl.text_conditioning(encoders, frozen.text_encoders, ids, embeds,
                                           pool_eos_token_id=settings.pool_eos_token_id)
  return context, sdxl.added_cond(pooled, frozen.time_ids[batch["view_index"]])


def _add_micro_batch(params: dict, frozen: Frozen, step: jax.Array, settings: StepSettings,
                     seed: jax.Array | None, carry: tuple, micro: dict) -> tuple[tuple, None]:
  """lax.scan body: adds one micro-batch's (loss, gradients) to the running sums."""
  loss, grads = jax.value_and_grad(loss_fn)(params, frozen, micro, step, settings, seed)
  return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None


def _micro_batches(x: jax.Array, n: int, data_shards: int) -> jax.Array:
  """`[A * b, ...] -> [A, b, ...]`: micro-batch i is examples `[i * b, (i + 1) * b)`. With
  `data_shards` S (the mesh step: the batch `[S * A * b', ...]` split over S devices in
  blocks), micro-batch i is example block i of every device, `[A, S * b', ...]`, so each
  device runs its own examples, as each pmapped device does."""
  if data_shards == 1:
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  blocks = x.reshape((data_shards, n, x.shape[0] // (data_shards * n)) + x.shape[1:])
  return blocks.swapaxes(0, 1).reshape((n, x.shape[0] // n) + x.shape[1:])


def accumulated_loss_and_grads(params: dict, frozen: Frozen, batch: dict, step: jax.Array,
                               settings: StepSettings, seed: jax.Array | None = None,
                               data_shards: int = 1) -> tuple[jax.Array, dict]:
  """(loss, gradients) of this device's batch, averaged over its micro-batches.

  With gradient_accumulation_steps A, each leaf of `batch` is `[A * b, ...]`
  and micro-batch i holds examples `[i * b, (i + 1) * b)` (see `_micro_batches` for the
  mesh step's `data_shards`). The micro-batches run
  one at a time in a `lax.scan`, so only one micro-batch's activations are live;
  all are the same size, so the mean of their means is the mean over the batch.
  `seed`: see `loss_fn`.
  """
  n = settings.gradient_accumulation_steps
  if n == 1:
    return jax.value_and_grad(loss_fn)(params, frozen, batch, step, settings, seed)
  micro = jax.tree_util.tree_map(lambda x: _micro_batches(x, n, data_shards),
                                 batch)  # [A, b, ...]
  zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
  body = functools.partial(_add_micro_batch, params, frozen, step, settings, seed)
  (loss, grads), _ = jax.lax.scan(body, zeros, micro)
  return loss / n, jax.tree_util.tree_map(lambda g: g / n, grads)


def train_step(state: TrainState, frozen: Frozen, batch: dict, *,
               settings: StepSettings, optimizer: optax.GradientTransformation,
               lr: optax.Schedule) -> tuple[TrainState, dict]:
  """One optimisation step on this device's shard; gradients are averaged over its
  micro-batches (gradient accumulation), then over devices."""
  loss, grads = accumulated_loss_and_grads(state.params, frozen, batch, state.step, settings)
  grads = parallel.pmean(grads)
  loss = parallel.pmean(loss)
  return optimizer_step(state, loss, grads, settings=settings, optimizer=optimizer, lr=lr)


def optimizer_step(state: TrainState, loss: jax.Array, grads: dict, *, settings: StepSettings,
                   optimizer: optax.GradientTransformation,
                   lr: optax.Schedule) -> tuple[TrainState, dict]:
  """The update of one concept from its averaged (loss, gradients): the optimizer step (with
  progressive_words, the vectors not yet in the prompts held), and the step's metrics."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  if settings.progressive_words:
    # Vectors not yet in the prompts get no gradient, but AdamW's decoupled
    # weight decay would still move them: hold them where they are.
    n = state.params["embeds"].shape[0]
    active = jnp.arange(n) < active_vectors(state.step, n, settings.progressive_words)
    updates = dict(updates)
    for key in ("embeds" + suffix for suffix in settings.suffixes):
      updates[key] = updates[key] * active[:, None]
  params = optax.apply_updates(state.params, updates)
  # Largest L2 norm of a learned vector: the host stops a run whose vectors
  # diverge (nan propagates through the max).
  max_norm = jnp.max(jnp.stack([jnp.max(jnp.linalg.norm(v, axis=-1))
                                for v in jax.tree_util.tree_leaves(params)]))
  metrics = {"loss": loss, "lr": lr(state.step),
             "grad_norm": optax.tree.norm(grads), "max_vector_norm": max_norm}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def active_vectors(step, num_vectors: int, progressive_words: int):
  """How many of the vectors the prompts use at `step` (works on ints and traced arrays)."""
  if not progressive_words:
    return num_vectors
  return jnp.minimum(num_vectors, 1 + step // progressive_words) if isinstance(step, jax.Array) \
      else min(num_vectors, 1 + int(step) // progressive_words)


def make_pmapped_step(settings: StepSettings, optimizer, lr, devices):
  """The compiled data-parallel step: `(state, frozen, batch) -> (state, metrics)`, all sharded.
  The state buffer is donated: the step updates it in place on device."""
  return _pmapped_step(settings, optimizer, lr, tuple(devices))


@functools.lru_cache(maxsize=16)
def _pmapped_step(settings: StepSettings, optimizer, lr, devices: tuple):
  step = functools.partial(train_step, settings=settings, optimizer=optimizer, lr=lr)
  return parallel.pmapped(step, devices, donate_argnums=(0,))


# ---------------------------------------------------------------------------
# The mesh step: K concepts stacked `[K, ...]`, one jit over a (concept, data) mesh.
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class ConceptSlots:
  """What differs between the concepts of a mesh step besides their state, each `[K]`."""
  seed: jax.Array  # uint32: concept k's draws are a function of (seed[k], step, example index)
  lr_scale: jax.Array  # float32: concept k's rate over the run's schedule, lr(step) * lr_scale[k]
  # bool: False holds concept k's params and optimizer state (failure isolation; padding).
  active: jax.Array


def concept_slots(seeds, lr_scales, active=None) -> ConceptSlots:
  """Host `ConceptSlots` of K concepts (`active` default: all)."""
  seeds = np.asarray(seeds, np.uint32)
  active = np.ones(seeds.shape, bool) if active is None else np.asarray(active, bool)
  return ConceptSlots(seed=seeds, lr_scale=np.asarray(lr_scales, np.float32), active=active)


# `Frozen` fields that belong to one concept (its images, its placeholder, its start): stacked
# `[K, ...]` in a mesh step's frozen argument. The others (weights, schedule) are shared.
CONCEPT_FIELDS = ("latent_mean", "latent_std", "placeholder_ids", "init_embeds", "time_ids")


def _concept_axes(frozen: Frozen) -> Frozen:
  """vmap's in_axes of a stacked `Frozen`: 0 for CONCEPT_FIELDS, None (shared) for the rest."""
  return Frozen(**{f.name: 0 if f.name in CONCEPT_FIELDS else None
                   for f in dataclasses.fields(Frozen)})


def stack_frozen(frozens: list[Frozen], size: int | None = None) -> Frozen:
  """K concepts' host `Frozen`s as one mesh-step argument: the shared fields (weights,
  schedule) of the first, CONCEPT_FIELDS stacked `[K, ...]` (padded to `[size, ...]`: see
  `parallel.pad_stacked`); views padded to the most any concept has (never indexed)."""
  views = max(f.latent_mean.shape[0] for f in frozens)

  def pad_views(x):  # host arrays, or `jax.ShapeDtypeStruct`s (ahead-of-time lowering)
    if x.shape[0] == views:
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((views,) + tuple(x.shape[1:]), x.dtype)
    x = np.asarray(x)
    return np.concatenate([x, np.zeros((views - x.shape[0],) + x.shape[1:], x.dtype)])
  per_concept = [f.replace(latent_mean=pad_views(f.latent_mean), latent_std=pad_views(f.latent_std),
                           time_ids=None if f.time_ids is None else pad_views(f.time_ids))
                 for f in frozens]
  stacked = parallel.stack([{k: getattr(f, k) for k in CONCEPT_FIELDS} for f in per_concept])
  return frozens[0].replace(**(parallel.pad_stacked(stacked, size) if size else stacked))


def mesh_frozen_specs(frozen: Frozen, num_devices: int, shard_weights: bool) -> Frozen:
  """Where a stacked `Frozen`'s leaves go on the mesh: CONCEPT_FIELDS over the concept axis; the
  UNet's and text encoders' weights FSDP-sharded over all `num_devices` with `shard_weights`
  (`parallel.fsdp_spec`), else replicated, as is the noise schedule."""
  def weights(tree):
    return jax.tree_util.tree_map(
        lambda x: parallel.fsdp_spec(x.shape, num_devices) if shard_weights
        else parallel.replicated_spec(), tree)
  specs = {k: jax.tree_util.tree_map(lambda _: parallel.concept_spec(), getattr(frozen, k))
           for k in CONCEPT_FIELDS}
  return frozen.replace(unet=weights(frozen.unet), text_encoders=weights(frozen.text_encoders),
                        schedule=jax.tree_util.tree_map(lambda _: parallel.replicated_spec(),
                                                        frozen.schedule), **specs)


def place_mesh_args(mesh, state: TrainState, frozen: Frozen, batch: dict, slots: ConceptSlots,
                    shard_weights: bool = False) -> tuple:
  """The mesh step's (state, frozen, batch, slots) on `mesh`, from host trees (or
  `jax.ShapeDtypeStruct`s, for ahead-of-time lowering) stacked over K concepts (K a
  multiple of the concept shards: `parallel.pad_stacked`): `state` `[K, ...]`, `frozen`
  from `stack_frozen`, `batch` `[K, B, ...]` (B a multiple of the data shards), `slots`."""
  devices = mesh.devices.size
  return (parallel.put(state, mesh, parallel.concept_spec()),
          parallel.put(frozen, mesh, mesh_frozen_specs(frozen, devices, shard_weights)),
          parallel.put(batch, mesh, parallel.batch_spec()),
          parallel.put(slots, mesh, parallel.concept_spec()))


def one_concept_mesh_args(mesh, state: TrainState, frozen: Frozen, batch: dict, seed: int,
                          shard_weights: bool = True) -> tuple:
  """`place_mesh_args` for one concept (a mesh of one concept shard): the host (or abstract)
  `state`, `frozen` and global batch `[B, ...]` of the pmapped step's single concept. What
  an ahead-of-time script lowers `make_mesh_step` with to size sharded weights."""
  slots = concept_slots([seed], [1.0])
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(state)):
    # Shapes in, shapes out: a compile-only client (a TPU topology on a CPU host) can place
    # no host array, the concept's slot included.
    slots = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), slots)
  return place_mesh_args(mesh, parallel.stack([state]), stack_frozen([frozen]),
                         parallel.stack([batch]), slots, shard_weights)


def concept_step(state: TrainState, frozen: Frozen, batch: dict, slot: ConceptSlots, *,
                 settings: StepSettings, make_opt, lr: optax.Schedule,
                 data_shards: int) -> tuple[TrainState, dict]:
  """One concept's step in a mesh step (vmapped over concepts): `train_step`'s loss,
  gradients (averaged over the concept's whole batch) and update, with the concept's
  seed and learning rate (`slot`). Its params and optimizer state change only when it is
  active and the step left its loss and vectors finite (metrics["finite"])."""
  def lr_k(count):  # the run's schedule at this concept's rate
    return lr(count) * slot.lr_scale
  loss, grads = accumulated_loss_and_grads(state.params, frozen, batch, state.step, settings,
                                           seed=slot.seed, data_shards=data_shards)
  new, metrics = optimizer_step(state, loss, grads, settings=settings, optimizer=make_opt(lr_k),
                                lr=lr_k)
  finite = jnp.isfinite(loss) & jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(v)) for v in jax.tree_util.tree_leaves(new.params)]))
  keep = slot.active & finite

  def hold(updated, old):
    return jax.tree_util.tree_map(lambda u, o: jnp.where(keep, u, o), updated, old)
  new = new.replace(params=hold(new.params, state.params),
                    opt_state=hold(new.opt_state, state.opt_state))
  return new, {**metrics, "finite": finite}


def mesh_step(state: TrainState, frozen: Frozen, batch: dict, slots: ConceptSlots, *,
              settings: StepSettings, make_opt, lr: optax.Schedule,
              mesh) -> tuple[TrainState, dict]:
  """K concepts' steps at once: `concept_step` vmapped over the stacked state, CONCEPT_FIELDS
  of `frozen`, batch `[K, B, ...]` and slots; the shared weights are unmapped, so the K
  concepts' examples go through the UNet and text encoders as one batch. Metrics `[K]`.

  Sharded weights are gathered where they are used (`parallel.gathered`), never the
  activations split to match them."""
  step = functools.partial(concept_step, settings=settings, make_opt=make_opt, lr=lr,
                           data_shards=parallel.data_size(mesh))
  frozen = frozen.replace(unet=parallel.gathered(frozen.unet, mesh),
                          text_encoders=parallel.gathered(frozen.text_encoders, mesh))
  return parallel.concept_vmap(step, in_axes=(0, _concept_axes(frozen), 0, 0))(
      state, frozen, batch, slots)


def make_mesh_step(settings: StepSettings, make_opt, lr: optax.Schedule, mesh):
  """The compiled mesh step `(state, frozen, batch, slots) -> (state, metrics)` on `mesh`
  (args from `place_mesh_args`); state and metrics `[K]` over the concept axis, the state
  donated. `make_opt(schedule)` builds the optimizer for a learning-rate schedule (e.g.
  `functools.partial(make_optimizer, b1=..., b2=..., eps=..., weight_decay=..., name=...)`):
  each concept's optimizer runs at its own rate, exactly as it would alone."""
  step = functools.partial(mesh_step, settings=settings, make_opt=make_opt, lr=lr, mesh=mesh)
  spec = parallel.concept_spec()
  return parallel.meshed(step, mesh, (spec, spec), donate_argnums=(0,))


def compiled_memory_bytes(compiled) -> int:
  """Device memory one device needs for a compiled program, from XLA's memory plan.

  Arguments, outputs, temporaries and generated code; outputs that reuse a
  donated argument's buffer (the train state) are counted once.
  """
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes + m.generated_code_size_in_bytes)


def device_memory_limit(device) -> int | None:
  """Bytes a program may use on `device` (its allocator's limit), or None where unknown (CPU)."""
  stats = device.memory_stats() if device.platform != "cpu" else None
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def is_out_of_memory(error: Exception) -> bool:
  """Whether a compile error is XLA's "program does not fit the device" (XLA:TPU refuses to
  compile a program larger than the chip's HBM: RESOURCE_EXHAUSTED, CompileTimeHbmOom)."""
  return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def fits_memory(step, args: tuple, memory_limit: int) -> bool:
  """Whether the compiled `step(*args)` fits `memory_limit` bytes per device (compiled, not run)."""
  try:
    return compiled_memory_bytes(step.lower(*args).compile()) <= memory_limit
  except jax.errors.JaxRuntimeError as e:
    if not is_out_of_memory(e):
      raise
    return False


def _with_remat(settings: StepSettings) -> StepSettings:
  """`settings` with the UNet's blocks rematerialised in the backward pass."""
  return dataclasses.replace(settings, unet=settings.unet.clone(remat=True))


def _remat_if_needed(make_step, settings: StepSettings, args: tuple,
                     memory_limit: int | None) -> tuple[StepSettings, Any, bool]:
  """`make_step(settings)` if it fits `memory_limit` for `args` (or no limit), else with the
  UNet's blocks rematerialised: (settings, step, remat on?)."""
  step = make_step(settings)
  if memory_limit is None or fits_memory(step, args, memory_limit):
    return settings, step, False
  settings = _with_remat(settings)
  return settings, make_step(settings), True


def remat_if_needed(settings: StepSettings, optimizer, lr, devices, args: tuple,
                    memory_limit: int | None) -> tuple[StepSettings, Any, bool]:
  """`config.remat="auto"`: the plain step if XLA's plan of it fits `memory_limit`, else the
  step with the UNet's blocks rematerialised (which trades about a third more FLOPs for
  activation memory). Returns (settings, pmapped step, remat on?).

  `args` are the step's (state, frozen, batch), real or `jax.ShapeDtypeStruct`s: the plain
  step is lowered and compiled for them, never run. No limit (None) keeps the plain step.
  """
  return _remat_if_needed(lambda s: make_pmapped_step(s, optimizer, lr, devices), settings,
                          args, memory_limit)


def mesh_remat_if_needed(settings: StepSettings, make_opt, lr, mesh, args: tuple,
                         memory_limit: int | None) -> tuple[StepSettings, Any, bool]:
  """`remat_if_needed` for the mesh step (`args`: its (state, frozen, batch, slots))."""
  return _remat_if_needed(lambda s: make_mesh_step(s, make_opt, lr, mesh), settings, args,
                          memory_limit)


def replicated_weights_fit(settings: StepSettings, optimizer, lr, devices, args: tuple,
                           memory_limit: int | None, remat: bool) -> bool:
  """`config.shard_weights="auto"`: whether the pmapped step, weights replicated, fits
  `memory_limit` per device (also rematerialised, if `remat` allows it). `args`: the pmapped
  step's (state, frozen, batch) as `jax.ShapeDtypeStruct`s (`parallel.replicate` of shapes),
  so nothing is placed on a device that may not hold it. No limit (None): True."""
  if memory_limit is None:
    return True
  variants = [settings] + ([_with_remat(settings)] if remat else [])
  return any(fits_memory(make_pmapped_step(s, optimizer, lr, devices), args, memory_limit)
             for s in variants)
