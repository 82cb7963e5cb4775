"""Placing data on the local devices the way `jax.pmap` expects it.

The role of DeepMind BYOL's `utils/helpers.py`: replicate a host pytree over
the local devices, read the first replica back, and move input batches to the
devices ahead of their use. Pretraining and evaluation both use these.
"""

from typing import Iterator

import jax
import numpy as np

# The name of the pmapped device axis, for collectives (`jax.lax.pmean`).
AXIS = 'i'


# How pmap inputs are laid out, single- and multi-process. In JAX 0.10 `pmap`
# is `jit` of `shard_map` over a Mesh of all devices of all processes (grouped
# by process). Each process passes arrays whose leading axis is its *local*
# device count; an array sharded over a Mesh of this process's devices with
# PartitionSpec('i') -- what the helpers below produce -- is exactly pmap's
# per-process slice of its global input, so pmap rewraps it as the global
# array without a copy (other host-local inputs are copied into that layout,
# and arrays that are already global pass through). Outputs come back as
# host-local arrays over the local devices, so state, logs and checkpoints are
# handled the same way with one process or many.


def local_mesh_sharding(local_devices=None) -> jax.sharding.NamedSharding:
  """Shards a leading axis of size `len(local_devices)` over those devices.

  This process's slice of pmap's global input layout (see above); by default
  over all local devices, or over the ones a `jax.pmap(devices=...)` uses.
  """
  local = jax.local_devices() if local_devices is None else local_devices
  mesh = jax.sharding.Mesh(np.array(local), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree, sharding=None):
  """Host pytree -> one copy per device of `sharding`, as pmap expects."""
  sharding = sharding or local_mesh_sharding()
  n = sharding.mesh.size
  return jax.tree.map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x),
                                               (n,) + np.shape(x)), sharding),
      tree)


def unreplicate(tree):
  """The first local replica of every leaf, as host numpy arrays.

  pmap's collectives keep replicated values identical on every device of
  every process, so any process may read its own first replica.
  """
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def device_prefetch(iterator: Iterator, size: int = 2, sharding=None):
  """Moves batches to the devices `size` steps ahead of their use.

  Each batch is this process's part of the global batch, with leading axis
  `jax.local_device_count()`.
  """
  sharding = sharding or local_mesh_sharding()
  queue = []

  def put(batch):
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)

  for batch in iterator:
    queue.append(put(batch))
    if len(queue) > size:
      yield queue.pop(0)
  while queue:
    yield queue.pop(0)
