"""Every `jax.pmap` idiom of ti_jax lives here, so the step can move to a `Mesh` later.

Data parallelism over one axis named `AXIS`: frozen params and the train state
are replicated (leading device axis), per-step inputs are sharded
`[devices, per_device_batch, ...]`, and gradients are averaged with
`lax.pmean` inside the step.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

AXIS = "batch"


def local_devices(num_devices: int | None = None) -> list:
  """The devices this process drives (the first `num_devices` of them if given)."""
  devices = jax.local_devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices but only {len(devices)} are present")
    devices = devices[:num_devices]
  return devices


def _stacked_sharding(devices: Sequence) -> jax.sharding.NamedSharding:
  """Sharding of arrays whose leading axis has one entry per device (pmap's layout)."""
  mesh = jax.sharding.Mesh(np.asarray(list(devices)), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree: Any, devices: Sequence) -> Any:
  """Copies every leaf to every device: leaves get a leading `[len(devices)]` axis."""
  sharding = _stacked_sharding(devices)
  n = len(devices)
  # broadcast_to is a view: each device receives the host array, no n-fold copy.
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x)),
                               sharding), tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated tree, fetched to the host."""
  return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], tree))


def shard(tree: Any, num_devices: int) -> Any:
  """Splits leading batch axes `[B, ...]` into `[num_devices, B / num_devices, ...]` (host arrays)."""
  def split(x):
    x = np.asarray(x)
    if x.shape[0] % num_devices:
      raise ValueError(f"batch of {x.shape[0]} does not split over {num_devices} devices")
    return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])
  return jax.tree_util.tree_map(split, tree)


def unshard(x: Any) -> np.ndarray:
  """Inverse of `shard` for one array: `[D, b, ...] -> [D * b, ...]` on the host."""
  x = np.asarray(jax.device_get(x))
  return x.reshape((-1,) + x.shape[2:])


def pmean(x: Any) -> Any:
  """Mean over all devices of the data-parallel axis (call inside a `pmapped` function)."""
  return jax.lax.pmean(x, axis_name=AXIS)


def device_index() -> jax.Array:
  """This device's position along the data-parallel axis (inside a `pmapped` function)."""
  return jax.lax.axis_index(AXIS)


def pmapped(fn: Callable, devices: Sequence, *, donate_argnums: tuple[int, ...] = (),
            static_broadcasted_argnums: tuple[int, ...] = ()) -> Callable:
  """`jax.pmap` over `devices` along `AXIS`; all arguments carry a leading device axis."""
  return jax.pmap(fn, axis_name=AXIS, devices=list(devices), donate_argnums=donate_argnums,
                  static_broadcasted_argnums=static_broadcasted_argnums)
