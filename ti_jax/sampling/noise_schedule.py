"""The training noise schedule, and the scheduler-config reading it shares with the samplers.

Built from a diffusers `scheduler/scheduler_config.json` dict, it reproduces the
diffusers PyTorch scheduler that the same dict builds with
`SchedulerClass.from_config(cfg)`: `noise_schedule_from_config` gives a
`NoiseSchedule` (the `alphas_cumprod` table of DDPMScheduler) for `add_noise`,
`get_velocity` and `training_target`, all traceable inside a jit/pmap training
step.

The samplers (`ti_jax/sampling/schedulers.py`) read the same dicts through this
module, so that both halves take a config the same way: `resolve_config` follows
diffusers' `from_config` rules (a key the class does not take is ignored, a
missing key takes that class's default), `alphas_cumprod` is every class's
beta schedule, bit for bit, and a value a class cannot honour raises a one-line
`SchedulerConfigError` (built by `unsupported`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


class SchedulerConfigError(ValueError):
  """A scheduler config value is invalid or unsupported; the message is one line naming the field."""


# `__init__` defaults that every diffusers class (0.42) this package reads shares; each
# class's own table (DDPMScheduler's below, the samplers' in schedulers.py) adds its
# keys. A key absent from a class's table is one that class ignores, exactly as
# `from_config` does.
COMMON_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "steps_offset": 0,
}
_DDPM_DEFAULTS = dict(COMMON_DEFAULTS, rescale_betas_zero_snr=False)

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def unsupported(field: str, value: Any, expected: str) -> SchedulerConfigError:
  """The one-line error for an unsupported `field=value`."""
  return SchedulerConfigError(f"scheduler config: {field}={value!r} is not supported; {expected}")


def resolve_config(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
  """The values a diffusers class whose `__init__` defaults are `defaults` would use for `cfg`.

  Args:
    cfg: A diffusers scheduler config dict (any scheduler class).
    defaults: The class's table: `COMMON_DEFAULTS` plus the keys it takes.

  Returns:
    `defaults` with the values `cfg` sets; the shared fields checked.

  Raises:
    SchedulerConfigError: `cfg` is no dict, or a shared field is malformed.
  """
  if not isinstance(cfg, Mapping):
    raise SchedulerConfigError(f"scheduler config must be a dict, got {type(cfg).__name__}")
  # diffusers drops keys listed in `_use_default_values` so each class uses its own default.
  defaulted = set(cfg.get("_use_default_values") or ())
  out = dict(defaults)
  for key in out:
    if key in cfg and key not in defaulted:
      out[key] = cfg[key]
  t = out["num_train_timesteps"]
  if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 2:
    raise unsupported("num_train_timesteps", t, "expected an integer >= 2")
  out["num_train_timesteps"] = int(t)
  for key in ("beta_start", "beta_end"):
    if isinstance(out[key], bool) or not isinstance(out[key], (int, float, np.floating)):
      raise unsupported(key, out[key], "expected a number")
  if isinstance(out["steps_offset"], bool) or not isinstance(out["steps_offset"], (int, np.integer)):
    raise unsupported("steps_offset", out["steps_offset"], "expected an integer")
  return out


# ----------------------------------------------------------------------------- betas


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
  """`torch.linspace(start, end, n, dtype=torch.float32)` bit for bit, in numpy.

  torch's CPU kernel takes a float32 step, fills the first half forwards from
  `start` and the second half backwards from `end`, each element with one
  fused multiply-add. numpy's float64 linspace cast to float32 differs in the
  last bit for ~20% of SD's betas, which then shows up in alphas_cumprod.
  """
  start32, end32 = np.float32(start), np.float32(end)
  if n == 1:
    return np.array([start32], np.float32)
  step = np.float64((end32 - start32) / np.float32(n - 1))
  i = np.arange(n, dtype=np.float64)
  # float32 step * integer < 2**53 is exact in float64, so one rounding here is the fma's.
  forward = (np.float64(start32) + step * i).astype(np.float32)
  backward = (np.float64(end32) - step * (n - 1 - i)).astype(np.float32)
  return np.where(i < n // 2, forward, backward)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
  """Betas of the "squaredcos_cap_v2" (Glide cosine) schedule, in float64 then float32."""
  def alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  betas = [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
  return np.asarray(betas, np.float64).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Rescales float32 betas so the last timestep has zero SNR (arXiv 2305.08891, Alg. 1)."""
  alphas = np.float32(1.0) - betas
  sqrt_ab = np.sqrt(np.cumprod(alphas.astype(np.float64)).astype(np.float32))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * (first / (first - last))
  alpha_bar = sqrt_ab ** 2
  alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
  return (np.float32(1.0) - alphas).astype(np.float32)


