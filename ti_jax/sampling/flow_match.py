"""Flow matching (rectified flow) for FLUX.1: the scheduler config, the Euler sampler and the
training math, as pure functions that reproduce diffusers.

The model predicts a velocity v = noise - x0 along the straight path
x_t = (1 - sigma) x0 + sigma noise, sigma in [0, 1] (1 is pure noise).

* Config: `flow_match_config` reads a `FlowMatchEulerDiscreteScheduler` config dict (FLUX.1-dev:
  shift 3.0 with dynamic shifting; schnell: shift 1.0 without) into a `FlowMatchConfig`,
  following diffusers' `from_config` rules through `noise_schedule.resolve_config`; a value
  this module does not implement raises a one-line `noise_schedule.SchedulerConfigError`.
* Sampling: `make_flow_sampler` builds the sigma grid `FluxPipeline` passes
  (`linspace(1, 1/N, N)`), shifts it by `mu = calculate_shift(image_seq_len)` (dynamic) or by
  the static `shift`, appends the final sigma 0, and gives a `FlowSampler` whose tables a
  compiled loop indexes by step. It has the interface of `schedulers.Sampler`
  (`timesteps`, `scale_model_input`, `init_state`, `step`, `num_steps`, `init_noise_sigma`),
  so the guided loop can drive it::

    sampler = make_flow_sampler(cfg, 28, image_seq_len(1024, 1024))
    def body(i, x):
      t = sampler.transformer_timestep(i, x.dtype)   # what FluxPipeline feeds: t / 1000
      v = transformer(x, t, guidance, ...)
      return sampler.step({}, v, i, x)[0]
    x = lax.fori_loop(0, sampler.num_steps, body, noise)

* Training, as diffusers' Flux scripts (`examples/dreambooth/train_dreambooth_lora_flux.py`,
  `train_dreambooth_flux.py`, `examples/advanced_diffusion_training/
  train_dreambooth_lora_flux_advanced.py`) do it, one pure function per line of theirs:
  `timestep_density` (their `compute_density_for_timestep_sampling`, fed the draws),
  `train_indices` (`(u * num_train_timesteps).long()`), `FlowTrainSchedule` (the
  scheduler's training `timesteps` and `sigmas` that `get_sigmas` looks up), `noisy_latents`,
  `flow_target`, `loss_weighting` (`compute_loss_weighting_for_sd3`) and `flow_loss`;
  `draw_train_timesteps` chains the first three from a PRNG key, one example's at a time.

  What the scripts do, precisely: one flag, `--weighting_scheme` (default "none"), picks both
  the timestep density and the loss weighting: "logit_normal" (u = sigmoid(N(logit_mean,
  logit_std)), weights 1) and "mode" (u = 1 - w - mode_scale (cos^2(pi w / 2) - 1 + w),
  w ~ U[0, 1), weights 1) change the density; "sigma_sqrt" (weight sigma^-2) and "cosmap"
  (weight 2 / (pi (1 - 2 sigma + 2 sigma^2))) keep u ~ U[0, 1) and weight the loss; "none" is
  uniform and unweighted. The train timestep is `scheduler.timesteps[int(u * 1000)]` of a
  pristine `FlowMatchEulerDiscreteScheduler` (never `set_timesteps`), and its sigma the
  matching entry of `scheduler.sigmas`: (1000 - index) / 1000 with the static shift applied
  only when the config's `use_dynamic_shifting` is False. **No resolution shift is applied at
  training time**: no `mu` is computed; and for FLUX.1-dev (use_dynamic_shifting True) the
  static shift 3.0 is not applied either, while schnell's shift is 1.0: for both FLUX.1
  models the training sigma is exactly (1000 - floor(1000 u)) / 1000. The transformer is
  fed `timestep = timesteps / 1000` (float32) and, when its config has `guidance_embeds`
  (dev), `guidance = [guidance_scale] * batch` (`--guidance_scale`, default 3.5, float32);
  schnell gets None. The loss is mean over each example of weighting * (pred - (noise -
  x0))^2 in float32, then the batch mean. Latents are `(vae_latents - shift_factor) *
  scaling_factor` (`normalize_latents`), decoded after `denormalize_latents`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ti_jax.sampling import noise_schedule

# `__init__` defaults of diffusers' FlowMatchEulerDiscreteScheduler (0.42). The shared keys of
# COMMON_DEFAULTS (betas, prediction type) are ones this class does not take: they are kept
# only so that `resolve_config` reads the dict as it reads every other scheduler's.
_FLOW_DEFAULTS = dict(
    noise_schedule.COMMON_DEFAULTS, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False,
    shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False, time_shift_type="exponential", stochastic_sampling=False)

# Flags whose True this module refuses, with why (diffusers' features that FLUX.1 does not use).
_REFUSED_FLAGS = {
    "invert_sigmas": "inverted sigmas (Mochi) are not implemented",
    "use_karras_sigmas": "only the pipeline's linear sigma grid is implemented",
    "use_exponential_sigmas": "only the pipeline's linear sigma grid is implemented",
    "use_beta_sigmas": "only the pipeline's linear sigma grid is implemented",
    "stochastic_sampling": "only the deterministic Euler step is implemented",
}
_TIME_SHIFT_TYPES = ("exponential", "linear")

# The `--weighting_scheme` choices of diffusers' Flux (and SD3) training scripts.
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
# The scripts' defaults for the density parameters and the guidance value fed at training.
DEFAULT_LOGIT_MEAN, DEFAULT_LOGIT_STD, DEFAULT_MODE_SCALE = 0.0, 1.0, 1.29
DEFAULT_GUIDANCE_SCALE = 3.5
# diffusers' Flux transformer takes timestep / 1000 (and multiplies by 1000 inside), whatever
# num_train_timesteps is: the pipeline and the scripts both divide by this literal.
TIMESTEP_DIVISOR = 1000


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
  """The fields of a FlowMatchEulerDiscreteScheduler config this module implements."""
  num_train_timesteps: int
  shift: float  # static shift, used when use_dynamic_shifting is False
  use_dynamic_shifting: bool  # resolution-dependent shift by mu = calculate_shift(seq_len)
  base_shift: float
  max_shift: float
  base_image_seq_len: int
  max_image_seq_len: int
  time_shift_type: str  # "exponential" | "linear"


def _number(rc: Mapping[str, Any], field: str) -> float:
  """rc[field] as a float, or a one-line refusal."""
  value = rc[field]
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise noise_schedule.unsupported(field, value, "expected a number")
  return float(value)


def flow_match_config(cfg: Mapping[str, Any] | FlowMatchConfig) -> FlowMatchConfig:
  """Reads a diffusers scheduler config dict as `FlowMatchEulerDiscreteScheduler.from_config`.

  Args:
    cfg: A scheduler config dict (FLUX.1's `scheduler/scheduler_config.json`), or a
      `FlowMatchConfig` (returned as is).

  Returns:
    The `FlowMatchConfig`.

  Raises:
    noise_schedule.SchedulerConfigError: (a ValueError, one line naming the field) for a
      malformed value or one not implemented here: inverted, Karras, exponential or beta
      sigmas, stochastic sampling, a `shift_terminal`, an unknown `time_shift_type`.
  """
  if isinstance(cfg, FlowMatchConfig):
    return cfg
  rc = noise_schedule.resolve_config(cfg, _FLOW_DEFAULTS)
  for field, why in _REFUSED_FLAGS.items():
    if rc[field]:
      raise noise_schedule.unsupported(field, rc[field], why)
  if rc["shift_terminal"]:  # diffusers skips a falsy one (None or 0)
    raise noise_schedule.unsupported("shift_terminal", rc["shift_terminal"],
                                     "stretching to a terminal sigma is not implemented")
  if rc["time_shift_type"] not in _TIME_SHIFT_TYPES:
    raise noise_schedule.unsupported("time_shift_type", rc["time_shift_type"],
                                     f"expected one of {', '.join(_TIME_SHIFT_TYPES)}")
  if not isinstance(rc["use_dynamic_shifting"], (bool, np.bool_)):
    raise noise_schedule.unsupported("use_dynamic_shifting", rc["use_dynamic_shifting"],
                                     "expected true or false")
  shift = _number(rc, "shift")
  if not shift > 0:
    raise noise_schedule.unsupported("shift", rc["shift"], "expected a positive number")
  seq = {field: _number(rc, field) for field in ("base_image_seq_len", "max_image_seq_len")}
  if rc["use_dynamic_shifting"] and seq["max_image_seq_len"] == seq["base_image_seq_len"]:
    # calculate_shift divides by their difference.
    raise noise_schedule.unsupported("max_image_seq_len", rc["max_image_seq_len"],
                                     "expected a value other than base_image_seq_len")
  return FlowMatchConfig(
      num_train_timesteps=rc["num_train_timesteps"], shift=shift,
      use_dynamic_shifting=bool(rc["use_dynamic_shifting"]),
      base_shift=_number(rc, "base_shift"), max_shift=_number(rc, "max_shift"),
      base_image_seq_len=rc["base_image_seq_len"], max_image_seq_len=rc["max_image_seq_len"],
      time_shift_type=rc["time_shift_type"])


def _static_shift(shift: float, sigmas: np.ndarray) -> np.ndarray:
  """shift * s / (1 + (shift - 1) * s) in float32, operation by operation as diffusers."""
  s32 = np.float32(shift)
  return (s32 * sigmas / (np.float32(1) + np.float32(shift - 1) * sigmas)).astype(np.float32)


# ----------------------------------------------------------------------------- sampling


def image_seq_len(height: int, width: int, vae_scale_factor: int = 8) -> int:
  """The transformer's image sequence length for a `height` x `width` image, as FluxPipeline.

  The pipeline rounds the latent size down to even (`2 * (height // (vae_scale_factor * 2))`)
  and packs 2x2 latent patches into one token.
  """
  h = 2 * (int(height) // (vae_scale_factor * 2))
  w = 2 * (int(width) // (vae_scale_factor * 2))
  return (h // 2) * (w // 2)


def calculate_shift(seq_len: int, config: FlowMatchConfig) -> float:
  """`mu` of the dynamic time shift: linear in the image sequence length (FluxPipeline's
  `calculate_shift`, in float64 as there), base_shift at base_image_seq_len and max_shift at
  max_image_seq_len (extrapolated beyond)."""
  span = config.max_image_seq_len - config.base_image_seq_len
  m = (config.max_shift - config.base_shift) / span
  b = config.base_shift - m * config.base_image_seq_len
  return seq_len * m + b


def shifted_sigmas(config: FlowMatchConfig, sigmas: np.ndarray, mu: float | None) -> np.ndarray:
  """Sigmas after the scheduler's shift, float32 as `set_timesteps` computes them.

  Dynamic shifting: exp(mu) / (exp(mu) + (1/s - 1)) ("exponential") or mu / (mu + (1/s - 1))
  ("linear"); otherwise the static shift * s / (1 + (shift - 1) * s).

  Args:
    config: The scheduler config.
    sigmas: The unshifted sigmas in (0, 1].
    mu: The dynamic shift (`calculate_shift`); needed only with dynamic shifting.
  """
  s = np.asarray(sigmas, np.float32)
  if not config.use_dynamic_shifting:
    return _static_shift(config.shift, s)
  if mu is None:
    raise ValueError("a scheduler with use_dynamic_shifting needs mu (calculate_shift)")
  a = np.float32(math.exp(mu) if config.time_shift_type == "exponential" else mu)
  # diffusers raises (1/s - 1) to the power 1.0: an identity, left out.
  return (a / (a + (np.float32(1) / s - np.float32(1)))).astype(np.float32)


@struct.dataclass
class FlowSampler:
  """The flow-matching Euler sampler with its per-step tables, shaped like `schedulers.Sampler`.

  A pytree (arrays are leaves). `step` gathers row `step_index` of the tables, which may be a
  traced int32 inside `lax.fori_loop` / `lax.scan`.
  """
  timesteps: jax.Array  # [N] float32 sigma * num_train_timesteps: diffusers' scheduler.timesteps
  sigmas: jax.Array  # [N + 1] float32, the last one 0
  # "dt": [N] float32 sigma_next - sigma; "transformer_timestep": [N] float32 timesteps / 1000,
  # divided on the host (XLA's float32 division on CPU is not correctly rounded, torch's is).
  tables: dict[str, jax.Array]
  kind: str = struct.field(pytree_node=False, default="flow_euler")
  prediction_type: str = struct.field(pytree_node=False, default="flow")  # velocity noise - x0
  init_noise_sigma: float = struct.field(pytree_node=False, default=1.0)  # x_1 is pure N(0, 1)

  @property
  def num_steps(self) -> int:
    """Number of model evaluations."""
    return int(self.timesteps.shape[0])

  def scale_model_input(self, sample: jax.Array, step_index: jax.Array | int) -> jax.Array:
    """The model input: the sample itself (flow matching does not rescale)."""
    del step_index
    return sample

  def init_state(self, sample: jax.Array) -> dict[str, jax.Array]:
    """No multistep history: an empty state, for the loop carry."""
    del sample
    return {}

  def transformer_timestep(self, step_index: jax.Array | int, dtype: Any) -> jax.Array:
    """The scalar `timestep` FluxPipeline feeds the transformer at a step: the scheduler's
    timestep cast to the latents' dtype, then divided by 1000 (the transformer multiplies by
    1000 again). Broadcast it over the batch."""
    if jnp.dtype(dtype) == jnp.float32:
      return self.tables["transformer_timestep"][step_index]
    # A bf16 (fp16) quotient is rounded from float32: XLA's ulp of error there almost never
    # changes it (none of FLUX.1-dev's 28 steps).
    return self.timesteps[step_index].astype(dtype) / jnp.asarray(TIMESTEP_DIVISOR, dtype)

  def step(self, state: dict[str, jax.Array], model_output: jax.Array,
           step_index: jax.Array | int, sample: jax.Array,
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One Euler step x + (sigma_next - sigma) v, as `FlowMatchEulerDiscreteScheduler.step`.

    Args:
      state: The (empty) state.
      model_output: The velocity v [B, ...] predicted at `timesteps[step_index]`.
      step_index: Step number in [0, num_steps), int or traced int32 scalar.
      sample: Current latents [B, ...].

    Returns:
      (next sample, state). The sample is the scheduler's (in `model_output`'s dtype) cast to
      `sample`'s dtype, as FluxPipeline casts it back to the latents' dtype; so the dtype of
      a loop's carry stays put.
    """
    prev = euler_step(self.tables["dt"][step_index], model_output, sample)
    return prev.astype(sample.dtype), state


