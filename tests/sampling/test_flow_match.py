"""Parity of ti_jax.sampling.flow_match with diffusers' FlowMatchEulerDiscreteScheduler,
FluxPipeline's timestep setup and the training math of diffusers' Flux scripts (CPU).

The scripts' lines (examples/dreambooth/train_dreambooth_lora_flux.py and the advanced one)
are written out here in torch on a real scheduler: `indices = (u * T).long()`,
`timesteps = scheduler.timesteps[indices]`, `get_sigmas` (look each timestep up in
`scheduler.timesteps`, take that `scheduler.sigmas` entry), `(1 - sigma) x0 + sigma noise`,
`noise - x0`.
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

from diffusers.pipelines.flux import pipeline_flux  # noqa: E402
from diffusers.training_utils import (  # noqa: E402
  compute_density_for_timestep_sampling,
  compute_loss_weighting_for_sd3,
)

from conftest import record_parity  # noqa: E402

from ti_jax.sampling import flow_match  # noqa: E402
from ti_jax.sampling.noise_schedule import SchedulerConfigError  # noqa: E402

# scheduler/scheduler_config.json of black-forest-labs/FLUX.1-dev and FLUX.1-schnell.
FLUX_DEV = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}
FLUX_SCHNELL = dict(FLUX_DEV, shift=1.0, use_dynamic_shifting=False)
# A static shift (SD3's scheduler) and the linear time shift: other branches of the same code.
STATIC_SHIFT = dict(FLUX_DEV, shift=3.0, use_dynamic_shifting=False)
LINEAR_SHIFT = dict(FLUX_DEV, time_shift_type="linear")
CONFIGS = {"dev": FLUX_DEV, "schnell": FLUX_SCHNELL, "static": STATIC_SHIFT,
           "linear": LINEAR_SHIFT}
# Max |jax - torch| / max |torch| of a compiled Euler loop at any step.
LOOP_TOL = 1e-6


def torch_scheduler(cfg, steps=None, seq_len=None):
  """diffusers' scheduler from `cfg`; with `steps`, set up as FluxPipeline does for `seq_len`."""
  sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
  if steps is not None:
    mu = pipeline_flux.calculate_shift(seq_len, sched.config.get("base_image_seq_len", 256),
                               sched.config.get("max_image_seq_len", 4096),
                               sched.config.get("base_shift", 0.5),
                               sched.config.get("max_shift", 1.15))
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
  return sched


# ----------------------------------------------------------------------------- config


def test_flux_configs_read_as_diffusers():
  dev, schnell = flow_match.flow_match_config(FLUX_DEV), flow_match.flow_match_config(FLUX_SCHNELL)
  assert dev == flow_match.FlowMatchConfig(1000, 3.0, True, 0.5, 1.15, 256, 4096, "exponential")
  assert (schnell.shift, schnell.use_dynamic_shifting) == (1.0, False)
  # A missing key takes the class default; `_use_default_values` keys too (from_config's rules).
  assert flow_match.flow_match_config({}) == flow_match.FlowMatchConfig(
      1000, 1.0, False, 0.5, 1.15, 256, 4096, "exponential")
  assert flow_match.flow_match_config(dict(FLUX_DEV, _use_default_values=["shift"])).shift == 1.0
  assert flow_match.flow_match_config(dev) is dev


@pytest.mark.parametrize("field,value", [
    ("invert_sigmas", True), ("use_karras_sigmas", True), ("use_exponential_sigmas", True),
    ("use_beta_sigmas", True), ("stochastic_sampling", True), ("shift_terminal", 0.1),
    ("time_shift_type", "cubic"), ("shift", 0.0), ("shift", "3"), ("use_dynamic_shifting", "yes"),
    ("max_image_seq_len", 256), ("num_train_timesteps", 1.5),
])
def test_unsupported_config_is_refused_in_one_line(field, value):
  with pytest.raises(SchedulerConfigError) as err:
    flow_match.flow_match_config(dict(FLUX_DEV, **{field: value}))
  message = str(err.value)
  assert "\n" not in message and f"{field}=" in message, message


