"""Every scheduler config a diffusers class writes samples as diffusers samples it.

A model folder's `scheduler/scheduler_config.json` is written by whichever
diffusers class the pipeline held when it was saved: diffusers' own
textual-inversion scripts hold a `DDPMScheduler` (which writes
`variance_type="fixed_small"`), SD 1.5 ships a `PNDMScheduler`, SD 2.x a
`DDIMScheduler`, and users swap in Euler, DPM-Solver, UniPC, ... before saving.
Each ti_jax sampler must build from each such config exactly as the diffusers
scheduler of its kind does with `from_config`, ignoring what that class ignores.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
# diffusers 0.42 calls np.array (and, for KDPM2, np.log) on torch tensors in set_timesteps.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]
diffusers = pytest.importorskip("diffusers")

from conftest import record_parity  # noqa: E402
from test_schedulers import (  # noqa: E402
  LOOP_TOL,
  SAMPLERS,
  SD15,
  SD21,
  _jax_trajectory,
  _rel_err,
  _torch_scheduler,
  _torch_trajectory,
)

from ti_jax.evaluation import evaluator  # noqa: E402
from ti_jax.sampling import concepts as sampling_concepts  # noqa: E402
from ti_jax.sampling import editing, runner  # noqa: E402
from ti_jax.sampling.noise_schedule import SchedulerConfigError  # noqa: E402
from ti_jax.sampling.schedulers import (  # noqa: E402
  SAMPLER_NAMES,
  make_sampler,
  usable_samplers_hint,
)

# The five classes Stable Diffusion folders are saved with, then others whose configs
# pipelines also carry (ti_jax samples each with its own four kinds).
CLASSES = (
    "DDPMScheduler", "PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler",
    "DPMSolverSinglestepScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
    "DEISMultistepScheduler", "LCMScheduler",
)
# How the class is made before save_pretrained: its own defaults, or from the public
# SD 1.5 (epsilon) / SD 2.1 (v-prediction) config, as a pipeline's scheduler swap does.
VARIANTS = {"defaults": None, "sd15": SD15, "sd21-v": SD21}
# DPMSolverMultistepScheduler maps a DEIS config's algorithm_type "deis" onto
# "dpmsolver++" and then refuses it over final_sigmas_type "zero" (it checks the value it
# was given, not the one it mapped); ti_jax samples it with the mapped value.
DIFFUSERS_REFUSES = {("DEISMultistepScheduler", "dpm++2m")}
STEPS = 10


@functools.cache
def _written(class_name: str, variant: str) -> dict:
  """The scheduler_config.json diffusers' `class_name` writes for `variant`, read back."""
  cls = getattr(diffusers, class_name)
  base = VARIANTS[variant]
  scheduler = cls() if base is None else cls.from_config(base)
  with tempfile.TemporaryDirectory() as folder:
    scheduler.save_pretrained(folder)
    with open(os.path.join(folder, "scheduler_config.json"), encoding="utf-8") as f:
      return json.load(f)