def euler_step(dt: jax.Array, model_output: jax.Array, sample: jax.Array) -> jax.Array:
  """x + dt * v with diffusers' dtypes: the sample upcast to float32, dt * v rounded to v's
  dtype (torch casts the 0-dim float32 dt to a bf16 v's dtype first), the sum cast back to v's
  dtype. In float32 this is plain x + dt * v."""
  v_dtype = model_output.dtype
  # A product of two bf16 (or fp16) numbers is exact in float32, so one rounding to v's dtype
  # gives torch's bf16 product on any backend.
  dt = jnp.asarray(dt, jnp.float32).astype(v_dtype).astype(jnp.float32)
  delta = (dt * model_output.astype(jnp.float32)).astype(v_dtype)
  return (sample.astype(jnp.float32) + delta.astype(jnp.float32)).astype(v_dtype)


def flow_sigma_grid(num_inference_steps: int) -> np.ndarray:
  """FluxPipeline's unshifted sigmas: `np.linspace(1.0, 1 / N, N)` (float64)."""
  return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


def _divide_timesteps(timesteps: np.ndarray) -> np.ndarray:
  """float32 timesteps / 1000 on the host, correctly rounded as torch divides."""
  return (timesteps / np.float32(TIMESTEP_DIVISOR)).astype(np.float32)


