"""Multi-process start-up through JAX's own multi-controller runtime.

One process runs per host (or per GPU node); each drives its local devices
and reads its own shard of the data, and `jax.pmap`'s collectives span the
devices of all processes. Call `initialize(config)` before anything touches a
JAX device.
"""

import re

import jax
import ml_collections

from byol.errors import ConfigError

_initialized = False
_ADDRESS = re.compile(r'^(\[[0-9a-fA-F:.]+\]|[^\s:]+):(\d{1,5})$')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` for distributed fields no cluster could use."""
  d = config.get('distributed')
  if d is not None and d.get('cpu_devices', 0) < 0:
    raise ConfigError(f'distributed.cpu_devices={d.cpu_devices} must be >= 0 '
                      '(0: one CPU device)')
  if d is None or not d.coordinator_address:
    return
  match = _ADDRESS.match(d.coordinator_address)
  if not match or not 0 < int(match.group(2)) < 65536:
    raise ConfigError(
        f'distributed.coordinator_address={d.coordinator_address!r} must be '
        'host:port, e.g. 10.0.0.1:8476')
  if d.num_processes < 1 or not 0 <= d.process_id < d.num_processes:
    raise ConfigError(
        f'distributed.process_id={d.process_id} must be in '
        f'[0, distributed.num_processes={d.num_processes})')


def set_cpu_devices(count: int) -> None:
  """Makes JAX's CPU backend `count` devices (one per core, say).

  Must run before JAX starts its backends (the first device query or
  computation); raises `ConfigError` after.
  """
  if jax.config.jax_num_cpu_devices == count:
    return
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:
    raise ConfigError(
        f'distributed.cpu_devices={count} must be set before JAX starts; '
        f'JAX is already running with {jax.config.jax_num_cpu_devices} CPU '
        'devices') from None


def initialize(config: ml_collections.ConfigDict) -> None:
  """Sets the CPU device count; calls `jax.distributed.initialize` if asked.

  `distributed.cpu_devices` > 0 splits the CPU into that many JAX devices.

  `distributed.coordinator_address` ('host:port', the address of process 0)
  with `num_processes` and `process_id` starts an explicit cluster (CPU/GPU
  clusters, tests on 127.0.0.1); `distributed.auto=True` lets JAX detect a
  TPU pod, a SLURM job or another supported cluster by itself. With neither,
  the run is a single process. Idempotent.

  On CPU, cross-process collectives need an implementation: gloo (TCP) is
  selected unless one was chosen already (e.g. mpi through
  `JAX_CPU_COLLECTIVES_IMPLEMENTATION`).
  """
  global _initialized
  d = config.get('distributed')
  if d is None:
    return
  check_config(config)
  if d.get('cpu_devices', 0):
    set_cpu_devices(d.cpu_devices)
  if _initialized or not (d.coordinator_address or d.auto):
    return
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if d.coordinator_address:
    jax.distributed.initialize(coordinator_address=d.coordinator_address,
                               num_processes=d.num_processes,
                               process_id=d.process_id)
  else:
    try:
      jax.distributed.initialize()
    except ValueError as e:
      # Raised when no cluster environment (TPU pod, SLURM, ...) was found.
      raise ConfigError('distributed.auto=True found no cluster to join: '
                        f'{str(e).splitlines()[0]}') from None
  _initialized = True
