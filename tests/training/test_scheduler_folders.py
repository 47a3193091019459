"""Model folders whose scheduler diffusers wrote, one per scheduler class (issue 28).

A folder saved by diffusers' textual-inversion scripts holds a DDPMScheduler config
(`variance_type="fixed_small"`); ti_jax's own tiny folders all hold one class, so
these copies of tiny-sd15 differ only in the class that wrote `scheduler/`. Each
trains (one shared run), validates, samples and edits; a config the sampler truly
cannot use is refused in one line before the first step of a run, a sample, an edit
or an evaluation; an exception inside validation is one warning line and the run
goes on.
"""

import contextlib
import io
import json
import os

import jax
import numpy as np
import pytest
from conftest import REPO, config_module, model_stub, offline_config, with_diffusers_scheduler
from PIL import Image

from ti_jax import errors
from ti_jax.evaluation import clip_io, evaluator
from ti_jax.sampling import concepts as sampling_concepts
from ti_jax.sampling import editing, generation, noise_schedule, runner
from ti_jax.training import dry_run, trainer, validation
from ti_jax.training import config as training_config
from ti_jax.weights.loading import load_stable_diffusion

TOY = os.path.join(REPO, "examples", "toy")
CLASSES = ("DDPMScheduler", "PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
           "DPMSolverMultistepScheduler")
# Cheap settings shared by validation, sampling and editing: one compiled program each.
STEPS, SAMPLER, PROMPT = 2, "dpm++2m", "a photo of <toy>"


@pytest.fixture(scope="module")
def folders(tiny_sd15, tmp_path_factory):
  """Class name -> a tiny-sd15 copy whose scheduler that diffusers class wrote; and
  "thresholding": DPM-Solver with dynamic thresholding, which ti_jax's dpm++2m (as its
  ddim) does not implement, while training and the euler and pndm samplers ignore it."""
  root = tmp_path_factory.mktemp("scheduler_folders")
  out = {name: with_diffusers_scheduler(tiny_sd15, root / name, name) for name in CLASSES}
  out["thresholding"] = with_diffusers_scheduler(
      tiny_sd15, root / "thresholding", "DPMSolverMultistepScheduler", thresholding=True)
  return out


def _config(cache_dir, model, **overrides):
  """A 1-step tiny run on `model` with validation at every step (dpm++2m, the default)."""
  settings = dict(train_data_dir=TOY, pretrained_model_name_or_path=model, max_train_steps=1,
                  checkpointing_steps=1, log_every_steps=1)
  c = offline_config(config_module("object").get_config("tiny"), cache_dir,
                     **dict(settings, **overrides))
  c.validation_prompt, c.validation_steps = "a photo of {}", 1
  c.num_validation_images, c.validation_inference_steps = 1, STEPS
  c.validation_scheduler = SAMPLER
  return c


def _train(config, workdir) -> dict:
  """`trainer.run` on one device, without a progress bar."""
  return trainer.run(config, str(workdir), devices=jax.local_devices()[:1], progress=False)