def make_flow_sampler(config: Mapping[str, Any] | FlowMatchConfig, num_inference_steps: int,
                      seq_len: int | None = None, mu: float | None = None) -> FlowSampler:
  """The sampler `FluxPipeline` sets up: `scheduler.set_timesteps(sigmas=linspace(1, 1/N, N),
  mu=calculate_shift(image_seq_len))`.

  Args:
    config: The scheduler config dict (or a read `FlowMatchConfig`).
    num_inference_steps: N, the number of model evaluations (FLUX.1-dev 28, schnell 4).
    seq_len: The packed image sequence length (`image_seq_len(height, width)`), which sets
      mu; ignored without dynamic shifting.
    mu: The dynamic shift itself, instead of `seq_len`.

  Returns:
    The `FlowSampler`.

  Raises:
    ValueError: a bad step count, neither seq_len nor mu with dynamic shifting, or a config
      value not implemented (`noise_schedule.SchedulerConfigError`).
  """
  cfg = flow_match_config(config)
  n = num_inference_steps
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"num_inference_steps={n!r} must be a positive integer")
  if mu is None and seq_len is not None:
    mu = calculate_shift(seq_len, cfg)
  sig = shifted_sigmas(cfg, flow_sigma_grid(int(n)), mu)  # [N] float32
  timesteps = (sig * np.float32(cfg.num_train_timesteps)).astype(np.float32)
  sigmas = np.concatenate([sig, np.zeros(1, np.float32)])  # [N + 1]
  dt = (sigmas[1:] - sigmas[:-1]).astype(np.float32)
  return FlowSampler(timesteps=jnp.asarray(timesteps), sigmas=jnp.asarray(sigmas),
                     tables={"dt": jnp.asarray(dt),
                             "transformer_timestep": jnp.asarray(_divide_timesteps(timesteps))})


