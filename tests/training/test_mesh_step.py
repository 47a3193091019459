"""The mesh step (issue 30): K concepts stacked over a (concept, data) device mesh, one jit.

Each concept trained with others equals that concept trained alone; one concept on the mesh
equals the pmapped step; the active mask and non-finite steps hold a concept exactly; padding
concepts change nothing.
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
import safetensors.numpy
from conftest import REPO, config_module, offline_config, step_pieces, xla_flags

from ti_jax.data import choices
from ti_jax.runtime import parallel
from ti_jax.training import train_lib, trainer

TOY = os.path.join(REPO, "examples", "toy")

BASE_LR = 5e-3
# Examples per concept per step: the one-device pmapped program is then test_train.py's, which
# a suite run compiles once for both.
BATCH = 2
STEPS = 2
MAKE_OPT = functools.partial(train_lib.make_optimizer, b1=0.9, b2=0.999, eps=1e-8,
                             weight_decay=1e-2)


@pytest.fixture(scope="module")
def setup(tiny_sd15):
  """A tiny SD with a 2-vector placeholder, the toy images' latents and the step's pieces."""
  return step_pieces(tiny_sd15, 2)


@dataclasses.dataclass(frozen=True)
class Concept:
  """One test concept: its seed, learning-rate scale, images (of the toy's) and start."""
  seed: int
  lr_scale: float
  images: tuple  # the toy images it trains on
  nudge: float  # added to the shared initial vectors


CONCEPTS = (Concept(0, 1.0, (0, 1, 2, 3), 0.0), Concept(7, 2.0, (1, 3), 0.01),
            Concept(3, 0.5, (0, 1, 2, 3), -0.02))


def _frozen(setup, concept: Concept, settings) -> train_lib.Frozen:
  """The frozen arrays of `concept`: its images' views (image i, then the mirrors)."""
  n = setup["num_images"]
  views = np.r_[list(concept.images), [n + i for i in concept.images]]
  f = setup["frozen"]
  init = ((np.asarray(setup["init"].vectors, np.float32) + concept.nudge,)
          if settings.embedding_reg_weight else None)
  return f.replace(latent_mean=np.asarray(f.latent_mean)[views],
                   latent_std=np.asarray(f.latent_std)[views], init_embeds=init)


def _batch(setup, concept: Concept, step: int, size: int = BATCH) -> dict:
  """`concept`'s global batch of `step` `[size, ...]`, drawn from its seed over its images."""
  index = np.arange(size)
  view, tmpl = choices.example_choices(concept.seed, step, index, global_batch_size=size,
                                       num_images=len(concept.images), flip_p=0.5,
                                       num_templates=len(setup["template_ids"]))
  return {"input_ids": setup["template_ids"][tmpl], "view_index": view,
          "example_index": index.astype(np.int32)}


def _state(setup, concept: Concept):
  opt = MAKE_OPT(optax.constant_schedule(BASE_LR))
  return train_lib.init_state({"embeds": setup["init"].vectors + concept.nudge}, opt)


_COMPILED = {}  # (settings, mesh, shard_weights, argument shapes) -> compiled mesh step


def _compiled_mesh_step(settings, mesh, shard_weights, *args):
  """The mesh step compiled for `args` (placed by `place_mesh_args`), once per module for each
  settings, mesh and argument shapes: the concepts' values differ, not the program."""
  shapes = (jax.tree_util.tree_structure(args),
            tuple((x.shape, x.dtype) for x in jax.tree_util.tree_leaves(args)))
  key = (settings, tuple(mesh.devices.shape), tuple(d.id for d in mesh.devices.flat),
         shard_weights, shapes)
  if key not in _COMPILED:
    step_fn = train_lib.make_mesh_step(settings, MAKE_OPT, optax.constant_schedule(BASE_LR), mesh)
    _COMPILED[key] = step_fn.lower(*args).compile()
  return _COMPILED[key]


def _run_mesh(setup, concepts, mesh, settings=None, active=None, lr_scales=None, steps=STEPS,
              batch_size=BATCH, shard_weights=False):
  """The concepts' vectors `[K, n, D]`, final state, last metrics and the compiled step after
  `steps` mesh steps."""
  settings = settings or setup["settings"]
  k = len(concepts)
  padded = parallel.padded_concepts(k, parallel.concept_size(mesh))
  lr_scales = [c.lr_scale for c in concepts] if lr_scales is None else lr_scales
  active = [True] * k if active is None else active
  pad = padded - k  # dummy concepts: inactive, their results dropped
  slots = train_lib.concept_slots([c.seed for c in concepts] + [0] * pad,
                                  list(lr_scales) + [1.0] * pad, list(active) + [False] * pad)
  state = parallel.pad_stacked(parallel.stack([_state(setup, c) for c in concepts]), padded)
  frozen = train_lib.stack_frozen([_frozen(setup, c, settings) for c in concepts])
  frozen = frozen.replace(**{f: parallel.pad_stacked(getattr(frozen, f), padded)
                             for f in train_lib.CONCEPT_FIELDS})
  metrics = compiled = None
  for step in range(steps):
    batch = parallel.pad_stacked(
        parallel.stack([_batch(setup, c, step, batch_size) for c in concepts]), padded)
    if step == 0:
      state, frozen_on, batch, slots_on = train_lib.place_mesh_args(
          mesh, state, frozen, batch, slots, shard_weights)
      compiled = _compiled_mesh_step(settings, mesh, shard_weights, state, frozen_on, batch,
                                     slots_on)
    else:
      batch = parallel.put(batch, mesh, parallel.batch_spec())
    state, metrics = compiled(state, frozen_on, batch, slots_on)
  host = parallel.fetch(state)
  return host.params["embeds"][:k], host, parallel.fetch(metrics), compiled


def _run_pmapped(setup, concept: Concept, devices, settings=None, steps=STEPS,
                 batch_size=BATCH):
  """`concept`'s vectors after `steps` steps of the pmapped step alone on `devices`."""
  settings = dataclasses.replace(settings or setup["settings"], seed=concept.seed)
  lr = optax.constant_schedule(BASE_LR * concept.lr_scale)
  opt = MAKE_OPT(lr)
  step_fn = train_lib.make_pmapped_step(settings, opt, lr, devices)
  state = parallel.replicate(_state(setup, concept), devices)
  frozen = parallel.replicate(_frozen(setup, concept, settings), devices)
  for step in range(steps):
    batch = _batch(setup, concept, step, batch_size)
    state, _ = step_fn(state, frozen, parallel.shard(batch, len(devices)))
  return np.asarray(parallel.unreplicate(state).params["embeds"])


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


def _compare(setup, concept, devices, settings=None, batch_size=BATCH):
  alone = _run_pmapped(setup, concept, devices, settings, batch_size=batch_size)
  mesh = parallel.make_mesh(devices, 1)  # one concept: its batch over every device
  meshed, _, metrics, _ = _run_mesh(setup, [concept], mesh, settings, batch_size=batch_size)
  assert np.abs(alone - setup["init"].vectors - concept.nudge).max() > 1e-4  # they moved
  print(f"{len(devices)} device(s): mesh vs pmapped max relative difference "
        f"{_rel(meshed[0], alone):.2e}, bit-identical: {np.array_equal(meshed[0], alone)}")
  assert _rel(meshed[0], alone) <= 1e-5
  assert metrics["finite"].tolist() == [True]


def test_one_concept_on_the_mesh_equals_the_pmapped_step(setup):
  _compare(setup, CONCEPTS[0], jax.local_devices()[:1])


def test_on_several_devices_with_every_loss_option(setup):
  """One concept's batch over 2 devices, with gradient accumulation (micro-batches of each
  device's own examples), min-SNR weighting, noise offset, the embedding pull and progressive
  words: the same pure pieces in both layouts."""
  settings = dataclasses.replace(setup["settings"], gradient_accumulation_steps=2, snr_gamma=5.0,
                                 noise_offset=0.1, embedding_reg_weight=0.1, progressive_words=1)
  _compare(setup, CONCEPTS[1], jax.local_devices()[:2], settings, batch_size=4)


@pytest.fixture(scope="module")
def alone(setup):
  """Each concept's vectors trained alone: one concept on a one-device mesh (equal to the
  pmapped step, above)."""
  mesh = parallel.make_mesh(jax.local_devices()[:1], 1)
  return [_run_mesh(setup, [c], mesh)[0][0] for c in CONCEPTS]


_TOGETHER = {}  # (devices, concept shards, shard_weights) -> _run_mesh's result


def _together(setup, num_devices, shards, shard_weights=False):
  """CONCEPTS trained together on `num_devices` devices in `shards` concept shards (run once)."""
  key = (num_devices, shards, shard_weights)
  if key not in _TOGETHER:
    mesh = parallel.make_mesh(jax.local_devices()[:num_devices], shards)
    _TOGETHER[key] = _run_mesh(setup, CONCEPTS, mesh, shard_weights=shard_weights)
  return _TOGETHER[key]


@pytest.mark.parametrize("num_devices,concept_shards", [(2, None), (4, 2)])
def test_concepts_together_equal_each_alone(setup, alone, num_devices, concept_shards):
  """3 concepts (own seeds, rates, images, starts) on 2 devices (2 x 1: one padding concept)
  and on 4 (2 x 2: each concept's batch over 2 devices)."""
  shards = concept_shards or parallel.concept_shards(len(CONCEPTS), num_devices, BATCH)
  meshed, state, metrics, _ = _together(setup, num_devices, shards)
  assert state.params["embeds"].shape[0] == 4  # padded to a multiple of the concept shards
  for k, vectors in enumerate(alone):
    assert _rel(meshed[k], vectors) <= 1e-5, k
  assert not np.allclose(alone[0], alone[2])  # the concepts did differ
  assert metrics["finite"].tolist() == [True] * 4 and metrics["loss"].shape == (4,)


def test_inactive_and_non_finite_concepts_are_held(setup, alone):
  devices = jax.local_devices()[:2]
  mesh = parallel.make_mesh(devices, 2)
  start = parallel.stack([_state(setup, c) for c in CONCEPTS])
  # Concept 1 switched off by the caller, concept 2's rate nan: its first step goes nan.
  meshed, state, metrics, _ = _run_mesh(setup, CONCEPTS, mesh, active=[True, False, True],
                                     lr_scales=[1.0, 2.0, float("nan")])
  for k in (1, 2):
    for got, want in zip(jax.tree_util.tree_leaves((state.params, state.opt_state)),
                         jax.tree_util.tree_leaves((start.params, start.opt_state))):
      np.testing.assert_array_equal(got[k], want[k])
  assert metrics["finite"].tolist()[:3] == [True, True, False]
  assert _rel(meshed[0], alone[0]) <= 1e-5  # the others train on


@pytest.mark.parametrize("concepts,devices,batch,want", [
    (3, 2, 4, 2), (3, 4, 4, 4), (5, 4, 4, 2), (16, 8, 1, 8), (64, 8, 8, 8), (1, 1, 1, 1),
    (1, 4, 4, 1)])
def test_concept_shards_waste_at_most_one_devices_share(concepts, devices, batch, want):
  shards = parallel.concept_shards(concepts, devices, batch)
  assert shards == want
  padded = parallel.padded_concepts(concepts, shards)
  assert padded % shards == 0 and (padded - concepts) * devices <= padded
  assert batch % (devices // shards) == 0


def test_concept_shards_of_a_batch_smaller_than_the_devices_pad_least():
  # A batch of 4 does not split over 8 devices: 2 shards of 4 (one padding concept) pad least.
  assert parallel.concept_shards(1, 8, 4) == 2


def test_sharded_weights_give_the_replicated_results_in_less_memory(setup, alone):
  """The frozen weights FSDP-sharded over a 2 x 2 mesh (3 concepts): the vectors of replicated
  weights (and of each concept alone), with each device holding a fraction of the weights."""
  sharded, _, _, sharded_step = _together(setup, 4, 2, shard_weights=True)
  replicated, _, _, replicated_step = _together(setup, 4, 2)
  for k, vectors in enumerate(alone):
    assert _rel(sharded[k], replicated[k]) <= 1e-5 and _rel(sharded[k], vectors) <= 1e-5, k
  sharded_bytes = sharded_step.memory_analysis().argument_size_in_bytes
  replicated_bytes = replicated_step.memory_analysis().argument_size_in_bytes
  print(f"per-device argument bytes: sharded {sharded_bytes}, replicated {replicated_bytes}")
  assert sharded_bytes < 0.5 * replicated_bytes
  # Weights are gathered where used; activations are not resharded to follow the weights.
  program = sharded_step.as_text()
  assert "all-gather" in program and "all-to-all" not in program


def test_auto_shards_when_replicated_weights_do_not_fit(setup):
  """shard_weights="auto": the replicated step's memory plan, from shapes, against the limit."""
  devices = jax.local_devices()[:1]
  lr = optax.constant_schedule(BASE_LR)
  shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                  (_state(setup, CONCEPTS[0]), setup["frozen"],
                                   _batch(setup, CONCEPTS[0], 0)))
  args = (*parallel.replicate(shapes[:2], devices), parallel.shard(shapes[2], 1))
  fit = functools.partial(train_lib.replicated_weights_fit, setup["settings"], MAKE_OPT(lr), lr,
                          devices, args, remat=False)
  assert fit(None) and fit(1 << 40)
  assert not fit(1 << 20)  # the tiny model's weights alone take more than a MiB
  # What an ahead-of-time script lowers: one concept's sharded mesh step from shapes alone.
  mesh = parallel.make_mesh(jax.local_devices()[:4], 1)
  batch4 = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((4,) + x.shape[1:], x.dtype),
                                  shapes[2])  # [B = 4, ...]: one example per device
  state, frozen, batch, slots = train_lib.one_concept_mesh_args(mesh, *shapes[:2], batch4, 0,
                                                                shard_weights=True)
  assert batch["input_ids"].sharding.spec == parallel.batch_spec()
  assert any(x.sharding.spec != parallel.P() for x in jax.tree_util.tree_leaves(frozen.unet))
  train_lib.make_mesh_step(setup["settings"], MAKE_OPT, lr, mesh).lower(state, frozen, batch,
                                                                        slots)