def test_unknown_weighting_scheme_and_bad_step_count_are_refused():
  with pytest.raises(ValueError, match="weighting_scheme='uniform' is unknown; expected one of"):
    flow_match.timestep_density("uniform", jnp.zeros(2))
  with pytest.raises(ValueError, match="num_inference_steps=0"):
    flow_match.make_flow_sampler(FLUX_DEV, 0, seq_len=256)
  with pytest.raises(ValueError, match="needs mu"):
    flow_match.make_flow_sampler(FLUX_DEV, 4)


# ----------------------------------------------------------------------------- sampling


def test_image_seq_len_and_mu_equal_flux_pipeline():
  cfg = flow_match.flow_match_config(FLUX_DEV)
  for height, width in [(1024, 1024), (512, 768), (64, 64), (1000, 600), (32, 48)]:
    latent_h, latent_w = 2 * (height // 16), 2 * (width // 16)
    packed = pipeline_flux.FluxPipeline._pack_latents(
        torch.zeros(1, 16, latent_h, latent_w), 1, 16, latent_h, latent_w)
    seq = flow_match.image_seq_len(height, width)
    assert seq == packed.shape[1], (height, width)
    assert flow_match.calculate_shift(seq, cfg) == pipeline_flux.calculate_shift(seq), seq


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_timesteps_and_sigmas_equal_diffusers(name):
  """FluxPipeline's set_timesteps(sigmas=linspace(1, 1/N, N), mu): float32 bit for bit."""
  cfg = CONFIGS[name]
  for steps in (1, 2, 4, 28, 50):
    for seq_len in (16, 256, 1024, 4096, 6000):
      sched = torch_scheduler(cfg, steps, seq_len)
      sampler = flow_match.make_flow_sampler(cfg, steps, seq_len=seq_len)
      where = f"{name} steps={steps} seq_len={seq_len}"
      np.testing.assert_array_equal(np.asarray(sampler.timesteps), sched.timesteps.numpy(), where)
      np.testing.assert_array_equal(np.asarray(sampler.sigmas), sched.sigmas.numpy(), where)
      assert sampler.num_steps == steps
      mu = flow_match.calculate_shift(seq_len, flow_match.flow_match_config(cfg))
      np.testing.assert_array_equal(
          flow_match.make_flow_sampler(cfg, steps, mu=mu).tables["dt"], sampler.tables["dt"])
      if not cfg["use_dynamic_shifting"]:
        break  # the sequence length changes nothing


def _velocity(x, a, b):
  """A fixed velocity field: an elementwise affine map of x (bit-equal in numpy, JAX, torch)."""
  return a * x + b


def _step(sampler, x, i, a, b, v_dtype):
  """One step of the loop: the velocity at x (in the model's dtype), then the sampler's step."""
  v = _velocity(x.astype(jnp.float32), a, b).astype(v_dtype)
  return sampler.step(sampler.init_state(x), v, i, sampler.scale_model_input(x, i))[0]


def _jax_loop(sampler, x, a, b, v_dtype, compiled):
  """Every intermediate sample of the Euler loop: compiled (`lax.scan` under jit, the step
  index traced) or op by op (eager, so that XLA fuses no multiply-add into an FMA)."""
  if not compiled:
    out = []
    for i in range(sampler.num_steps):
      x = _step(sampler, x, i, a, b, v_dtype)
      out.append(np.asarray(x.astype(jnp.float32)))
    return np.stack(out)

  def body(carry, i):
    nxt = _step(sampler, carry, i, a, b, v_dtype)
    return nxt, nxt
  _, trajectory = jax.jit(lambda s, x0: jax.lax.scan(body, x0, jnp.arange(s.num_steps)))(
      sampler, x)
  return np.asarray(trajectory.astype(jnp.float32))


def _torch_loop(sched, x, a, b, v_dtype):
  """FluxPipeline's loop: scheduler.step on every timestep, the latents cast back to their
  dtype."""
  out = []
  for t in sched.timesteps:
    v = _velocity(x.float(), a, b).to(v_dtype)
    x = sched.step(v, t, x, return_dict=False)[0].to(x.dtype)
    out.append(x.float().numpy())
  return np.stack(out)


@pytest.mark.parametrize("name,steps,seq_len", [("dev", 28, 4096), ("dev", 7, 64),
                                                ("schnell", 4, 1024)])
def test_euler_loop_equals_scheduler_step_loop(name, steps, seq_len):
  cfg = CONFIGS[name]
  rng = np.random.default_rng(steps)
  x = rng.standard_normal((2, seq_len // 16, 64)).astype(np.float32)  # packed latents [B, L, 64]
  a = rng.uniform(-1.5, 0.5, (1, 1, 64)).astype(np.float32)
  b = rng.standard_normal((1, seq_len // 16, 64)).astype(np.float32)
  sampler = flow_match.make_flow_sampler(cfg, steps, seq_len=seq_len)
  f32, bf16 = (jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)
  # (latents, velocity) dtypes: float32, bf16, and bf16 velocities of float32 latents.
  for (dtype, torch_dtype), (v_dtype, torch_v_dtype) in ((f32, f32), (bf16, bf16), (f32, bf16)):
    theirs = _torch_loop(torch_scheduler(cfg, steps, seq_len),
                         torch.from_numpy(x).to(torch_dtype), torch.from_numpy(a),
                         torch.from_numpy(b), torch_v_dtype)
    args = (sampler, jnp.asarray(x).astype(dtype), jnp.asarray(a), jnp.asarray(b), v_dtype)
    where = f"{name} {steps} steps {dtype.__name__}/{v_dtype.__name__}"
    # Op by op, both loops round the same operations the same way: bit for bit.
    np.testing.assert_array_equal(_jax_loop(*args, compiled=False), theirs, where)
    compiled = _jax_loop(*args, compiled=True)
    # Compiled, XLA fuses multiply-adds into FMAs (float32: 2.6e-7 at worst, 28 steps of dev;
    # bf16: equal, the rounding to bf16 hides them).
    rel = max(np.abs(c - t).max() / np.abs(t).max() for c, t in zip(compiled, theirs))
    record_parity(f"flow euler loop {where}", float(rel), LOOP_TOL)


def test_transformer_timestep_is_the_pipelines():
  sampler = flow_match.make_flow_sampler(FLUX_DEV, 28, seq_len=4096)
  sched = torch_scheduler(FLUX_DEV, 28, 4096)
  step = jax.jit(sampler.transformer_timestep, static_argnums=1)
  for dtype, torch_dtype in ((jnp.float32, torch.float32), (jnp.bfloat16, torch.bfloat16)):
    ours = np.stack([np.asarray(step(jnp.int32(i), dtype).astype(jnp.float32))
                     for i in range(28)])
    # FluxPipeline: timestep = t.expand(B).to(latents.dtype), fed as timestep / 1000.
    theirs = np.stack([(t.expand(2).to(torch_dtype) / 1000).float().numpy()[0]
                       for t in sched.timesteps])
    np.testing.assert_array_equal(ours, theirs, str(dtype))


# ----------------------------------------------------------------------------- training


def _torch_get_sigmas(sched, timesteps, n_dim):
  """The scripts' get_sigmas: each timestep's position in scheduler.timesteps, its sigma."""
  step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]
  sigma = sched.sigmas[step_indices].flatten()
  while len(sigma.shape) < n_dim:
    sigma = sigma.unsqueeze(-1)
  return sigma


@pytest.mark.parametrize("scheme", flow_match.WEIGHTING_SCHEMES)
def test_density_equals_compute_density_for_timestep_sampling(scheme):
  """The same torch draws: the scripts' u from diffusers, ours from the draws diffusers used."""
  kwargs = dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
  theirs = compute_density_for_timestep_sampling(
      scheme, 64, generator=torch.Generator().manual_seed(7), **kwargs)
  draws = (torch.randn if scheme == "logit_normal" else torch.rand)(
      64, generator=torch.Generator().manual_seed(7))
  ours = np.asarray(flow_match.timestep_density(scheme, jnp.asarray(draws.numpy()), **kwargs))
  # ulp-level differences of exp/cos implementations (torch's vectorised ones vs XLA's).
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=3e-7)
  if scheme in ("none", "sigma_sqrt", "cosmap"):
    np.testing.assert_array_equal(ours, theirs.numpy())
  # Our own draw: the kind diffusers draws, in range, a function of the key alone.
  key = jax.random.key(3)
  u = flow_match.timestep_density(scheme, flow_match.density_draw(key, scheme, (4096,)), **kwargs)
  np.testing.assert_array_equal(u, flow_match.timestep_density(
      scheme, flow_match.density_draw(key, scheme, (4096,)), **kwargs))
  assert 0.0 <= float(u.min()) and float(u.max()) <= 1.0
  # "mode": E[1 - w - s (cos^2(pi w / 2) - 1 + w)] = 1/2 - s (1/2 - 1 + 1/2) = 1/2.
  expected_mean = 0.5
  if scheme == "logit_normal":
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    expected_mean = float(torch.sigmoid(0.3 + 1.2 * z).mean())
  assert abs(float(u.mean()) - expected_mean) < 0.02, (scheme, float(u.mean()))


@pytest.mark.parametrize("name", ["dev", "schnell", "static"])
def test_train_sigmas_and_noisy_input_equal_the_scripts(name):
  cfg = CONFIGS[name]
  sched = torch_scheduler(cfg)  # pristine, as the scripts' noise_scheduler_copy
  schedule = flow_match.flow_train_schedule(cfg)
  np.testing.assert_array_equal(np.asarray(schedule.sigmas), sched.sigmas.numpy())
  np.testing.assert_array_equal(np.asarray(schedule.timesteps), sched.timesteps.numpy())
  if name != "static":  # FLUX.1: no shift of any kind at training time, sigma = (T - i) / T
    np.testing.assert_array_equal(np.asarray(schedule.sigmas),
                                  (np.arange(1000, 0, -1) / np.float32(1000)).astype(np.float32))

  rng = np.random.default_rng(1)
  u = np.concatenate([[0.0, 0.0009999, 0.001, 0.5, 0.9995, np.nextafter(np.float32(1), 0)],
                      rng.uniform(size=26)]).astype(np.float32)
  indices = (torch.from_numpy(u) * sched.config.num_train_timesteps).long()
  timesteps = sched.timesteps[indices]
  x0 = torch.from_numpy(rng.standard_normal((32, 16, 4, 6)).astype(np.float32))
  noise = torch.from_numpy(rng.standard_normal((32, 16, 4, 6)).astype(np.float32))
  sigmas = _torch_get_sigmas(sched, timesteps, x0.ndim)
  noisy = (1.0 - sigmas) * x0 + sigmas * noise

  ours_idx = flow_match.train_indices(jnp.asarray(u), schedule.num_train_timesteps)
  np.testing.assert_array_equal(np.asarray(ours_idx), indices.numpy())
  ours_sigma, ours_t = flow_match.train_sigmas(schedule, ours_idx)
  np.testing.assert_array_equal(np.asarray(ours_sigma), sigmas.flatten().numpy())
  np.testing.assert_array_equal(np.asarray(schedule.timesteps[ours_idx]), timesteps.numpy())
  # The transformer's input: the scripts' `timestep=timesteps / 1000`.
  np.testing.assert_array_equal(np.asarray(ours_t), (timesteps / 1000).numpy())
  ours_noisy = flow_match.noisy_latents(jnp.asarray(x0.numpy()), jnp.asarray(noise.numpy()),
                                        ours_sigma)
  np.testing.assert_allclose(np.asarray(ours_noisy), noisy.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(flow_match.flow_target(x0.numpy(), noise.numpy())), (noise - x0).numpy())


def test_draw_train_timesteps_composes_the_scripts_lines():
  schedule = flow_match.flow_train_schedule(FLUX_DEV)
  key = jax.random.key(5)
  for scheme in ("none", "logit_normal", "mode"):
    idx, sigma, t = flow_match.draw_train_timesteps(key, schedule, scheme, (512,))
    u = flow_match.timestep_density(scheme, flow_match.density_draw(key, scheme, (512,)))
    np.testing.assert_array_equal(idx, np.floor(np.asarray(u) * np.float32(1000)))
    np.testing.assert_array_equal(sigma, schedule.sigmas[idx])
    np.testing.assert_array_equal(t, schedule.transformer_timesteps[idx])
    assert idx.dtype == jnp.int32 and 0 <= int(idx.min()) and int(idx.max()) <= 999
  # One example's draw (shape ()) under jit and vmap, as the trainer draws per example.
  keys = jax.random.split(key, 8)
  idx, _, _ = jax.jit(jax.vmap(lambda k: flow_match.draw_train_timesteps(k, schedule, "none")))(
      keys)
  assert idx.shape == (8,) and len(set(np.asarray(idx).tolist())) > 1


def test_train_indices_stay_in_range():
  u = jnp.asarray([1.0, 1.0000001, -0.0005, -0.5, 0.0, 1 - 2 ** -24], jnp.float32)
  np.testing.assert_array_equal(flow_match.train_indices(u, 1000), [999, 999, 0, 0, 0, 999])


@pytest.mark.parametrize("scheme", flow_match.WEIGHTING_SCHEMES)
def test_loss_weighting_and_loss_equal_the_scripts(scheme):
  sigmas = torch.from_numpy((np.arange(1000, 0, -1) / np.float32(1000)).astype(np.float32))
  theirs = compute_loss_weighting_for_sd3(scheme, sigmas)
  ours = np.asarray(flow_match.loss_weighting(scheme, jnp.asarray(sigmas.numpy())))
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=2e-7, atol=0)
  rng = np.random.default_rng(2)
  pred, target = (rng.standard_normal((6, 16, 4, 4)).astype(np.float32) for _ in range(2))
  w = sigmas[[0, 10, 500, 900, 998, 999]].reshape(6, 1, 1, 1)
  weighting = compute_loss_weighting_for_sd3(scheme, w)
  p, t = torch.from_numpy(pred), torch.from_numpy(target)
  loss = torch.mean((weighting.float() * (p.float() - t.float()) ** 2).reshape(6, -1), 1).mean()
  ours_weights = flow_match.loss_weighting(scheme, jnp.asarray(w.flatten().numpy()))
  ours_loss = flow_match.flow_loss(jnp.asarray(pred), jnp.asarray(target), ours_weights)
  np.testing.assert_allclose(float(ours_loss), float(loss), rtol=1e-6)


# ----------------------------------------------------------------------------- latents, guidance


def test_latent_normalisation_pair():
  shift, scale = 0.1159, 0.3611  # FLUX.1's VAE shift_factor and scaling_factor
  rng = np.random.default_rng(3)
  latents = rng.standard_normal((2, 8, 8, 16)).astype(np.float32) * 3
  normalised = flow_match.normalize_latents(jnp.asarray(latents), shift, scale)
  torch_latents = torch.from_numpy(latents)
  np.testing.assert_array_equal(np.asarray(normalised), ((torch_latents - shift) * scale).numpy())
  back = flow_match.denormalize_latents(normalised, shift, scale)
  # XLA's float32 division (CPU) is within an ulp of torch's correctly rounded one (|x| < 16:
  # an ulp < 2e-6), which the + shift_factor keeps in absolute terms.
  np.testing.assert_allclose(
      np.asarray(back), (torch.from_numpy(np.array(normalised)) / scale + shift).numpy(),
      rtol=0, atol=2e-6)
  np.testing.assert_allclose(np.asarray(back), latents, rtol=0, atol=2e-6)
  assert abs(float(normalised.mean()) - float((latents.mean() - shift) * scale)) < 1e-5


def test_guidance_values():
  assert flow_match.guidance_values(False, 3.5, 4) is None  # schnell: no guidance embedding
  g = flow_match.guidance_values(True, flow_match.DEFAULT_GUIDANCE_SCALE, 3)
  theirs = torch.tensor([3.5]).expand(3)  # the scripts; FluxPipeline: torch.full([1], 3.5)
  assert g.dtype == jnp.float32 and g.shape == (3,)
  np.testing.assert_array_equal(np.asarray(g), theirs.numpy())
  np.testing.assert_array_equal(np.asarray(flow_match.guidance_values(True, 2.0, 2)), [2.0, 2.0])
