"""Shared fixtures. Eight fake CPU devices are configured before JAX is imported."""

import gc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types

# The tests compile for LLVM's -O0 (`xla_backend_optimization_level=0`): XLA's own passes
# (fusion, layout, algebraic simplification) are unchanged, only the machine-code
# optimisation of the compiled loops is skipped. Tiny models spend most of a test's time
# compiling, and -O0 compiles about a third faster; the programs then run their elementwise
# loops unvectorised (slower), so the tests that run long (the world run, its scores) run in
# a subprocess at the default level (`xla_flags(optimized=True)`). The two levels round
# differently in the last bits, so a test compares results of one level only.
TEST_XLA_OPTIONS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int, optimized: bool = False) -> str:
  """XLA_FLAGS for a test process (or a subprocess) with `devices` fake CPU devices, at the
  tests' optimisation level (`optimized`: XLA's default, as users run)."""
  return (f"--xla_force_host_platform_device_count={devices}"
          + ("" if optimized else " " + TEST_XLA_OPTIONS))


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
# One persistent XLA cache per test session, shared with the subprocesses the
# tests start, so each distinct program compiles once (compiles dominate on CPU).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_XLA_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ti_jax-xla-")
else:
  _OWN_XLA_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from ti_jax.weights import tiny_models  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_file_module(path: str, name: str):
  """The Python file at `path` as a module named `name` (config files and benchmark scripts
  are files, not packages)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # before running it: dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def config_module(name: str):
  """configs/<name>.py, e.g. config_module("object").get_config("tiny")."""
  return load_file_module(os.path.join(REPO, "configs", f"{name}.py"), f"configs_{name}")


def benchmark_module(name: str):
  """benchmarks/<name>.py as a module. The scripts import their shared `common`
  (benchmarks/common.py) by name, as Python does for a script's own folder."""
  for module in ("common", name):
    if module not in sys.modules:
      load_file_module(os.path.join(REPO, "benchmarks", f"{module}.py"), module)
  return sys.modules[name]


def step_pieces(model_dir: str, num_vectors: int, *, flip: bool = True, seed: int = 0) -> dict:
  """The training step's pieces for the toy images on a tiny model, built as the trainer does.

  Keys: sd, ids (placeholder ids), table (token table), init (initial vectors), images,
  templates, template_ids (`[num_templates, T]` prompts with every placeholder vector),
  frozen (`train_lib.Frozen`), settings (`train_lib.StepSettings` with `seed`), num_images.
  """
  # pylint: disable=import-outside-toplevel
  import numpy as np

  from ti_jax.data import captions, image_loader, latent_cache
  from ti_jax.embeddings import pseudo_words
  from ti_jax.sampling import noise_schedule
  from ti_jax.training import train_lib
  from ti_jax.weights.loading import load_stable_diffusion
  sd = load_stable_diffusion(model_dir)
  ids = pseudo_words.add_placeholder_tokens(sd.tokenizer, "<toy>", num_vectors)
  table = np.asarray(sd.text_encoder_params["embeddings"]["token_embedding"]["embedding"])
  init = pseudo_words.initializer_vectors(sd.tokenizer, table, "toy", num_vectors)
  images = image_loader.load_training_images(os.path.join(REPO, "examples", "toy"), 64, False)
  mean, std = latent_cache.encode_views(sd.vae, sd.vae_params,
                                        image_loader.view_pixels(images.pixels, flip))
  frozen = train_lib.Frozen(unet=sd.unet_params, text_encoders=(sd.text_encoder_params,),
                            latent_mean=mean, latent_std=std,
                            placeholder_ids=(np.asarray(ids, np.int32),),
                            schedule=noise_schedule.noise_schedule_from_config(sd.scheduler_config))
  settings = train_lib.StepSettings(unet=sd.unet, text_encoders=(sd.text_encoder,),
                                    scaling_factor=sd.vae.config.scaling_factor,
                                    shift_factor=0.0, seed=seed)
  templates = captions.templates_for("object")
  words = " ".join(pseudo_words.placeholder_tokens("<toy>", num_vectors))
  template_ids = captions.tokenize(sd.tokenizer, captions.build_prompts(
      np.arange(len(templates)), templates, words))
  return dict(sd=sd, ids=ids, table=table, init=init, images=images, templates=templates,
              template_ids=template_ids, frozen=frozen, settings=settings,
              num_images=images.num_images)


def model_stub(scheduler_config: dict | None = None, path: str = "stub-model"):
  """A stand-in for a loaded SD 1.x model (`weights.pipeline.StableDiffusion`) where a test
  needs only its path, scheduler config ({}: every class default) and one text encoder."""
  return types.SimpleNamespace(path=path, scheduler_config=dict(scheduler_config or {}),
                               text_encoders=(None,))


