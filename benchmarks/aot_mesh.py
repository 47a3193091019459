"""The mesh training step (`train_lib.make_mesh_step`) for `benchmarks/aot_compile.py`.

`--shard_weights true|false` compiles `ti_jax.train`'s mesh step for one concept over
every chip of the topology (a `[1, chips]` mesh: one concept shard, the batch split
over the data axis) instead of the pmapped step: with "true" the frozen UNet and text
encoder weights are FSDP-sharded over the chips (`parallel.fsdp_spec`; XLA gathers
them per layer), with "false" replicated as in the pmapped step. Arguments come from
the same abstract shapes as the pmapped step's, unreplicated.
"""

from __future__ import annotations

import functools

import numpy as np


def mesh_step_lowered(built: dict, devices, shard_weights: bool, num_concepts: int = 1):
  """The mesh step lowered for `devices` with `built`'s settings and shapes
  (`aot_compile.train_step_args`), the frozen weights FSDP-sharded with `shard_weights`,
  and the arguments it was lowered with (`ShapeDtypeStruct`s carrying their shardings).

  `num_concepts` K > 1: a run of K concepts (`ti_jax.train --config.concepts_file`)
  sharing the step's examples (each concept's batch is the global batch / K), laid out as
  `concepts_run` lays them (`parallel.concept_shards`, padding included)."""
  import jax  # pylint: disable=import-outside-toplevel

  from ti_jax.runtime import parallel  # pylint: disable=import-outside-toplevel
  from ti_jax.training import train_lib  # pylint: disable=import-outside-toplevel
  # The optimizer `train_step_args` builds (AdamW at its defaults), per concept rate.
  make_opt = functools.partial(train_lib.make_optimizer, b1=0.9, b2=0.999, eps=1e-8,
                               weight_decay=1e-2)
  state, frozen, global_batch = built["unreplicated"]
  if num_concepts == 1:
    mesh = parallel.make_mesh(devices, 1)  # [1 concept shard, chips]
    args = train_lib.one_concept_mesh_args(mesh, state, frozen, global_batch, seed=0,
                                           shard_weights=shard_weights)
  else:
    total = jax.tree_util.tree_leaves(global_batch)[0].shape[0]
    if total % num_concepts:
      raise ValueError(f"the step's {total} examples do not split into {num_concepts} concepts")
    per_concept = total // num_concepts
    batch = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((per_concept,) + tuple(x.shape[1:]), x.dtype),
        global_batch)
    shards = parallel.concept_shards(num_concepts, len(devices), per_concept)
    mesh = parallel.make_mesh(devices, shards)
    padded = parallel.padded_concepts(num_concepts, shards)

    def stacked(tree):
      return parallel.pad_stacked(parallel.stack([tree] * num_concepts), padded)
    slots = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   train_lib.concept_slots([0] * padded, [1.0] * padded))
    args = train_lib.place_mesh_args(
        mesh, stacked(state), train_lib.stack_frozen([frozen] * num_concepts, padded),
        stacked(batch), slots, shard_weights)
  step = train_lib.make_mesh_step(built["settings"], make_opt, built["lr"], mesh)
  return step.lower(*args), args


def per_chip_bytes(args) -> int:
  """Bytes of one chip's shards of `args` (`ShapeDtypeStruct`s with shardings): what its
  arguments should take when nothing is duplicated (before TPU tile padding)."""
  import jax  # pylint: disable=import-outside-toplevel
  return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(args)))