# ----------------------------------------------------------------------------- training


@struct.dataclass
class FlowTrainSchedule:
  """The training tables of a pristine FlowMatchEulerDiscreteScheduler, which the scripts'
  `get_sigmas` reads: index i has timestep T - i and sigma (T - i) / T, statically shifted
  only without dynamic shifting. A pytree (tables are leaves)."""
  sigmas: jax.Array  # [T] float32, from 1 down to 1 / T (unshifted)
  timesteps: jax.Array  # [T] float32 sigmas * T
  # [T] float32 timesteps / 1000, the transformer's input: computed on the host, because
  # XLA's float32 division (CPU) is not correctly rounded and torch's is.
  transformer_timesteps: jax.Array
  num_train_timesteps: int = struct.field(pytree_node=False)


def flow_train_schedule(config: Mapping[str, Any] | FlowMatchConfig) -> FlowTrainSchedule:
  """The training tables that `FlowMatchEulerDiscreteScheduler.from_config(config)` builds.

  For FLUX.1-dev (use_dynamic_shifting) and schnell (shift 1.0) the sigmas are (T - i) / T:
  neither the static shift nor any resolution shift applies at training time.
  """
  cfg = flow_match_config(config)
  t = cfg.num_train_timesteps
  steps = np.linspace(1, t, t, dtype=np.float32)[::-1]
  sigmas = (steps / np.float32(t)).astype(np.float32)
  if not cfg.use_dynamic_shifting:
    sigmas = _static_shift(cfg.shift, sigmas)
  timesteps = (sigmas * np.float32(t)).astype(np.float32)
  return FlowTrainSchedule(sigmas=jnp.asarray(sigmas), timesteps=jnp.asarray(timesteps),
                           transformer_timesteps=jnp.asarray(_divide_timesteps(timesteps)),
                           num_train_timesteps=t)