def with_diffusers_scheduler(model_dir: str, out_dir, class_name: str, **overrides) -> str:
  """A copy of the model folder `model_dir` at `out_dir` whose scheduler diffusers' own
  `class_name` wrote (`from_config` of the folder's config, then `overrides`, then
  `save_pretrained`), named in model_index.json as a saved pipeline names it; returns it.

  Folders written by ti_jax all hold one scheduler class; real ones hold whichever class
  the pipeline had when it was saved (diffusers' textual-inversion scripts: DDPMScheduler).
  """
  diffusers = pytest.importorskip("diffusers")
  out_dir = str(out_dir)
  shutil.copytree(model_dir, out_dir)
  sched_dir = os.path.join(out_dir, "scheduler")
  with open(os.path.join(sched_dir, "scheduler_config.json"), encoding="utf-8") as f:
    config = json.load(f)
  shutil.rmtree(sched_dir)
  getattr(diffusers, class_name).from_config(config, **overrides).save_pretrained(sched_dir)
  index_path = os.path.join(out_dir, "model_index.json")
  with open(index_path, encoding="utf-8") as f:
    index = json.load(f)
  index["scheduler"] = ["diffusers", class_name]
  with open(index_path, "w", encoding="utf-8") as f:
    json.dump(index, f, indent=2)
  return out_dir


# Parity figures (name, max relative error, tolerance) reported at the end of the run.
PARITY_FIGURES: list[tuple[str, float, float]] = []


def tiny_clip_tokenizer(folder):
  """A fresh CLIPTokenizer of ti_jax's tiny CLIP-format vocabulary, written to `folder`
  (each caller gets its own copy to add tokens to)."""
  transformers = pytest.importorskip("transformers")
  from ti_jax.weights.tiny_tokenizer import write_tiny_clip_tokenizer
  write_tiny_clip_tokenizer(str(folder))
  return transformers.CLIPTokenizer.from_pretrained(str(folder))


def record_parity(name: str, rel_err: float, tol: float) -> None:
  """Records a parity figure for the summary and asserts it is within `tol`."""
  PARITY_FIGURES.append((name, rel_err, tol))
  assert rel_err <= tol, f"{name}: max relative error {rel_err:.3g} > {tol:g}"


def world_config(name: str, variant: str):
  """`configs/NAME.py:VARIANT` of the tiny world for tests: its repository paths made absolute,
  the session's XLA cache, no validation images."""
  c = config_module(name).get_config(variant)
  c.train_data_dir = os.path.join(REPO, c.train_data_dir)
  c.templates_file = os.path.join(REPO, c.templates_file)
  c.compilation_cache_dir = os.environ["JAX_COMPILATION_CACHE_DIR"]
  c.validation_prompt, c.validation_prompts = "", ()
  return c


def offline_config(c, cache_dir, **overrides):
  """A training config for tests: tiny models under `cache_dir`, the session's XLA cache, no
  validation images; then `overrides` (field=value)."""
  c.cache_dir = str(cache_dir)
  c.compilation_cache_dir = os.environ["JAX_COMPILATION_CACHE_DIR"]
  c.validation_prompt = ""
  for k, v in overrides.items():
    c[k] = v
  return c


def _memory_maps() -> int:
  try:
    with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux
    return 0


