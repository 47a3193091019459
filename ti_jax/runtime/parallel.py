"""Every parallelism idiom of ti_jax lives here: the pmapped data-parallel layout and the mesh.

Data parallelism over one axis named `AXIS` that spans the devices of every
process: frozen params and the train state are replicated (a leading device
axis), each process feeds its own devices' slice of the global batch
`[local_devices, per_device_batch, ...]`, and gradients are averaged with
`lax.pmean` inside the step. With one process this is plain single-host pmap.

`replicate` and `shard` also take `jax.ShapeDtypeStruct` leaves and return
the per-device layout as shapes, so a step can be lowered and compiled ahead
of time for devices that are not attached (e.g. a TPU topology described by
`jax.experimental.topologies` on a CPU host) without materialising any array.

The mesh layout (second half): a `jax.sharding.Mesh` with a concept axis and a data
axis, for many concepts in one step and for frozen weights sharded over the devices
(`make_mesh`, the PartitionSpecs, `put`/`fetch`, `meshed`). `put` takes
`jax.ShapeDtypeStruct`s too.
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


# ---------------------------------------------------------------------------
# The mesh layout: `jax.jit` over a 2-D `Mesh` of concepts x data.
#
# Trees stacked over concepts (`[K, ...]`: train states, per-concept frozen arrays,
# per-concept settings) are sharded over CONCEPT_AXIS; batches `[K, B, ...]` over
# (CONCEPT_AXIS, DATA_AXIS), so each concept's examples are split over the devices of
# its concept row; the frozen weights are replicated, or FSDP-sharded over every
# device (`fsdp_spec`: XLA gathers each layer's weights when it needs them).
# ---------------------------------------------------------------------------

CONCEPT_AXIS = "concept"
DATA_AXIS = "data"
MESH_AXES = (CONCEPT_AXIS, DATA_AXIS)
# Leaves with fewer elements than this stay replicated when weights are sharded: gathering
# a bias or a norm's scale costs more than its copy on every device.
MIN_SHARD_ELEMENTS = 1024

P = jax.sharding.PartitionSpec


def make_mesh(devices: Sequence, num_concept_shards: int) -> jax.sharding.Mesh:
  """A `[num_concept_shards, len(devices) / num_concept_shards]` mesh with axes MESH_AXES.

  Devices fill it row by row: one concept row takes consecutive devices (those of one
  host when a row fits a host), so the data axis's gradient reductions stay within a
  host and the concept axis spans hosts.
  """
  devices = list(devices)
  if num_concept_shards < 1 or len(devices) % num_concept_shards:
    raise ValueError(f"{len(devices)} devices do not split into {num_concept_shards} "
                     "concept shards")
  grid = np.empty(len(devices), dtype=object)
  grid[:] = devices
  return jax.sharding.Mesh(grid.reshape(num_concept_shards, -1), MESH_AXES)


def concept_size(mesh: jax.sharding.Mesh) -> int:
  """Devices along the concept axis: how many concept shards the mesh holds."""
  return int(mesh.shape[CONCEPT_AXIS])


def data_size(mesh: jax.sharding.Mesh) -> int:
  """Devices along the data axis: how many devices split each concept's batch."""
  return int(mesh.shape[DATA_AXIS])


