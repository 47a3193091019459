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


def mesh_step_lowered(built: dict, devices, shard_weights: bool):
  """The mesh step lowered for `devices` with `built`'s settings and shapes
  (`aot_compile.train_step_args`), the frozen weights FSDP-sharded with `shard_weights`,
  and the arguments it was lowered with (`ShapeDtypeStruct`s carrying their shardings)."""
  from ti_jax.runtime import parallel  # pylint: disable=import-outside-toplevel
  from ti_jax.training import train_lib  # pylint: disable=import-outside-toplevel
  mesh = parallel.make_mesh(devices, 1)  # [1 concept shard, chips]
  # The optimizer `train_step_args` builds (AdamW at its defaults), per concept rate.
  make_opt = functools.partial(train_lib.make_optimizer, b1=0.9, b2=0.999, eps=1e-8,
                               weight_decay=1e-2)
  state, frozen, global_batch = built["unreplicated"]
  args = train_lib.one_concept_mesh_args(mesh, state, frozen, global_batch, seed=0,
                                         shard_weights=shard_weights)
  step = train_lib.make_mesh_step(built["settings"], make_opt, built["lr"], mesh)
  return step.lower(*args), args


def per_chip_bytes(args) -> int:
  """Bytes of one chip's shards of `args` (`ShapeDtypeStruct`s with shardings): what its
  arguments should take when nothing is duplicated (before TPU tile padding)."""
  import jax  # pylint: disable=import-outside-toplevel
  return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(args)))