def check_weighting_scheme(scheme: str) -> str:
  """`scheme` if it is one of WEIGHTING_SCHEMES, else a ValueError listing them."""
  if scheme not in WEIGHTING_SCHEMES:
    raise ValueError(f"weighting_scheme={scheme!r} is unknown; expected one of "
                     f"{', '.join(WEIGHTING_SCHEMES)}")
  return scheme


def density_draw(key: jax.Array, scheme: str, shape: tuple[int, ...] = ()) -> jax.Array:
  """The random draw `timestep_density` transforms: standard normal for "logit_normal",
  uniform in [0, 1) for every other scheme (as `compute_density_for_timestep_sampling`)."""
  if check_weighting_scheme(scheme) == "logit_normal":
    return jax.random.normal(key, shape, jnp.float32)
  return jax.random.uniform(key, shape, jnp.float32)


def timestep_density(scheme: str, draw: jax.Array, logit_mean: float = DEFAULT_LOGIT_MEAN,
                     logit_std: float = DEFAULT_LOGIT_STD,
                     mode_scale: float = DEFAULT_MODE_SCALE) -> jax.Array:
  """u in [0, 1] of diffusers' `compute_density_for_timestep_sampling`, from its draw.

  Args:
    scheme: One of WEIGHTING_SCHEMES.
    draw: float32 [...], standard normal z for "logit_normal" (u = sigmoid(logit_mean +
      logit_std z), which is torch.normal(logit_mean, logit_std) then sigmoid), else
      uniform w in [0, 1) ("mode": u = 1 - w - mode_scale (cos^2(pi w / 2) - 1 + w); the
      others: u = w).
    logit_mean, logit_std, mode_scale: The scripts' flags (defaults 0, 1, 1.29).

  Returns:
    float32 u, shape of `draw`; small u is high noise (index 0 is sigma 1).
  """
  scheme = check_weighting_scheme(scheme)
  x = jnp.asarray(draw, jnp.float32)
  if scheme == "logit_normal":
    return jax.nn.sigmoid(x * jnp.float32(logit_std) + jnp.float32(logit_mean))
  if scheme == "mode":
    c = jnp.cos(jnp.float32(math.pi) * x / 2)
    return 1 - x - jnp.float32(mode_scale) * (c * c - 1 + x)
  return x