def test_fsdp_spec_shards_large_leaves_along_a_divisible_axis():
  axes = parallel.MESH_AXES
  assert parallel.fsdp_spec((320, 4, 3, 3), 4) == parallel.P(axes)
  assert parallel.fsdp_spec((3, 3, 4, 320), 4) == parallel.P(None, None, None, axes)
  assert parallel.fsdp_spec((3, 3, 7, 330), 4) == parallel.P()  # no axis divides
  assert parallel.fsdp_spec((320,), 4) == parallel.P()  # small: replicated


def test_cli_trains_and_exports_with_sharded_weights(tmp_path):
  """`python -m ti_jax.train --config.shard_weights=True` on 4 devices: the mesh step with the
  weights sharded, the run's log and export as usual, the vectors of replicated weights."""
  cache, steps = tmp_path / "cache", 2
  cmd = [sys.executable, "-m", "ti_jax.train", "--config",
         os.path.join(REPO, "configs/object.py:tiny"), "--workdir", str(tmp_path / "sharded"),
         f"--config.cache_dir={cache}", f"--config.train_data_dir={TOY}",
         "--config.validation_prompt=", f"--config.max_train_steps={steps}",
         f"--config.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}",
         "--config.shard_weights=True"]
  env = dict(os.environ, XLA_FLAGS=xla_flags(4))
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  sharded = safetensors.numpy.load_file(str(tmp_path / "sharded" / "learned_embeds.safetensors"))
  with open(tmp_path / "sharded" / "metrics.jsonl", encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records][-1] == steps and "finite" not in records[-1]
  config = offline_config(config_module("object").get_config("tiny"), cache,
                          train_data_dir=TOY, max_train_steps=steps, validation_prompt="")
  replicated = trainer.run(config, str(tmp_path / "replicated"),
                           devices=jax.local_devices()[:4], progress=False)
  vectors = sharded[config.placeholder_token]
  assert _rel(vectors, replicated["embeds"]) <= 1e-5
