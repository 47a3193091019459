"""The samplers of Stable Diffusion as pure, jit-compatible JAX functions.

Each is built from a diffusers `scheduler/scheduler_config.json` dict and
reproduces the diffusers PyTorch scheduler that the same dict builds with
`SchedulerClass.from_config(cfg)`; the config is read (defaults, betas,
prediction type) as the training noise schedule reads it, by
`ti_jax/sampling/noise_schedule.py`.

`make_sampler(name, cfg, num_inference_steps)` gives a `Sampler` for DDIM
(eta=0), PNDM (PLMS, with or without the PRK warm-up), Euler discrete and
DPM-Solver++ 2M. All host-side work (timestep lists, per-step coefficient
tables) happens once in `make_sampler`; `Sampler.step` only gathers row
`step_index` of those tables and combines arrays, so the index may be a traced
int32 inside `lax.fori_loop` / `lax.scan`.

A sampling loop looks like::

  sampler = make_sampler("dpm++2m", cfg, 25)
  x = noise * sampler.init_noise_sigma
  def body(i, carry):
    x, state = carry
    eps = unet(sampler.scale_model_input(x, i), sampler.timesteps[i], text)
    return sampler.step(state, eps, i, x)
  x, _ = lax.fori_loop(0, sampler.num_steps, body, (x, sampler.init_state(x)))

`sampler.num_steps` is the number of model evaluations, which is not always
`num_inference_steps`: PNDM runs one extra (PLMS) or nine extra (PRK) steps,
and diffusers' "trailing" spacing yields one extra step for some counts
(e.g. 61). Config keys follow diffusers' `from_config` rules: a key the
scheduler class does not take is ignored, a missing key takes that class's
default (so Euler and DPM-Solver++ default to "linspace" spacing even when
the config, written for PNDM/DDIM, omits `timestep_spacing`), and a value the
class takes but does not use is ignored as there (DPM-Solver++ uses
`variance_type` only for a learned variance, so DDPMScheduler's "fixed_small"
passes). A config written by any diffusers scheduler class builds
every sampler that the diffusers class of its kind builds from it
(tests/sampling/test_scheduler_configs.py); a value a sampler cannot honour
raises a one-line `noise_schedule.SchedulerConfigError`, which `sampler_refusal`
completes with the samplers that can sample the config instead.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ti_jax.sampling import noise_schedule

# `__init__` defaults of the diffusers sampler classes (0.42), on top of the ones they all
# share. A key absent from a class's table is one that class ignores, exactly as
# `from_config` does.
_COMMON = noise_schedule.COMMON_DEFAULTS
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": dict(
        _COMMON, clip_sample=True, set_alpha_to_one=True, thresholding=False,
        clip_sample_range=1.0, timestep_spacing="leading", rescale_betas_zero_snr=False),
    # PNDMScheduler takes no rescale_betas_zero_snr, so such a key is ignored.
    "PNDMScheduler": dict(
        _COMMON, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading"),
    "EulerDiscreteScheduler": dict(
        _COMMON, interpolation_type="linear", use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, timestep_spacing="linspace",
        timestep_type="discrete", rescale_betas_zero_snr=False, final_sigmas_type="zero"),
    "DPMSolverMultistepScheduler": dict(
        _COMMON, solver_order=2, thresholding=False, algorithm_type="dpmsolver++",
        solver_type="midpoint", use_karras_sigmas=False, use_exponential_sigmas=False,
        use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
        final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None,
        timestep_spacing="linspace", rescale_betas_zero_snr=False, use_dynamic_shifting=False),
}


# The variance_type values of a UNet that also predicts its variance (extra output channels).
_LEARNED_VARIANCES = ("learned", "learned_range")
_SPACINGS = ("leading", "trailing", "linspace")


# ----------------------------------------------------------------------------- sampler


@struct.dataclass
class Sampler:
  """A deterministic sampler with all per-step quantities precomputed.

  Every table in `tables` has the step as its leading axis, so `step` and
  `scale_model_input` only gather with `step_index`, which may be traced.
  The dataclass is a pytree (arrays are leaves, the rest is static).
  """
  timesteps: jax.Array  # [N] UNet timestep per step: int32, float32 for "euler" (may be fractional)
  tables: dict[str, jax.Array]  # name -> [N] or [N, k] float32/bool per-step coefficients
  kind: str = struct.field(pytree_node=False)  # "ddim" | "pndm" | "euler" | "dpm++2m"
  prediction_type: str = struct.field(pytree_node=False)
  init_noise_sigma: float = struct.field(pytree_node=False)  # scale of the initial N(0, 1) latents
  clip_sample_range: float | None = struct.field(pytree_node=False, default=None)  # DDIM x0 clip

  @property
  def num_steps(self) -> int:
    """Number of model evaluations (length of `timesteps`)."""
    return int(self.timesteps.shape[0])

  def scale_model_input(self, sample: jax.Array, step_index: jax.Array | int) -> jax.Array:
    """Scales the current sample before it is fed to the UNet (only Euler rescales).

    Args:
      sample: Current latents [B, ...].
      step_index: Step number in [0, num_steps), int or traced int32 scalar.

    Returns:
      The UNet input, dtype of `sample`.
    """
    if self.kind != "euler":
      return sample
    scale = self.tables["input_divisor"][step_index]
    return (sample.astype(jnp.float32) / scale).astype(sample.dtype)

  def init_state(self, sample: jax.Array) -> dict[str, jax.Array]:
    """The multistep history before the first step (zeros; empty for one-step samplers).

    Args:
      sample: The initial latents (only shape is used).

    Returns:
      A dict pytree of float32 arrays, fit for a `lax.fori_loop` carry.
    """
    zeros = jnp.zeros(sample.shape, jnp.float32)
    if self.kind == "pndm":
      return {"ets": jnp.zeros((3,) + tuple(sample.shape), jnp.float32),  # [3, B, ...] newest first
              "cur_sample": zeros, "prk_sum": zeros}
    if self.kind == "dpm++2m":
      return {"prev_x0": zeros}
    return {}

  def step(self, state: dict[str, jax.Array], model_output: jax.Array,
           step_index: jax.Array | int, sample: jax.Array,
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One denoising step from `timesteps[step_index]` to the next noise level.

    Args:
      state: The pytree from `init_state` or the previous `step`.
      model_output: UNet output for `scale_model_input(sample, step_index)`,
        interpreted per `prediction_type`.
      step_index: Step number in [0, num_steps), int or traced int32 scalar.
        Steps must be taken in order, each exactly once.
      sample: Current latents [B, ...].

    Returns:
      (previous sample with the dtype of `sample`, new state).
    """
    x = sample.astype(jnp.float32)
    m = model_output.astype(jnp.float32)
    row = {k: v[step_index] for k, v in self.tables.items()}
    if self.kind == "pndm":
      prev, state = self._pndm_step(row, state, m, x)
    elif self.kind == "dpm++2m":
      prev, state = self._dpm_step(row, state, m, x)
    elif self.kind == "ddim":
      prev = self._ddim_step(row, m, x)
    else:
      prev = self._euler_step(row, m, x)
    return prev.astype(sample.dtype), state

  def _ddim_step(self, row: dict[str, jax.Array], m: jax.Array, x: jax.Array) -> jax.Array:
    """DDIM with eta=0: predict x0 and eps, then re-noise x0 to the previous alpha."""
    sa, sb = row["sqrt_alpha"], row["sqrt_one_minus_alpha"]
    if self.prediction_type == "epsilon":
      x0, eps = (x - sb * m) / sa, m
    elif self.prediction_type == "v_prediction":
      x0, eps = sa * x - sb * m, sa * m + sb * x
    else:
      x0, eps = m, (x - sa * m) / sb
    if self.clip_sample_range is not None:
      # As in diffusers, eps keeps the unclipped prediction (use_clipped_model_output=False).
      x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
    return row["sqrt_alpha_prev"] * x0 + row["sqrt_one_minus_alpha_prev"] * eps

  def _pndm_step(self, row: dict[str, jax.Array], state: dict[str, jax.Array], m: jax.Array,
                 x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PNDM: a multistep (PLMS) or Runge-Kutta (PRK) eps estimate and the PNDM transfer."""
    # Each step is a linear combination fixed by its row: the PRK warm-up, the
    # PLMS ramp-up (1st, 2nd, 3rd, 4th order) and skip_prk's repeated second
    # step differ only in weights and flags, so no branching on the index.
    ets, prk_sum, cur = state["ets"], state["prk_sum"], state["cur_sample"]
    w = row["weights"]  # [5]: model_output, prk_sum, ets[0], ets[1], ets[2]
    combined = w[0] * m + w[1] * prk_sum + w[2] * ets[0] + w[3] * ets[1] + w[4] * ets[2]
    base = jnp.where(row["use_cur_sample"], cur, x)
    if self.prediction_type == "v_prediction":
      combined = row["sqrt_alpha"] * combined + row["sqrt_one_minus_alpha"] * base
    prev = row["sample_coeff"] * base - row["eps_coeff"] * combined
    new_state = {
        "ets": jnp.where(row["push"], jnp.concatenate([m[None], ets[:2]], axis=0), ets),
        "cur_sample": jnp.where(row["set_cur_sample"], x, cur),
        "prk_sum": row["prk_keep"] * prk_sum + row["prk_add"] * m,
    }
    return prev, new_state

  def _euler_step(self, row: dict[str, jax.Array], m: jax.Array, x: jax.Array) -> jax.Array:
    """Euler on the probability-flow ODE in sigma (k-diffusion parametrisation)."""
    sigma = row["sigma"]
    if self.prediction_type == "epsilon":
      x0 = x - sigma * m
    elif self.prediction_type == "v_prediction":
      x0 = m * row["v_out"] + x / row["v_skip_divisor"]
    else:
      x0 = m
    derivative = (x - x0) / sigma
    return x + derivative * row["dt"]

  def _dpm_step(self, row: dict[str, jax.Array], state: dict[str, jax.Array], m: jax.Array,
                x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPM-Solver++ 2M in data (x0) prediction with the midpoint second-order correction."""
    alpha, sigma = row["alpha"], row["sigma"]
    if self.prediction_type == "epsilon":
      x0 = (x - sigma * m) / alpha
    elif self.prediction_type == "v_prediction":
      x0 = alpha * x - sigma * m
    else:
      x0 = m
    # First-order steps (the first and the last) have a zero history coefficient.
    prev = row["c_sample"] * x + row["c_x0"] * x0 + row["c_diff"] * (x0 - state["prev_x0"])
    return prev, {"prev_x0": x0}


_SAMPLER_ALIASES = {"ddim": "ddim", "pndm": "pndm", "plms": "pndm", "euler": "euler",
                    "dpmpp2m": "dpm++2m"}
SAMPLER_NAMES = ("ddim", "pndm", "euler", "dpm++2m")


def _normalise_name(name: str) -> str:
  """Maps spellings like "DPM++ 2M" or "dpmpp_2m" onto a key of `_BUILDERS`."""
  key = str(name).strip().lower().replace("++", "pp")
  for ch in " _-":
    key = key.replace(ch, "")
  if key not in _SAMPLER_ALIASES:
    raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(SAMPLER_NAMES)}")
  return _SAMPLER_ALIASES[key]