@pytest.fixture(scope="module")
def run(folders, tmp_path_factory):
  """The shared run: 2 steps on the DDPM folder, as in issue 28, validated at both. Step 1's
  validation is made to fail as a device out of memory would, and the run's stderr kept."""
  root = tmp_path_factory.mktemp("ddpm_run")
  workdir = root / "run"
  real, calls = generation.image_batches, []

  def fail_once(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\nwhile allocating 1 GiB")
    return real(*args, **kwargs)

  stderr = io.StringIO()
  with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
    patch.setattr(generation, "image_batches", fail_once)
    result = _train(_config(root / "cache", folders["DDPMScheduler"], max_train_steps=2,
                            checkpointing_steps=2), workdir)
  return dict(workdir=str(workdir), result=result, root=root, stderr=stderr.getvalue())


@pytest.fixture(scope="module")
def bad_run(folders, tmp_path_factory):
  """A run on the thresholding folder, trained without validation (training ignores it)."""
  root = tmp_path_factory.mktemp("thresholding_run")
  c = _config(root / "cache", folders["thresholding"])
  c.validation_prompt = ""
  _train(c, root / "run")
  return str(root / "run")


@pytest.fixture(scope="module")
def image_and_mask(tmp_path_factory):
  """A 64 px toy image and a mask of its middle, as PNG files."""
  root = tmp_path_factory.mktemp("edit_inputs")
  first = os.path.join(TOY, sorted(os.listdir(TOY))[0])
  image = np.asarray(Image.open(first).convert("RGB").resize((64, 64)))
  mask = np.zeros((64, 64), np.uint8)
  mask[16:48, 16:48] = 255
  Image.fromarray(image).save(root / "image.png")
  Image.fromarray(mask).save(root / "mask.png")
  return str(root / "image.png"), str(root / "mask.png")


def test_a_run_on_a_ddpm_folder_trains_and_writes_its_validation_images(run, folders):
  with open(os.path.join(folders["DDPMScheduler"], "scheduler", "scheduler_config.json"),
            encoding="utf-8") as f:
    assert json.load(f)["variance_type"] == "fixed_small"  # what failed in issue 28
  assert run["result"]["step"] == 2 and not run["result"]["interrupted"]
  assert os.path.exists(os.path.join(run["workdir"], "learned_embeds.safetensors"))
  # Step 2's image is there: validation works, and is tried again after step 1's failure.
  assert os.listdir(os.path.join(run["workdir"], "validation")) == ["step000002_0.png"]


def test_an_exception_inside_validation_is_one_warning_and_the_run_goes_on(run):
  lines = [line for line in run["stderr"].splitlines() if "validation" in line]
  assert lines == ["warning: no validation images at step 1, training goes on: "
                   "RuntimeError: RESOURCE_EXHAUSTED: out of memory"], run["stderr"]
  assert "Traceback" not in run["stderr"]


@pytest.mark.parametrize("class_name", CLASSES)
def test_each_scheduler_class_folder_validates_samples_and_edits(run, folders, class_name,
                                                                 image_and_mask, tmp_path):
  folder = folders[class_name]
  devices = jax.local_devices()[:1]
  # A run on this folder builds its validation sampler at start-up from the folder's
  # scheduler config (the shared run renders validation images with the generator that
  # sampling uses below).
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
    model = model_stub(json.load(f), path=folder)
  c = _config(run["root"] / "cache", folder)
  assert validation.make(c, model, [[0]], devices, str(tmp_path), {})
  common = dict(workdir=run["workdir"], pretrained_model_name_or_path=folder,
                allow_base_model_mismatch=True, num_images=1, num_inference_steps=STEPS,
                scheduler=SAMPLER, devices=devices)
  assert len(runner.run(prompts=[PROMPT], output_dir=str(tmp_path / "samples"), **common)) == 1
  image, mask = image_and_mask
  assert len(editing.run(image=image, mask=mask, prompt=PROMPT,
                         output_dir=str(tmp_path / "edits"), **common)) == 1


# --- refused at start-up, in one line ------------------------------------------------


def _one_line(e: BaseException) -> str:
  """The message of a refusal of the thresholding folder, checked: one line, naming the
  field and the samplers that can sample it."""
  text = str(e)
  assert "\n" not in text and "thresholding=True is not supported" in text, text
  assert text.endswith(" pndm or euler can sample this model"), text
  return text


def test_a_run_is_refused_before_its_first_step(folders, tmp_path):
  c = _config(tmp_path / "cache", folders["thresholding"])
  with pytest.raises(validation.ValidationSchedulerError) as err:
    dry_run.dry_run(c, str(tmp_path / "run"))
  assert _one_line(err.value).startswith("config.validation_scheduler='dpm++2m'")
  with pytest.raises(errors.UserError) as err:
    _train(c, tmp_path / "run")
  assert isinstance(err.value, validation.ValidationSchedulerError)
  _one_line(err.value)
  # Refused right after the model loads (before caching, resume and compiling): no
  # checkpoint folder, no metrics, no images.
  run_dir = tmp_path / "run"
  assert not run_dir.exists() or not set(os.listdir(run_dir)) & {
      "metrics.jsonl", "validation", "checkpoints"}, os.listdir(run_dir)
  # The euler sampler takes no thresholding: the same folder validates with it.
  c.validation_scheduler = "euler"
  validation.check_scheduler(c, load_stable_diffusion(folders["thresholding"]))


def test_sample_and_edit_are_refused_before_any_image(bad_run, image_and_mask, tmp_path):
  devices = jax.local_devices()[:1]
  common = dict(workdir=bad_run, num_images=1, num_inference_steps=STEPS, scheduler=SAMPLER,
                devices=devices)
  with pytest.raises(sampling_concepts.SampleError) as err:
    runner.run(prompts=[PROMPT], output_dir=str(tmp_path / "samples"), **common)
  _one_line(err.value)
  image, mask = image_and_mask
  with pytest.raises(editing.EditError) as err:
    editing.run(image=image, mask=mask, prompt=PROMPT, output_dir=str(tmp_path / "edits"),
                **common)
  _one_line(err.value)
  assert not os.listdir(tmp_path)  # no output folder either


def test_evaluate_is_refused_before_any_run_is_evaluated(run, bad_run, tmp_path):
  protocol = evaluator.Protocol(num_samples=1, num_inference_steps=STEPS, scheduler=SAMPLER,
                                clip_model=clip_io.TINY_CLIP, scorer="clip")
  # The run on a usable model comes first: its evaluation must not start either.
  with pytest.raises(evaluator.EvaluateError) as err:
    evaluator.run(workdirs=[run["workdir"], bad_run], protocol=protocol,
                  output_dir=str(tmp_path / "eval"), cache_dir=str(tmp_path / "cache"),
                  devices=jax.local_devices()[:1])
  _one_line(err.value)
  assert not os.path.exists(tmp_path / "eval" / "report.json")


def test_the_config_check_takes_any_step_count_for_pndm(tmp_path):
  """validate_config checks the sampler's name only: built from an empty config, pndm took
  the PRK warm-up of PNDMScheduler's defaults and refused fewer than 4 steps for any model."""
  c = _config(tmp_path / "cache", "tiny-sd15", validation_scheduler="pndm")
  c.validation_scheduler = "pndm"
  training_config.validate_config(c)
  c.validation_scheduler = "heun"
  with pytest.raises(training_config.ConfigError):
    training_config.validate_config(c)


def _schedule(folder):
  """The training noise schedule a run on `folder` uses (what `inputs.load_model` builds
  from the model's scheduler config)."""
  with open(os.path.join(folder, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
    return noise_schedule.noise_schedule_from_config(json.load(f))


@pytest.mark.parametrize("class_name", CLASSES)
def test_each_scheduler_class_folder_trains_as_the_shared_run(folders, class_name):
  """Training reads the scheduler config only for its noise schedule (the DDPM table of
  alphas_cumprod), and every class's folder gives the shared DDPM run's schedule bit for
  bit, so it trains the same steps (its validation sampler is checked above)."""
  schedule, reference = _schedule(folders[class_name]), _schedule(folders["DDPMScheduler"])
  np.testing.assert_array_equal(np.asarray(schedule.alphas_cumprod),
                                np.asarray(reference.alphas_cumprod))
  assert (schedule.num_train_timesteps, schedule.prediction_type) == (
      reference.num_train_timesteps, reference.prediction_type)