MAX_MEMORY_MAPS: list[int] = [0]
# Programs are dropped after a module only once the process holds this many memory maps: the
# modules after a light one keep the programs they share (the tiny models' steps and
# samplers) instead of loading them from the persistent cache again. One module adds at most
# about 35,000 maps (measured), so the limit stays out of reach.
CLEAR_ABOVE_MAPS = 20000


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops every compiled XLA program after a test module that leaves the process holding
  more than CLEAR_ABOVE_MAPS memory maps (always where they cannot be counted).

  Each CPU executable holds its own memory maps, and Linux allows a process
  65530 of them (vm.max_map_count): the whole suite's programs in one pytest
  process ran into that limit, and LLVM then crashed the process ("Cannot
  allocate memory", then SIGSEGV). Programs still come back from the persistent
  cache for later modules."""
  yield
  maps = _memory_maps()
  MAX_MEMORY_MAPS[0] = max(MAX_MEMORY_MAPS[0], maps)
  if os.environ.get("TI_JAX_MAPS_LOG"):  # per-worker figures (xdist shows only the controller's)
    with open(os.environ["TI_JAX_MAPS_LOG"], "a", encoding="utf-8") as f:
      f.write(f"{os.getpid()} {maps}\n")
  if not maps or maps > CLEAR_ABOVE_MAPS:
    import jax  # pylint: disable=import-outside-toplevel
    jax.clear_caches()
  gc.collect()


def pytest_terminal_summary(terminalreporter):
  if MAX_MEMORY_MAPS[0]:
    terminalreporter.write_line(f"most memory maps held by the test process: {MAX_MEMORY_MAPS[0]}"
                                " (Linux's limit: vm.max_map_count, usually 65530)")
  if PARITY_FIGURES:
    terminalreporter.section("parity vs PyTorch diffusers/transformers (max |a-b| / max |b|)")
    for name, err, tol in PARITY_FIGURES:
      terminalreporter.write_line(f"{name:<55s} {err:.2e}  (tolerance {tol:g})")


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> str:
  """A tiny random SD 1.x-shaped diffusers folder written by ti_jax."""
  return tiny_models.write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "sd15"), "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sd21(tmp_path_factory) -> str:
  """A tiny random SD 2.x-shaped diffusers folder written by ti_jax."""
  return tiny_models.write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "sd21"), "tiny-sd21")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> str:
  """A tiny random SDXL-shaped diffusers folder written by ti_jax."""
  return tiny_models.write_tiny_model(str(tmp_path_factory.mktemp("tiny") / "sdxl"), "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_run(tmp_path_factory) -> str:
  """The run directory of a 1-step run on tiny-sdxl (configs/object.py:tiny_sdxl on
  examples/toy, one device, checkpointed at step 1), its model in its own cache folder.

  Shared by the tests that sample or evaluate an SDXL run: read it, write nothing into it."""
  import jax  # pylint: disable=import-outside-toplevel

  from ti_jax.training import trainer  # pylint: disable=import-outside-toplevel
  tmp = tmp_path_factory.mktemp("sdxl_run")
  c = offline_config(config_module("object").get_config("tiny_sdxl"), tmp / "cache",
                     train_data_dir=os.path.join(REPO, "examples", "toy"), resolution=64,
                     max_train_steps=1, checkpointing_steps=1)
  workdir = str(tmp / "run")
  trainer.run(c, workdir, devices=jax.local_devices()[:1], progress=False)
  return workdir


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_XLA_CACHE:
    shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


class _WorkerFigures:
  """Under pytest-xdist (`-n 2`) each worker process runs the tests, so the parity figures and
  the memory-map count are recorded there: each worker hands them to the controller when it
  finishes, and the controller's `pytest_terminal_summary` prints them all."""

  def __init__(self, config):
    self.config = config

  @pytest.hookimpl(tryfirst=True)
  def pytest_sessionfinish(self):
    if hasattr(self.config, "workeroutput"):  # a worker: runs inside xdist's send
      self.config.workeroutput["ti_jax_parity"] = [list(f) for f in PARITY_FIGURES]
      self.config.workeroutput["ti_jax_memory_maps"] = MAX_MEMORY_MAPS[0]

  def pytest_testnodedown(self, node, error):
    del error
    output = getattr(node, "workeroutput", {})
    PARITY_FIGURES.extend(tuple(f) for f in output.get("ti_jax_parity", ()))
    MAX_MEMORY_MAPS[0] = max(MAX_MEMORY_MAPS[0], output.get("ti_jax_memory_maps", 0))


def pytest_configure(config):
  if config.pluginmanager.hasplugin("xdist"):
    config.pluginmanager.register(_WorkerFigures(config), "ti_jax_worker_figures")
    # --dist loadfile hands out files in the collection order, SLOW_FILES first (below), not
    # by their number of tests (xdist's default, which puts two-test files of minutes last).
    config.option.loadscopereorder = False


# The slowest test files (minutes each on 2 cores; CPU-seconds measured one file at a time,
# 2026-12-07), slowest first. Under `-n 2 --dist loadfile` each file runs whole on one worker,
# in the order the items come: these go first so that neither worker is left with one of them
# at the end while the other idles. Each file keeps its own tests' order; without xdist
# nothing is reordered.
SLOW_FILES = (
    "tests/training/test_train.py",  # ~490 CPU-s
    "tests/world/test_world_textual_inversion.py",  # one test of ~200 s: never last
    "tests/training/test_mesh_step.py",  # ~400
    "tests/sampling/test_sample.py",  # ~350
    "tests/sampling/test_edit.py",  # ~290
    "tests/training/test_concepts_run.py",  # ~180
    "tests/training/test_paper.py",  # ~155
    "tests/evaluation/test_evaluate.py",  # ~135
    "tests/training/test_sdxl_train.py",
    "tests/benchmarks/test_aot_compile.py",
    "tests/world/test_base_model.py",  # ~80
    "tests/training/test_multihost.py",
    "tests/models/test_attention.py",
    "tests/sampling/test_sample_concepts.py",
)


def pytest_collection_modifyitems(config, items):
  if not hasattr(config, "workerinput"):  # not an xdist worker
    return
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable
