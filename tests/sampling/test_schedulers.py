"""Parity tests for ti_jax.sampling.schedulers and noise_schedule against diffusers'
PyTorch schedulers (CPU).

Every comparison builds the diffusers scheduler with `Class.from_config(cfg)`
from the same config dict. Sampling loops run the JAX side under `jax.jit`
with `lax.scan`, so `step_index` is a traced int32 and the whole trajectory
is compared, not just the final sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
# diffusers 0.42 calls np.array on torch tensors in set_timesteps.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
diffusers = pytest.importorskip("diffusers")

from conftest import record_parity  # noqa: E402

from ti_jax.sampling import schedulers  # noqa: E402
from ti_jax.sampling.noise_schedule import (  # noqa: E402
  SchedulerConfigError,
  add_noise,
  get_velocity,
  noise_schedule_from_config,
  training_target,
)
from ti_jax.sampling.schedulers import make_sampler  # noqa: E402

# The public SD 1.5 (PNDM, epsilon) and SD 2.1 (DDIM, v-prediction) scheduler configs.
SD15 = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    "trained_betas": None,
}
SD21 = dict(SD15, _class_name="DDIMScheduler", prediction_type="v_prediction",
            timestep_spacing="leading")

TORCH_CLASSES = {
    "ddim": diffusers.DDIMScheduler, "pndm": diffusers.PNDMScheduler,
    "euler": diffusers.EulerDiscreteScheduler, "dpm++2m": diffusers.DPMSolverMultistepScheduler,
}
SAMPLERS = tuple(TORCH_CLASSES)

# Relative max-abs error allowed between the JAX and PyTorch trajectories
# (max |jax - torch| / max |torch| at each step, worst step reported). Both run
# in float32; the differences are last-bit roundings of per-step coefficients
# (float64 tables on the JAX side; torch's float32 CPU sqrt is itself not
# correctly rounded for ~1 in 5 inputs) and of cos().
LOOP_TOL = 1e-5
# Euler's first step from a huge sigma (2e4 for the cosine schedule, 4096 with
# zero terminal SNR) computes a sample of size ~10 as the difference of terms
# of size ~1e5, so either side's one-ulp coefficient error is amplified ~1e3x
# there; neither float32 result is more accurate than this.
ILL_CONDITIONED_TOL = 1e-3
TRAIN_TOL = 1e-6


def _cfg(base: dict, **overrides) -> dict:
  """`base` with `overrides`; an override of None deletes the key (the class default applies)."""
  cfg = dict(base, **overrides)
  return {k: v for k, v in cfg.items() if not (k in overrides and v is None)}


def _torch_scheduler(name: str, cfg: dict, steps: int):
  sched = TORCH_CLASSES[name].from_config(cfg)
  sched.set_timesteps(steps)
  return sched


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


# ----------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("steps", [4, 10, 25, 50, 61])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", None])
@pytest.mark.parametrize("name", SAMPLERS)
def test_timesteps_and_init_sigma_match_diffusers(name, spacing, steps):
  # spacing None leaves the key out: DDIM/PNDM then default to "leading" but
  # Euler/DPM-Solver to "linspace", and 61 "trailing" steps give 62 timesteps.
  cfg = _cfg(SD15, timestep_spacing=spacing)
  sched = _torch_scheduler(name, cfg, steps)
  sampler = make_sampler(name, cfg, steps)
  want = sched.timesteps.numpy()
  got = np.asarray(sampler.timesteps)
  assert got.shape == want.shape and sampler.num_steps == len(want)
  np.testing.assert_array_equal(got, want.astype(got.dtype))
  assert got.astype(np.float64).tolist() == want.astype(np.float64).tolist()
  assert sampler.init_noise_sigma == pytest.approx(float(sched.init_noise_sigma), rel=1e-7)


@pytest.mark.parametrize("steps", [4, 10, 25, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_pndm_prk_timesteps_match_diffusers(spacing, steps):
  cfg = _cfg(SD21, skip_prk_steps=False, timestep_spacing=spacing)
  sched = _torch_scheduler("pndm", cfg, steps)
  np.testing.assert_array_equal(np.asarray(make_sampler("pndm", cfg, steps).timesteps),
                                sched.timesteps.numpy())


def test_euler_linspace_timesteps_are_fractional_floats():
  sampler = make_sampler("euler", SD15, 25)
  assert sampler.timesteps.dtype == jnp.float32
  assert np.any(np.asarray(sampler.timesteps) % 1 != 0)


# ----------------------------------------------------------------------------- sampling loops


def _fake_model(x, t):
  """A deterministic stand-in for the UNet; the same formula runs on both sides."""
  return 0.3 * x + 0.1 * (jnp.cos(t / 100.0) if isinstance(x, jax.Array) else torch.cos(t / 100.0))


@jax.jit
def _jax_trajectory(sampler: schedulers.Sampler, x: jax.Array) -> jax.Array:
  """Every intermediate sample [N, B, ...] of a full loop, with a traced step index."""
  def body(carry, i):
    x, state = carry
    t = sampler.timesteps[i].astype(jnp.float32)
    out = _fake_model(sampler.scale_model_input(x, i), t)
    x, state = sampler.step(state, out, i, x)
    return (x, state), x
  _, xs = jax.lax.scan(body, (x, sampler.init_state(x)), jnp.arange(sampler.num_steps))
  return xs


def _torch_trajectory(sched, noise: np.ndarray) -> np.ndarray:
  x = torch.from_numpy(noise) * sched.init_noise_sigma
  xs = []
  for t in sched.timesteps:
    out = _fake_model(sched.scale_model_input(x, t), t.to(torch.float32))
    x = sched.step(out, t, x).prev_sample
    xs.append(x.numpy())
  return np.stack(xs)


def _compare_loops(name: str, cfg: dict, steps: int, label: str, tol: float = LOOP_TOL) -> None:
  noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)  # [B, h, w, 4]
  want = _torch_trajectory(_torch_scheduler(name, cfg, steps), noise)
  sampler = make_sampler(name, cfg, steps)
  got = np.asarray(_jax_trajectory(sampler, jnp.asarray(noise) * sampler.init_noise_sigma))
  assert got.shape == want.shape
  assert np.all(np.isfinite(want))
  err = max(_rel_err(g, w) for g, w in zip(got, want))
  record_parity(f"schedulers {label}", err, tol)


LOOP_CASES = [
    (name, pred, spacing, steps)
    for name in SAMPLERS
    for pred in ("epsilon", "v_prediction")
    # 7 and 35 do not divide 1000, so T // S differs from round(T / S).
    for spacing, steps in (("leading", 50), ("trailing", 7), ("linspace", 35))
]


@pytest.mark.parametrize("name,pred,spacing,steps", LOOP_CASES)
def test_sampling_loop_matches_diffusers_at_every_step(name, pred, spacing, steps):
  cfg = _cfg(SD15, prediction_type=pred, timestep_spacing=spacing)
  _compare_loops(name, cfg, steps, f"{name} {pred} {spacing} {steps}")


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [4, 25])
def test_pndm_with_prk_warmup_matches_diffusers(pred, steps):
  cfg = _cfg(SD15, prediction_type=pred, skip_prk_steps=False)
  _compare_loops("pndm", cfg, steps, f"pndm prk {pred} {steps}")


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++2m"])
def test_zero_terminal_snr_v_prediction_loop_matches_diffusers(name):
  cfg = _cfg(SD21, rescale_betas_zero_snr=True, timestep_spacing="trailing")
  tol = ILL_CONDITIONED_TOL if name == "euler" else LOOP_TOL
  _compare_loops(name, cfg, 20, f"{name} zero-snr trailing", tol)


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++2m"])
def test_sample_prediction_loop_matches_diffusers(name):
  cfg = _cfg(SD15, prediction_type="sample", beta_schedule="squaredcos_cap_v2")
  tol = ILL_CONDITIONED_TOL if name == "euler" else LOOP_TOL
  _compare_loops(name, cfg, 15, f"{name} sample cosine", tol)


def test_ddim_clips_x0_like_diffusers_by_default():
  # DDIMScheduler defaults to clip_sample=True when the config does not say.
  cfg = _cfg(SD21, clip_sample=None, set_alpha_to_one=None)
  assert make_sampler("ddim", cfg, 10).clip_sample_range == 1.0
  _compare_loops("ddim", cfg, 10, "ddim clip_sample default")


def test_dpm_single_step_is_first_order_to_x0():
  sampler = make_sampler("dpm++2m", SD15, 1)
  x = jnp.ones((1, 2, 2, 4))
  prev, _ = jax.jit(sampler.step)(sampler.init_state(x), jnp.zeros_like(x), jnp.int32(0), x)
  sigma = float(sampler.tables["sigma"][0])
  alpha = float(sampler.tables["alpha"][0])
  np.testing.assert_allclose(np.asarray(prev), (1.0 - 0.0 * sigma) / alpha, rtol=1e-6)


# ----------------------------------------------------------------------------- training side


TRAIN_CONFIGS = {
    "sd15": SD15,
    "sd21_v": SD21,
    "linear": _cfg(SD15, beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "cosine_v": _cfg(SD21, beta_schedule="squaredcos_cap_v2"),
    "zero_snr_v": _cfg(SD21, rescale_betas_zero_snr=True),
    "trained_betas": _cfg(SD15, num_train_timesteps=100,
                          trained_betas=np.linspace(1e-4, 0.05, 100).tolist()),
    "sample": _cfg(SD15, prediction_type="sample"),
}


@pytest.mark.parametrize("key", list(TRAIN_CONFIGS))
def test_add_noise_velocity_and_target_match_ddpm(key):
  cfg = TRAIN_CONFIGS[key]
  ddpm = diffusers.DDPMScheduler.from_config(cfg)
  schedule = noise_schedule_from_config(cfg)
  # atol: zero-SNR rescaling cancels down to values < 5e-4 near t = T, where torch's
  # not-correctly-rounded float32 sqrt leaves up to ~4e-6 relative (5e-10 absolute) differences.
  np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), ddpm.alphas_cumprod.numpy(),
                             rtol=1e-6, atol=1e-9)
  rng = np.random.default_rng(1)
  x0 = rng.standard_normal((6, 8, 8, 4)).astype(np.float32)  # [B, h, w, 4]
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t_max = schedule.num_train_timesteps - 1
  timesteps = np.array([0, 1, t_max // 2, t_max - 1, t_max, 7], np.int32)  # [B]

  fns = jax.jit(lambda s, a, n, t: (add_noise(s, a, n, t), get_velocity(s, a, n, t),
                                    training_target(s, a, n, t)))
  noisy, velocity, target = map(np.asarray, fns(schedule, x0, noise, timesteps))
  args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(timesteps).long())
  want_noisy = ddpm.add_noise(*args).numpy()
  want_velocity = ddpm.get_velocity(*args).numpy()
  err = max(_rel_err(noisy, want_noisy), _rel_err(velocity, want_velocity))
  record_parity(f"schedulers add_noise+get_velocity {key}", err, TRAIN_TOL)
  want_target = {"epsilon": noise, "v_prediction": want_velocity, "sample": x0}[cfg["prediction_type"]]
  assert _rel_err(target, want_target) <= TRAIN_TOL


def test_alphas_cumprod_is_bit_equal_to_torch_for_sd_schedules():
  # diffusers builds betas with torch.linspace in float32; numpy's linspace
  # rounds differently, which these exact comparisons would catch.
  for cfg in (SD15, TRAIN_CONFIGS["linear"], TRAIN_CONFIGS["cosine_v"]):
    np.testing.assert_array_equal(np.asarray(noise_schedule_from_config(cfg).alphas_cumprod),
                                  diffusers.DDPMScheduler.from_config(cfg).alphas_cumprod.numpy())


# ----------------------------------------------------------------------------- API and errors


@pytest.mark.parametrize("spelling,kind", [
    ("dpm++2m", "dpm++2m"), ("dpmpp_2m", "dpm++2m"), ("dpm++ 2m", "dpm++2m"), ("DPM++ 2M", "dpm++2m"),
    ("DDIM", "ddim"), ("pndm", "pndm"), ("plms", "pndm"), ("Euler", "euler"),
])
def test_sampler_names_are_normalised(spelling, kind):
  assert make_sampler(spelling, SD15, 10).kind == kind


def test_unknown_sampler_name_lists_known_names():
  with pytest.raises(ValueError, match="ddim, pndm, euler, dpm\\+\\+2m"):
    make_sampler("heun", SD15, 10)


@pytest.mark.parametrize("steps", [0, 1001, 2.5])
def test_bad_step_count_is_rejected(steps):
  with pytest.raises(ValueError, match="num_inference_steps"):
    make_sampler("ddim", SD15, steps)


BAD_CONFIGS = [
    (None, {"beta_schedule": "sigmoid"}, "beta_schedule"),
    (None, {"prediction_type": "flow_prediction"}, "prediction_type"),
    (None, {"num_train_timesteps": "1000"}, "num_train_timesteps"),
    (None, {"trained_betas": [0.1, 0.2]}, "trained_betas"),
    (None, {"beta_start": "0.00085"}, "beta_start"),
    ("ddim", {"steps_offset": 1.5}, "steps_offset"),
    ("ddim", {"timestep_spacing": "uniform"}, "timestep_spacing"),
    ("ddim", {"thresholding": True}, "thresholding"),
    ("ddim", {"beta_schedule": "cosine"}, "beta_schedule"),
    ("pndm", {"prediction_type": "sample"}, "prediction_type"),
    ("euler", {"use_karras_sigmas": True}, "use_karras_sigmas"),
    ("euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
    ("euler", {"prediction_type": "x0"}, "prediction_type"),
    ("dpm++2m", {"solver_order": 3}, "solver_order"),
    ("dpm++2m", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ("dpm++2m", {"solver_type": "heun"}, "solver_type"),
    ("dpm++2m", {"final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
]


@pytest.mark.parametrize("name,overrides,field", BAD_CONFIGS)
def test_bad_config_value_raises_value_error_naming_the_field(name, overrides, field):
  cfg = _cfg(SD15, **overrides)
  with pytest.raises(ValueError, match=field) as info:
    if name is None:
      noise_schedule_from_config(cfg)
    else:
      make_sampler(name, cfg, 10)
  assert isinstance(info.value, SchedulerConfigError)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("name,spacing,match", [
    ("ddim", "leading", "reaches timestep 1000"),  # diffusers: IndexError
    ("pndm", "leading", "reaches timestep 1000"),  # diffusers: IndexError
    ("dpm++2m", "linspace", "repeats timesteps"),  # diffusers: NaN samples
])
def test_step_counts_diffusers_cannot_run_raise_value_error(name, spacing, match):
  with pytest.raises(ValueError, match=match):
    make_sampler(name, _cfg(SD15, timestep_spacing=spacing), 1000)


def test_pndm_prk_warmup_needs_four_steps():
  with pytest.raises(ValueError, match="skip_prk_steps"):
    make_sampler("pndm", _cfg(SD15, skip_prk_steps=False), 3)


def test_config_keys_the_diffusers_class_does_not_take_are_ignored():
  # PNDMScheduler has no rescale_betas_zero_snr, so diffusers ignores it there
  # (while DDPMScheduler, hence the training schedule, applies it).
  cfg = _cfg(SD15, rescale_betas_zero_snr=True)
  assert float(noise_schedule_from_config(cfg).alphas_cumprod[-1]) == 0.0
  _compare_loops("pndm", cfg, 10, "pndm ignores rescale_betas_zero_snr")


def test_use_default_values_keys_take_the_class_default():
  # diffusers drops keys listed in `_use_default_values` before building the class.
  cfg = _cfg(SD15, timestep_spacing="trailing", _use_default_values=["timestep_spacing"])
  for name in ("ddim", "euler"):
    np.testing.assert_array_equal(np.asarray(make_sampler(name, cfg, 10).timesteps),
                                  _torch_scheduler(name, cfg, 10).timesteps.numpy())