def check_sampler_name(name: str) -> str:
  """The kind of sampler `name` names (one of SAMPLER_NAMES, spellings as `make_sampler`
  takes them); a ValueError listing the known names for any other.

  The name alone: whether that sampler can use a model's scheduler config is known
  only with the config (`make_sampler`). An empty config is no stand-in for it, since
  the class defaults it takes differ from every Stable Diffusion config (PNDMScheduler's
  default PRK warm-up refuses fewer than 4 steps, which SD 1.x's config skips).
  """
  return _normalise_name(name)


def _check_spacing(rc: Mapping[str, Any]) -> str:
  """The config's timestep_spacing, validated."""
  spacing = rc["timestep_spacing"]
  if spacing not in _SPACINGS:
    raise noise_schedule.unsupported("timestep_spacing", spacing,
                                     f"expected one of {', '.join(_SPACINGS)}")
  return spacing


def _require(rc: Mapping[str, Any], field: str, ok: Any, why: str) -> None:
  """Raises unless rc[field] is `ok`; for ok=False any falsy value passes (diffusers allows None)."""
  value = rc[field]
  if bool(value) if ok is False else value != ok:
    raise noise_schedule.unsupported(field, value, why)


def _check_timestep_range(timesteps: np.ndarray, rc: Mapping[str, Any], s: int) -> None:
  """Raises where diffusers would index alphas_cumprod past its end (e.g. 1000 "leading" steps)."""
  t_train = rc["num_train_timesteps"]
  if timesteps.max() >= t_train:
    raise noise_schedule.SchedulerConfigError(
        f"scheduler config: num_inference_steps={s} with timestep_spacing="
        f"{rc['timestep_spacing']!r} and steps_offset={rc['steps_offset']} reaches timestep "
        f"{int(timesteps.max())} >= num_train_timesteps={t_train}")