def padded_concepts(num_concepts: int, num_concept_shards: int) -> int:
  """`num_concepts` rounded up to a multiple of the concept shards (each gets as many)."""
  return -(-num_concepts // num_concept_shards) * num_concept_shards


def concept_shards(num_concepts: int, num_devices: int, batch: int) -> int:
  """How many concept shards to lay `num_concepts` concepts of `batch` examples each on
  `num_devices` devices: the most (the fewest devices per concept, so the largest
  per-device batches) whose padding costs at most one device's share of the step's
  FLOPs, i.e. (padded - real concepts) x devices <= padded concepts; `batch` must split
  over the devices of a concept row. Where none does (fewer examples than devices), the
  least padding."""
  fits = [c for c in range(num_devices, 0, -1)
          if num_devices % c == 0 and batch % (num_devices // c) == 0]  # most shards first
  for c in fits:
    padded = padded_concepts(num_concepts, c)
    if (padded - num_concepts) * num_devices <= padded:
      return c
  return min(fits, key=lambda c: padded_concepts(num_concepts, c) - num_concepts)


def concept_spec() -> jax.sharding.PartitionSpec:
  """Leaves stacked over concepts, `[K, ...]`: K split over the concept axis."""
  return P(CONCEPT_AXIS)


def batch_spec() -> jax.sharding.PartitionSpec:
  """Batches `[K, B, ...]`: concepts over the concept axis, each concept's B over the data axis."""
  return P(CONCEPT_AXIS, DATA_AXIS)


def replicated_spec() -> jax.sharding.PartitionSpec:
  """A full copy on every device."""
  return P()


def fsdp_spec(shape: Sequence[int], num_devices: int,
              min_elements: int = MIN_SHARD_ELEMENTS) -> jax.sharding.PartitionSpec:
  """FSDP layout of a frozen weight of `shape`: its largest axis that `num_devices` divides
  split over every device of the mesh (both axes); small or indivisible leaves replicated."""
  if int(np.prod(shape, dtype=np.int64)) < min_elements:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_devices == 0:
      return P(*([None] * axis), MESH_AXES)
  return P()


def named(mesh: jax.sharding.Mesh, specs: Any) -> Any:
  """A tree of `PartitionSpec`s as `NamedSharding`s on `mesh`."""
  return jax.tree_util.tree_map(lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                                is_leaf=lambda s: isinstance(s, P))


def put(tree: Any, mesh: jax.sharding.Mesh, specs: Any) -> Any:
  """Places the host arrays of `tree` on `mesh` as `specs` (a tree of PartitionSpecs, or one
  for every leaf) lays them out: each process fills its own devices' shards from the
  global host value, so this works when the mesh spans hosts. `jax.ShapeDtypeStruct`
  leaves give shapes carrying their sharding (for ahead-of-time lowering)."""
  if isinstance(specs, P):
    specs = jax.tree_util.tree_map(lambda _: specs, tree)
  shardings = named(mesh, specs)

  def place(x, sharding):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree_util.tree_map(place, tree, shardings)


def put_process_batch(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Places this process's part of a batch, leaves `[K, B_local, ...]` (its devices' examples
  of every concept, in device order), as the global `[K, B, ...]` laid out by `batch_spec`
  (one process: B_local = B). For meshes whose data axis spans the processes and whose
  concept rows all have devices on every process (one concept shard, as with
  shard_weights); where the concept axis spans hosts, `put` the global host batch."""
  sharding = jax.sharding.NamedSharding(mesh, batch_spec())

  def place(x):
    x = np.asarray(x)
    shape = (x.shape[0], x.shape[1] * jax.process_count()) + x.shape[2:]
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return jax.tree_util.tree_map(place, tree)


def fetch(tree: Any) -> Any:
  """The global value of every leaf on the host (from every process when the mesh spans hosts;
  all processes must call it together then)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree_util.tree_map(get, tree)


def stack(trees: Sequence[Any]) -> Any:
  """Trees of the same structure stacked leaf by leaf into `[len(trees), ...]` (host arrays,
  or `jax.ShapeDtypeStruct`s)."""
  def join(*xs):
    if isinstance(xs[0], jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((len(xs),) + tuple(xs[0].shape), xs[0].dtype)
    return np.stack([np.asarray(x) for x in xs])
  return jax.tree_util.tree_map(join, *trees)


def pad_stacked(tree: Any, size: int) -> Any:
  """A tree stacked over concepts `[K, ...]` padded to `[size, ...]` with copies of concept 0
  (dummy concepts that compute like a real one, so they stay finite; their results are
  dropped)."""
  def pad(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((size,) + tuple(x.shape[1:]), x.dtype)
    x = np.asarray(x)
    return np.concatenate([x, np.repeat(x[:1], size - x.shape[0], axis=0)])
  return jax.tree_util.tree_map(pad, tree)


def meshed(fn: Callable, mesh: jax.sharding.Mesh, out_specs: Any, *,
           donate_argnums: tuple[int, ...] = ()) -> Callable:
  """`jax.jit(fn)` on `mesh`: its arguments keep the shardings they were placed with
  (`put`), its outputs take `out_specs` (a tree prefix of PartitionSpecs); XLA inserts
  the collectives (gradient sums over the data axis, weight gathers)."""
  return jax.jit(fn, out_shardings=named(mesh, out_specs), donate_argnums=donate_argnums)


def gathered(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Inside a jitted step on `mesh`: every leaf of `tree` (frozen weights, replicated or
  FSDP-sharded) needed whole on each device. For sharded weights XLA all-gathers each leaf
  before its use; without this the partitioner may instead split the activations the way
  the weights are split and reshard them with all-to-alls. Replicated leaves: a no-op."""
  whole = jax.sharding.NamedSharding(mesh, P())
  return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, whole), tree)


def concept_vmap(fn: Callable, in_axes) -> Callable:
  """`jax.vmap(fn)` over the stacked concepts, the mapped axis being the mesh's concept axis
  (so `constrain` inside `fn` lays out one concept's arrays)."""
  return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=CONCEPT_AXIS)