def alphas_cumprod(rc: Mapping[str, Any], zero_snr_floor: bool = False) -> np.ndarray:
  """The float32 `alphas_cumprod` [T] of a resolved config, as the diffusers class computes it.

  Args:
    rc: Output of `resolve_config`.
    zero_snr_floor: Euler and DPM-Solver replace a zero final alphas_cumprod by
      2**-24 so that sigma stays finite; DDPM/DDIM do not.

  Returns:
    float32 numpy array [num_train_timesteps].
  """
  t = rc["num_train_timesteps"]
  if rc["trained_betas"] is not None:
    betas = np.asarray(rc["trained_betas"], np.float32).reshape(-1)
    if betas.shape[0] != t:
      raise unsupported("trained_betas", f"<{betas.shape[0]} values>",
                        f"expected num_train_timesteps={t} values")
  else:
    schedule = rc["beta_schedule"]
    if schedule == "linear":
      betas = _torch_linspace_f32(rc["beta_start"], rc["beta_end"], t)
    elif schedule == "scaled_linear":
      betas = _torch_linspace_f32(rc["beta_start"] ** 0.5, rc["beta_end"] ** 0.5, t) ** 2
    elif schedule == "squaredcos_cap_v2":
      betas = _cosine_betas(t)
    else:
      raise unsupported("beta_schedule", schedule, f"expected one of {', '.join(_BETA_SCHEDULES)}")
  if rc.get("rescale_betas_zero_snr"):
    betas = _rescale_zero_terminal_snr(betas)
  alphas = np.float32(1.0) - betas
  # torch's CPU cumprod accumulates float32 in float64; doing the same keeps every value bit-equal.
  acp = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
  if zero_snr_floor and rc.get("rescale_betas_zero_snr"):
    acp[-1] = np.float32(2.0 ** -24)
  return acp


def check_prediction_type(rc: Mapping[str, Any], allowed: tuple[str, ...]) -> str:
  """The resolved config's prediction_type, if it is one of `allowed` (the class's kinds)."""
  pred = rc["prediction_type"]
  if pred not in allowed:
    raise unsupported("prediction_type", pred, f"expected one of {', '.join(allowed)}")
  return pred


# ----------------------------------------------------------------------------- training


@struct.dataclass
class NoiseSchedule:
  """The forward (noising) process of a diffusion model, as DDPMScheduler defines it.

  A pytree: `alphas_cumprod` is a leaf, the other fields are static, so a
  schedule can be closed over or passed into jit/pmap.
  """
  alphas_cumprod: jax.Array  # [T] float32, product of (1 - beta) up to each timestep
  num_train_timesteps: int = struct.field(pytree_node=False)
  prediction_type: str = struct.field(pytree_node=False)  # "epsilon" | "v_prediction" | "sample"


def noise_schedule_from_config(cfg: Mapping[str, Any]) -> NoiseSchedule:
  """Builds the training noise schedule that `DDPMScheduler.from_config(cfg)` would use.

  Args:
    cfg: A diffusers scheduler config dict (any scheduler class).

  Returns:
    The `NoiseSchedule`.

  Raises:
    SchedulerConfigError: (a ValueError) for an unsupported beta schedule,
      prediction type or malformed value.
  """
  rc = resolve_config(cfg, _DDPM_DEFAULTS)
  pred = check_prediction_type(rc, ("epsilon", "v_prediction", "sample"))
  return NoiseSchedule(alphas_cumprod=jnp.asarray(alphas_cumprod(rc)),
                       num_train_timesteps=rc["num_train_timesteps"], prediction_type=pred)


def _alpha_sigma(schedule: NoiseSchedule, timesteps: jax.Array, ndim: int,
                 ) -> tuple[jax.Array, jax.Array]:
  """sqrt(alphas_cumprod[t]) and sqrt(1 - alphas_cumprod[t]), shaped [B, 1, ..., 1] to broadcast."""
  acp = schedule.alphas_cumprod[jnp.asarray(timesteps).reshape(-1)]  # [B]
  shape = (-1,) + (1,) * (ndim - 1)
  return jnp.sqrt(acp).reshape(shape), jnp.sqrt(1.0 - acp).reshape(shape)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array,
              timesteps: jax.Array) -> jax.Array:
  """Noises clean samples to the given timesteps: sqrt(a_t) x0 + sqrt(1 - a_t) noise.

  Args:
    schedule: The noise schedule.
    x0: Clean samples [B, ...].
    noise: Standard normal noise, same shape as `x0`.
    timesteps: Integer timesteps [B] in [0, num_train_timesteps).

  Returns:
    float32 noisy samples, shape of `x0`.
  """
  x0 = jnp.asarray(x0, jnp.float32)
  a, s = _alpha_sigma(schedule, timesteps, x0.ndim)
  return a * x0 + s * jnp.asarray(noise, jnp.float32)


def get_velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array,
                 timesteps: jax.Array) -> jax.Array:
  """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0 (Salimans & Ho, 2022).

  Args:
    schedule: The noise schedule.
    x0: Clean samples [B, ...].
    noise: The noise used by `add_noise`, same shape as `x0`.
    timesteps: Integer timesteps [B].

  Returns:
    float32 velocity, shape of `x0`.
  """
  x0 = jnp.asarray(x0, jnp.float32)
  a, s = _alpha_sigma(schedule, timesteps, x0.ndim)
  return a * jnp.asarray(noise, jnp.float32) - s * x0


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array,
                    timesteps: jax.Array) -> jax.Array:
  """What the UNet should predict for `add_noise(schedule, x0, noise, timesteps)`.

  Args:
    schedule: The noise schedule; its `prediction_type` picks the target.
    x0: Clean samples [B, ...].
    noise: The noise used by `add_noise`, same shape as `x0`.
    timesteps: Integer timesteps [B].

  Returns:
    float32 noise (epsilon), velocity (v_prediction) or x0 (sample).
  """
  if schedule.prediction_type == "epsilon":
    return jnp.asarray(noise, jnp.float32)
  if schedule.prediction_type == "v_prediction":
    return get_velocity(schedule, x0, noise, timesteps)
  if schedule.prediction_type == "sample":
    return jnp.asarray(x0, jnp.float32)
  raise unsupported("prediction_type", schedule.prediction_type,
                    "expected epsilon, v_prediction or sample")