def _loop_error(kind: str, cfg: dict) -> float:
  """Worst relative error between ti_jax's and diffusers' trajectories over every step."""
  noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  want = _torch_trajectory(_torch_scheduler(kind, cfg, STEPS), noise)
  sampler = make_sampler(kind, cfg, STEPS)
  got = np.asarray(_jax_trajectory(sampler, jnp.asarray(noise) * sampler.init_noise_sigma))
  assert got.shape == want.shape and np.all(np.isfinite(want))
  return max(_rel_err(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("class_name", CLASSES)
def test_every_sampler_samples_the_config_each_diffusers_class_writes(class_name):
  worst = 0.0
  for variant in VARIANTS:
    cfg = _written(class_name, variant)
    assert cfg["_class_name"] == class_name
    for kind in SAMPLERS:
      label = f"{class_name} {variant} {kind}"
      if (class_name, kind) in DIFFUSERS_REFUSES:
        with pytest.raises(ValueError, match="final_sigmas_type"):
          _torch_scheduler(kind, cfg, STEPS)
        assert make_sampler(kind, cfg, STEPS).num_steps == STEPS, label
        continue
      try:
        err = _loop_error(kind, cfg)
      except SchedulerConfigError as e:
        pytest.fail(f"{label}: diffusers samples this config, ti_jax refuses it: {e}")
      assert err <= LOOP_TOL, f"{label}: max relative error {err:.3g}"
      worst = max(worst, err)
  record_parity(f"scheduler configs written by {class_name}", worst, LOOP_TOL)


def test_ddpm_folder_config_has_the_fixed_small_variance_it_is_written_with():
  # The case of issue 28: what diffusers' textual-inversion scripts save.
  assert _written("DDPMScheduler", "sd15")["variance_type"] == "fixed_small"


# DDPMScheduler's variance types (UnCLIPScheduler writes "fixed_small_log").
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_small_log", "fixed_large",
                                      "fixed_large_log", None])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_dpm_ignores_every_variance_type_that_is_not_learned(variance, pred):
  cfg = dict(_written("DDPMScheduler", "sd15"), variance_type=variance, prediction_type=pred)
  err = _loop_error("dpm++2m", cfg)
  assert err <= LOOP_TOL, f"variance_type={variance!r}: max relative error {err:.3g}"


@pytest.mark.parametrize("variance", ["learned", "learned_range"])
def test_dpm_refuses_a_learned_variance_only_where_diffusers_uses_it(variance):
  # diffusers drops a learned variance's output channels for epsilon prediction only
  # (keeping 3, an image model's: no SD latent space); other targets ignore the field.
  cfg = dict(_written("DDPMScheduler", "sd15"), variance_type=variance)
  with pytest.raises(SchedulerConfigError, match="variance_type") as info:
    make_sampler("dpm++2m", cfg, STEPS)
  assert "\n" not in str(info.value)
  v_cfg = dict(cfg, prediction_type="v_prediction")
  assert _loop_error("dpm++2m", v_cfg) <= LOOP_TOL
  for kind in ("ddim", "pndm", "euler"):  # those classes take no variance_type at all
    assert make_sampler(kind, cfg, STEPS).num_steps >= STEPS


def test_a_refusal_names_the_samplers_that_can_sample_the_config():
  karras = dict(_written("DPMSolverMultistepScheduler", "sd15"), use_karras_sigmas=True)
  assert usable_samplers_hint(karras, STEPS, "--scheduler") == (
      "; --scheduler ddim or pndm can sample this model")
  # PNDMScheduler's own default runs the PRK warm-up, which needs 4 steps.
  assert usable_samplers_hint(_written("PNDMScheduler", "defaults"), 3, "--scheduler") == (
      "; --scheduler ddim, euler or dpm++2m can sample this model")
  flow = dict(karras, prediction_type="flow_prediction")
  assert usable_samplers_hint(flow, STEPS, "--scheduler").startswith("; no ti_jax sampler")


@pytest.mark.parametrize("name", SAMPLER_NAMES + ("PLMS", "DPM++ 2M"))
def test_sample_edit_and_evaluate_check_only_the_sampler_name_before_loading(name, tmp_path):
  # An empty config is no stand-in for the model's: its PNDM defaults (the PRK warm-up)
  # refused --scheduler pndm for every model, SD 1.x's included. Each call below gets past
  # the name and stops at the next check, which needs no model.
  with pytest.raises(sampling_concepts.SampleError, match="does not exist"):
    runner.run(prompts=["a photo"], workdir=str(tmp_path / "no-run"), scheduler=name)
  with pytest.raises(editing.EditError, match="does not exist"):
    editing.run(image=str(tmp_path / "no.png"), mask=str(tmp_path / "no.png"), prompt="a",
                scheduler=name)
  evaluator.check_protocol(evaluator.Protocol(scheduler=name))