def train_indices(u: jax.Array, num_train_timesteps: int) -> jax.Array:
  """The scripts' `(u * num_train_timesteps).long()` as int32, clipped to [0, T - 1].

  The clip differs from diffusers only where diffusers breaks: u * T rounding to T (u = 1
  exactly: "mode" with a uniform draw of 0), where its index T raises IndexError, and
  u < -1/T ("mode" with |mode_scale| beyond ~7), where torch wraps a negative index round to
  the low-noise end.
  """
  idx = (jnp.asarray(u, jnp.float32) * jnp.float32(num_train_timesteps)).astype(jnp.int32)
  return jnp.clip(idx, 0, num_train_timesteps - 1)


def train_sigmas(schedule: FlowTrainSchedule, indices: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """The sigmas [B] of train indices [B] (the scripts' `get_sigmas(timesteps[indices])`) and
  the transformer's timestep input [B], the scripts' float32 `timesteps[indices] / 1000`
  (which the transformer then casts to its dtype)."""
  return schedule.sigmas[indices], schedule.transformer_timesteps[indices]


def draw_train_timesteps(key: jax.Array, schedule: FlowTrainSchedule, scheme: str,
                         shape: tuple[int, ...] = (), logit_mean: float = DEFAULT_LOGIT_MEAN,
                         logit_std: float = DEFAULT_LOGIT_STD,
                         mode_scale: float = DEFAULT_MODE_SCALE,
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The scripts' timestep draw from a PRNG key: draw, density, index, sigma.

  For ti_jax's per-example scheme, call it with one example's key and shape () (as
  `train_lib._example_noise` draws its timestep from `k_t`), so the draw is a function of
  (seed, step, example index) alone.

  Returns:
    (indices int32, sigmas float32, transformer timesteps float32), each of `shape`.
  """
  u = timestep_density(scheme, density_draw(key, scheme, shape), logit_mean, logit_std,
                       mode_scale)
  indices = train_indices(u, schedule.num_train_timesteps)
  return (indices,) + train_sigmas(schedule, indices)


def _per_example(values: jax.Array, ndim: int) -> jax.Array:
  """[B] values shaped [B, 1, ..., 1] to broadcast against an ndim-dimensional batch."""
  return jnp.asarray(values, jnp.float32).reshape((-1,) + (1,) * (ndim - 1))


def noisy_latents(x0: jax.Array, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
  """x_t = (1 - sigma) x0 + sigma noise, float32 (the scripts compute it in the latents' dtype).

  Args:
    x0: Normalised clean latents [B, ...].
    noise: Standard normal noise, shape of `x0`.
    sigmas: Per-example sigmas [B].
  """
  s = _per_example(sigmas, jnp.ndim(x0))
  return (1.0 - s) * jnp.asarray(x0, jnp.float32) + s * jnp.asarray(noise, jnp.float32)


def flow_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """The velocity the transformer is trained to predict: noise - x0, float32."""
  return jnp.asarray(noise, jnp.float32) - jnp.asarray(x0, jnp.float32)


def loss_weighting(scheme: str, sigmas: jax.Array) -> jax.Array:
  """Per-example loss weights [B] of diffusers' `compute_loss_weighting_for_sd3`.

  "sigma_sqrt": sigma^-2; "cosmap": 2 / (pi (1 - 2 sigma + 2 sigma^2)); any other scheme
  (the density ones and "none"): 1.
  """
  scheme = check_weighting_scheme(scheme)
  s = jnp.asarray(sigmas, jnp.float32)
  if scheme == "sigma_sqrt":
    return 1.0 / (s * s)
  if scheme == "cosmap":
    bottom = 1 - 2 * s + 2 * (s * s)
    return 2 / (jnp.float32(math.pi) * bottom)
  return jnp.ones_like(s)


def flow_loss(pred: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
  """The scripts' loss: per-example mean of weights * (pred - target)^2 in float32, then the
  batch mean."""
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  per_example = jnp.mean(err.reshape(err.shape[0], -1), axis=1)  # [B]
  return jnp.mean(jnp.asarray(weights, jnp.float32).reshape(-1) * per_example)


# ----------------------------------------------------------------------------- latents, guidance


def normalize_latents(latents: jax.Array, shift_factor: float, scaling_factor: float) -> jax.Array:
  """VAE latents to the transformer's space: (latents - shift_factor) * scaling_factor."""
  return (latents - shift_factor) * scaling_factor


def denormalize_latents(latents: jax.Array, shift_factor: float,
                        scaling_factor: float) -> jax.Array:
  """The inverse before decoding, as FluxPipeline: latents / scaling_factor + shift_factor."""
  return latents / scaling_factor + shift_factor


def guidance_values(guidance_embeds: bool, guidance_scale: float,
                    batch_size: int) -> jax.Array | None:
  """The transformer's `guidance` input: [B] float32 of guidance_scale for a guidance-distilled
  model (FLUX.1-dev, `guidance_embeds`; scripts and pipeline default 3.5), None otherwise
  (schnell). The transformer multiplies it by 1000 as it does the timestep."""
  if not guidance_embeds:
    return None
  return jnp.full((batch_size,), guidance_scale, jnp.float32)
