"""Every `jax.pmap` idiom of ti_jax lives here, so the step can move to a `Mesh` later.

Data parallelism over one axis named `AXIS` that spans the devices of every
process: frozen params and the train state are replicated (a leading device
axis), each process feeds its own devices' slice of the global batch
`[local_devices, per_device_batch, ...]`, and gradients are averaged with
`lax.pmean` inside the step. With one process this is plain single-host pmap.

`replicate` and `shard` also take `jax.ShapeDtypeStruct` leaves and return
the per-device layout as shapes, so a step can be lowered and compiled ahead
of time for devices that are not attached (e.g. a TPU topology described by
`jax.experimental.topologies` on a CPU host) without materialising any array.
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


def all_devices() -> list:
  """Every device of every process: what a multi-host step spans."""
  return jax.devices()


def addressable(devices: Sequence) -> list:
  """The devices in `devices` that this process drives."""
  me = jax.process_index()
  return [d for d in devices if d.process_index == me]


def _stacked_sharding(devices: Sequence) -> jax.sharding.NamedSharding:
  """Sharding of arrays whose leading axis has one entry per device (pmap's layout)."""
  mesh = jax.sharding.Mesh(np.asarray(list(devices)), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree: Any, devices: Sequence) -> Any:
  """Copies every leaf to every device: leaves get a leading `[len(devices)]` axis.

  Each process places the copies on its own devices, so this works unchanged
  when `devices` spans several hosts. A tree of `jax.ShapeDtypeStruct`s gives
  the replicated shapes (for ahead-of-time lowering); nothing is placed.
  """
  n = len(devices)
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree)):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape, x.dtype), tree)
  sharding = _stacked_sharding(devices)

  def put(x):
    host = np.asarray(x)[None]  # [1, ...]: one device's copy, no n-fold host array
    return jax.make_array_from_callback((n,) + host.shape[1:], sharding, lambda _: host)
  return jax.tree_util.tree_map(put, tree)


def unreplicate(tree: Any) -> Any:
  """This process's first copy of a replicated tree, fetched to the host."""
  def first(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_shards[0].data)[0]
    return np.asarray(x)[0]
  return jax.tree_util.tree_map(first, tree)


def shard(tree: Any, num_devices: int) -> Any:
  """Splits leading batch axes `[B, ...]` into `[num_devices, B / num_devices, ...]` (host arrays).

  `jax.ShapeDtypeStruct` leaves give the split shapes (for ahead-of-time lowering).
  """
  def split(x):
    abstract = isinstance(x, jax.ShapeDtypeStruct)
    x = x if abstract else np.asarray(x)
    if x.shape[0] % num_devices:
      raise ValueError(f"batch of {x.shape[0]} does not split over {num_devices} devices")
    shape = (num_devices, x.shape[0] // num_devices) + x.shape[1:]
    return jax.ShapeDtypeStruct(shape, x.dtype) if abstract else x.reshape(shape)
  return jax.tree_util.tree_map(split, tree)


def unshard(x: Any) -> np.ndarray:
  """This process's part of a pmapped output, `[D_local, b, ...] -> [D_local * b, ...]`."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = np.concatenate([np.asarray(s.data) for s in
                        sorted(x.addressable_shards, key=lambda s: s.index[0].start)])
  x = np.asarray(jax.device_get(x))
  return x.reshape((-1,) + x.shape[2:])


def allgather(x: np.ndarray) -> np.ndarray:
  """Concatenates every process's `x` along axis 0 (identity with one process)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def any_process(flag: bool) -> bool:
  """True if `flag` is set on any process (all processes must call it at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(allgather(np.asarray([int(flag)], np.int32)).any())


def on_every_process(fn: Callable[[], Any], catch: type[BaseException],
                     elsewhere: Callable[[], BaseException]) -> Any:
  """`fn()` on every process (all must call it at the same point). If it raises `catch`
  on any process, every process raises: that process its own error, the others
  `elsewhere()`; a multi-host run then stops everywhere instead of hanging in its next
  collective."""
  result, error = None, None
  try:
    result = fn()
  except catch as e:
    error = e
  if any_process(error is not None):
    raise error or elsewhere()
  return result


def sync(name: str) -> None:
  """Barrier across processes (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def pmean(x: Any) -> Any:
  """Mean over all devices of the data-parallel axis (call inside a `pmapped` function)."""
  return jax.lax.pmean(x, axis_name=AXIS)


def device_index() -> jax.Array:
  """This device's position along the data-parallel axis (inside a `pmapped` function)."""
  return jax.lax.axis_index(AXIS)


def pmapped(fn: Callable, devices: Sequence, *, donate_argnums: tuple[int, ...] = (),
            static_broadcasted_argnums: tuple[int, ...] = ()) -> Callable:
  """`jax.pmap` over `devices` (all processes' devices when multi-host) along `AXIS`."""
  devices = list(devices)
  return jax.pmap(fn, axis_name=AXIS, devices=devices if jax.process_count() == 1 else None,
                  donate_argnums=donate_argnums,
                  static_broadcasted_argnums=static_broadcasted_argnums)