def _descending_grid(spacing: str, t: int, s: int, offset: int) -> np.ndarray:
  """The float64 timestep grid shared by DDIM, PNDM and Euler, largest first (not yet rounded)."""
  if spacing == "linspace":
    return np.linspace(0, t - 1, s)[::-1]
  if spacing == "leading":
    return (np.arange(0, s) * (t // s)).round()[::-1] + offset
  # "trailing": a float stride, so for some s (e.g. 61) numpy's arange yields s + 1 points.
  return np.round(np.arange(t, 0, -t / s)) - 1


def _ddim(rc: dict[str, Any], s: int) -> Sampler:
  """The sampler of DDIMScheduler (eta=0) for a resolved config and S steps."""
  pred = noise_schedule.check_prediction_type(rc, ("epsilon", "v_prediction", "sample"))
  _require(rc, "thresholding", False, "dynamic thresholding is not implemented")
  t_train = rc["num_train_timesteps"]
  ts = _descending_grid(_check_spacing(rc), t_train, s, rc["steps_offset"]).round().astype(np.int64)
  acp = noise_schedule.alphas_cumprod(rc)
  final = np.float32(1.0) if rc["set_alpha_to_one"] else acp[0]
  # diffusers steps to t - T // S whatever the spacing, not to the next listed timestep.
  prev_ts = ts - t_train // s
  _check_timestep_range(ts, rc, s)
  a = acp[ts].astype(np.float64)
  a_prev = np.where(prev_ts >= 0, acp[np.maximum(prev_ts, 0)], final).astype(np.float64)
  tables = {"sqrt_alpha": np.sqrt(a), "sqrt_one_minus_alpha": np.sqrt(1.0 - a),
            "sqrt_alpha_prev": np.sqrt(a_prev), "sqrt_one_minus_alpha_prev": np.sqrt(1.0 - a_prev)}
  clip = float(rc["clip_sample_range"]) if rc["clip_sample"] else None
  return _finish("ddim", ts.astype(np.int32), tables, pred, 1.0, clip)


def _pndm(rc: dict[str, Any], s: int) -> Sampler:
  """The sampler of PNDMScheduler (PLMS, with the PRK warm-up unless skip_prk_steps) for a resolved config and S steps."""
  pred = noise_schedule.check_prediction_type(rc, ("epsilon", "v_prediction"))
  t_train = rc["num_train_timesteps"]
  base = _descending_grid(_check_spacing(rc), t_train, s, rc["steps_offset"])[::-1]
  if rc["timestep_spacing"] == "linspace":
    base = base.round()
  ratio = t_train // s
  one, two, three, four = ([1.0], [1.5, -0.5], [23 / 12, -16 / 12, 5 / 12],
                           [55 / 24, -59 / 24, 37 / 24, -9 / 24])
  rows = []  # (unet t, t for alpha, t for alpha_prev, weights, prk keep/add, push, set_cur, use_cur)

  def plms_weights(order: list[float]) -> list[float]:
    return [order[0], 0.0] + order[1:] + [0.0] * (4 - len(order))

  if rc["skip_prk_steps"]:
    # diffusers' list repeats the second timestep; the step at index 1 then redoes
    # step 0 (from the same start sample, t+ratio -> t) with the averaged output.
    ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].astype(np.int64)
    for c, t in enumerate(ts):
      if c == 1:
        rows.append((t, t + ratio, t, [0.5, 0.0, 0.5, 0.0, 0.0], (0, 0), False, False, True))
        continue
      order = one if c == 0 else (two if c == 2 else (three if c == 3 else four))
      rows.append((t, t, t - ratio, plms_weights(order), (0, 0), True, c == 0, False))
  else:
    if len(base) < 4:
      raise noise_schedule.unsupported("skip_prk_steps", False,
                                       "the PRK warm-up needs num_inference_steps >= 4")
    prk = (np.repeat(base[-4:], 2) + np.tile([0, ratio // 2], 4))[:-1].repeat(2)[1:-1][::-1]
    ts = np.concatenate([prk, base[:-3][::-1]]).astype(np.int64)
    for c, t in enumerate(ts):
      if c < len(prk):
        # Runge-Kutta: four evaluations from the same start sample, weights 1/6, 1/3, 1/3, 1/6.
        r, t_start = c % 4, ts[c // 4 * 4]
        t_prev = t - (0 if c % 2 else ratio // 2)
        weights = [1 / 6, 1.0, 0.0, 0.0, 0.0] if r == 3 else [1.0, 0.0, 0.0, 0.0, 0.0]
        prk_update = {0: (1.0, 1 / 6), 1: (1.0, 1 / 3), 2: (1.0, 1 / 3), 3: (0.0, 0.0)}[r]
        rows.append((t, t_start, t_prev, weights, prk_update, r == 0, r == 0, r != 0))
      else:
        rows.append((t, t, t - ratio, plms_weights(four), (0, 0), True, False, False))

  acp = noise_schedule.alphas_cumprod(rc)
  final = np.float32(1.0) if rc["set_alpha_to_one"] else acp[0]
  unet_t, t_cur, t_prev, weights, prk_upd, push, set_cur, use_cur = map(np.asarray, zip(*rows))
  _check_timestep_range(t_cur, rc, s)
  a = acp[t_cur].astype(np.float64)
  a_prev = np.where(t_prev >= 0, acp[np.maximum(t_prev, 0)], final).astype(np.float64)
  # x_prev = sqrt(a_prev / a) x - (a_prev - a) / (a sqrt(1 - a_prev) + sqrt(a (1 - a) a_prev)) eps
  denom = a * np.sqrt(1.0 - a_prev) + np.sqrt(a * (1.0 - a) * a_prev)
  tables = {
      "sqrt_alpha": np.sqrt(a), "sqrt_one_minus_alpha": np.sqrt(1.0 - a),
      "sample_coeff": np.sqrt(a_prev / a), "eps_coeff": (a_prev - a) / denom,
      "weights": weights.astype(np.float64),  # [N, 5]
      "prk_keep": prk_upd[:, 0].astype(np.float64), "prk_add": prk_upd[:, 1].astype(np.float64),
      "push": push.astype(bool), "set_cur_sample": set_cur.astype(bool),
      "use_cur_sample": use_cur.astype(bool),
  }
  return _finish("pndm", unet_t.astype(np.int32), tables, pred, 1.0)


def _train_sigmas(acp: np.ndarray) -> np.ndarray:
  """k-diffusion sigmas sqrt((1 - a) / a) [T], float32 as torch computes them."""
  return np.sqrt((np.float32(1.0) - acp) / acp).astype(np.float32)


def _euler(rc: dict[str, Any], s: int) -> Sampler:
  """The sampler of EulerDiscreteScheduler (no churn, linear sigma interpolation) for a resolved config and S steps."""
  pred = noise_schedule.check_prediction_type(rc, ("epsilon", "v_prediction", "sample"))
  _require(rc, "interpolation_type", "linear", "only 'linear' is implemented")
  for field in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
    _require(rc, field, False, "only the default sigma spacing is implemented")
  _require(rc, "timestep_type", "discrete", "only 'discrete' is implemented")
  _require(rc, "final_sigmas_type", "zero", "only 'zero' is implemented")
  spacing = _check_spacing(rc)
  ts = _descending_grid(spacing, rc["num_train_timesteps"], s, rc["steps_offset"])
  # Euler keeps linspace timesteps fractional (the UNet sees e.g. 957.375).
  ts = ts.astype(np.float32) if spacing == "linspace" else ts.round().astype(np.float32)
  train_sigmas = _train_sigmas(noise_schedule.alphas_cumprod(rc, zero_snr_floor=True))
  sig = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
  sig = np.concatenate([sig, [0.0]]).astype(np.float32)  # [N + 1]
  sigma, sigma_next = sig[:-1].astype(np.float64), sig[1:].astype(np.float64)
  tables = {"sigma": sigma, "dt": sigma_next - sigma, "input_divisor": np.sqrt(sigma ** 2 + 1.0),
            "v_out": -sigma / np.sqrt(sigma ** 2 + 1.0), "v_skip_divisor": sigma ** 2 + 1.0}
  max_sigma = np.float32(sig.max())
  init = max_sigma if spacing in ("linspace", "trailing") else np.sqrt(max_sigma ** 2 + np.float32(1))
  return _finish("euler", ts, tables, pred, float(init))


def _dpmpp_2m(rc: dict[str, Any], s: int) -> Sampler:
  """The sampler of DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint) for a resolved config and S steps."""
  pred = noise_schedule.check_prediction_type(rc, ("epsilon", "v_prediction", "sample"))
  # diffusers silently maps these onto DPM-Solver++ / midpoint.
  algorithm = "dpmsolver++" if rc["algorithm_type"] == "deis" else rc["algorithm_type"]
  solver = "midpoint" if rc["solver_type"] in ("logrho", "bh1", "bh2") else rc["solver_type"]
  if algorithm != "dpmsolver++":
    raise noise_schedule.unsupported("algorithm_type", rc["algorithm_type"],
                                     "the dpm++2m sampler needs 'dpmsolver++'")
  if solver != "midpoint":
    raise noise_schedule.unsupported("solver_type", rc["solver_type"],
                                     "the dpm++2m sampler needs 'midpoint'")
  _require(rc, "solver_order", 2, "the dpm++2m sampler is second order")
  _require(rc, "thresholding", False, "dynamic thresholding is not implemented")
  # diffusers reads variance_type only to drop a learned variance's extra output channels,
  # and only for epsilon prediction; any other value (DDPMScheduler writes "fixed_small",
  # UnCLIPScheduler "fixed_small_log") it ignores, and so does this sampler.
  if pred == "epsilon" and rc["variance_type"] in _LEARNED_VARIANCES:
    raise noise_schedule.unsupported("variance_type", rc["variance_type"],
                                     "learned variance outputs are not supported")
  for field in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
    _require(rc, field, False, "only the default sigma spacing is implemented")
  # A zero final sigma makes the last step first order whatever lower_order_final says.
  _require(rc, "final_sigmas_type", "zero", "only 'zero' is implemented")
  spacing = _check_spacing(rc)

  t_train = rc["num_train_timesteps"]
  acp = noise_schedule.alphas_cumprod(rc, zero_snr_floor=True)
  lambdas = (np.log(np.sqrt(acp)) - np.log(np.sqrt(np.float32(1.0) - acp))).astype(np.float32)
  clipped = int(np.searchsorted(lambdas[::-1], rc["lambda_min_clipped"]))
  last = t_train - clipped
  # S + 1 grid points with the final (t = 0 side) one dropped.
  if spacing == "linspace":
    ts = np.linspace(0, last - 1, s + 1).round()[::-1][:-1]
  elif spacing == "leading":
    ts = (np.arange(0, s + 1) * (last // (s + 1))).round()[::-1][:-1] + rc["steps_offset"]
  else:
    ts = np.arange(last, 0, -t_train / s).round() - 1
  ts = ts.astype(np.int64)
  _check_timestep_range(ts, rc, s)
  if len(np.unique(ts)) != len(ts):
    # diffusers silently produces NaNs here (a zero log-SNR step divides by zero).
    raise noise_schedule.SchedulerConfigError(
        f"scheduler config: num_inference_steps={s} with timestep_spacing="
        f"{rc['timestep_spacing']!r} repeats timesteps, which DPM-Solver cannot step between")
  train_sigmas = _train_sigmas(acp)
  sig = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
  sig = np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)  # [N + 1]
  n = len(ts)

  alpha = 1.0 / np.sqrt(sig ** 2 + 1.0)  # [N + 1]
  sigma = sig * alpha
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sigma)  # +inf at the final sigma = 0
  c_sample, c_x0, c_diff = np.zeros(n), np.ones(n), np.zeros(n)
  for i in range(n):
    if sig[i + 1] == 0.0:
      continue  # x_prev = x0 exactly: the coefficients above
    h = lam[i + 1] - lam[i]
    c_sample[i] = sigma[i + 1] / sigma[i]
    c_x0[i] = -alpha[i + 1] * np.expm1(-h)
    if 0 < i < n - 1:  # second order (midpoint): the first and last steps are first order
      r0 = (lam[i] - lam[i - 1]) / h
      c_diff[i] = 0.5 * c_x0[i] / r0
  tables = {"alpha": alpha[:-1], "sigma": sigma[:-1], "c_sample": c_sample, "c_x0": c_x0,
            "c_diff": c_diff}
  return _finish("dpm++2m", ts.astype(np.int32), tables, pred, 1.0)


def _finish(kind: str, timesteps: np.ndarray, tables: dict[str, np.ndarray], pred: str,
            init_noise_sigma: float, clip_sample_range: float | None = None) -> Sampler:
  """Packs float64 numpy tables into a Sampler as float32 (bool flags stay bool)."""
  jt = {k: jnp.asarray(v if v.dtype == bool else v.astype(np.float32)) for k, v in tables.items()}
  return Sampler(timesteps=jnp.asarray(timesteps), tables=jt, kind=kind, prediction_type=pred,
                 init_noise_sigma=float(init_noise_sigma), clip_sample_range=clip_sample_range)


_BUILDERS = {"ddim": ("DDIMScheduler", _ddim), "pndm": ("PNDMScheduler", _pndm),
             "euler": ("EulerDiscreteScheduler", _euler),
             "dpm++2m": ("DPMSolverMultistepScheduler", _dpmpp_2m)}


def make_sampler(name: str, config: Mapping[str, Any], num_inference_steps: int) -> Sampler:
  """Builds a sampler matching the diffusers scheduler of that kind made with `from_config(config)`.

  Args:
    name: "ddim", "pndm" (alias "plms"), "euler" or "dpm++2m" (also spelled
      "dpmpp_2m", "dpm++ 2m", ...). Case, spaces, "_" and "-" are ignored.
    config: A diffusers scheduler config dict, of any scheduler class.
    num_inference_steps: The requested number of denoising steps, as passed to
      diffusers' `set_timesteps`.

  Returns:
    The `Sampler`; iterate `step_index` over `range(sampler.num_steps)`.

  Raises:
    ValueError: Unknown name, bad step count, or a config value the sampler
      does not support (a `noise_schedule.SchedulerConfigError` naming the field).
  """
  kind = _normalise_name(name)
  class_name, build = _BUILDERS[kind]
  rc = noise_schedule.resolve_config(config, _CLASS_DEFAULTS[class_name])
  s = num_inference_steps
  if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= s <= rc["num_train_timesteps"]:
    raise ValueError(f"num_inference_steps={s!r} must be an integer in "
                     f"[1, num_train_timesteps={rc['num_train_timesteps']}]")
  return build(rc, int(s))


def usable_samplers_hint(config: Mapping[str, Any], num_inference_steps: int, flag: str) -> str:
  """The end of a refusal: which samplers can sample `config` at that step count instead.

  Args:
    config: The model's scheduler config dict.
    num_inference_steps: The requested number of steps.
    flag: How the user picks a sampler, e.g. "--scheduler" or "config.validation_scheduler".

  Returns:
    "; FLAG NAME, NAME or NAME can sample this model", or, when none can, a clause
    saying so.
  """
  usable = []
  for name in SAMPLER_NAMES:
    try:
      make_sampler(name, config, num_inference_steps)
    except ValueError:
      continue
    usable.append(name)
  if not usable:
    return f"; no ti_jax sampler ({', '.join(SAMPLER_NAMES)}) can sample this model's config"
  names = usable[0] if len(usable) == 1 else f"{', '.join(usable[:-1])} or {usable[-1]}"
  return f"; {flag} {names} can sample this model"


def sampler_refusal(error: ValueError, config: Mapping[str, Any], num_inference_steps: int,
                    flag: str) -> str:
  """The one-line refusal of a sampler that `make_sampler` would not build: its error, then
  which samplers can sample `config` at that step count instead (`usable_samplers_hint`).

  It takes the error rather than building the sampler itself because its callers reach
  `make_sampler` differently: sample and evaluate through `generation.ImageGenerator`, whose
  own checks (image size, guidance rescale) come first; validation and edit directly. Each
  wraps the line in its own error type and decides which errors get it: validation every
  ValueError of `make_sampler`, sample, edit and evaluate a `SchedulerConfigError` only.

  Args:
    error: What `make_sampler(name, config, num_inference_steps)` raised.
    config: The model's scheduler config dict.
    num_inference_steps: The requested number of steps.
    flag: How the user picks a sampler, e.g. "--scheduler" or "config.validation_scheduler".

  Returns:
    "ERROR; FLAG NAME or NAME can sample this model" (or, when none can, a clause saying so).
  """
  return f"{error}{usable_samplers_hint(config, num_inference_steps, flag)}"
