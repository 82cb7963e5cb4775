"""Multi-process start-up through JAX's own multi-controller runtime.

One process runs per host (or per GPU node); each drives its local devices
and reads its own shard of the data, and `jax.pmap`'s collectives span the
devices of all processes. Call `initialize(config)` before anything touches a
JAX device.
"""

import os
import re
from typing import List, Optional

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
                      '(0: automatic, 1: one CPU device)')
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


def available_cores() -> int:
  """The CPU cores this process may run on (its affinity mask, e.g. taskset)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def cpu_device_count(config: ml_collections.ConfigDict,
                     cores: Optional[int] = None) -> int:
  """How many CPU devices a run of `config` takes: the automatic rule.

  `distributed.cpu_devices` > 0 is taken as it is. 0 (the default) means
  one device per core when the network has batch statistics (BatchNorm in
  a trained component) and the batch divides into per-core micro-batches,
  else one. BatchNorm cannot split a view into independent passes, but
  pmap can split it over devices, and the cross-replica statistics keep it
  the same function: on 2 cores the `local` BN step ran 1.17x faster so on
  2026-11-30 and 1.02x on 2026-12-03 (docs/performance.md). A network without batch statistics already keeps
  the cores busy with its independent passes, and gains nothing from it.

  Args:
    config: a pretraining config.
    cores: the cores to count on; by default `available_cores()`.
  """
  d = config.get('distributed')
  count = d.get('cpu_devices', 0) if d is not None else 1
  if count > 0:
    return count
  # Imported here: the network's module imports TensorFlow, which the
  # explicit settings above do not need.
  from byol import model  # pylint: disable=g-import-not-at-top
  if 'model' not in config or model.batch_independent(config):
    return 1
  cores = cores or available_cores()
  t = config.training
  if cores < 2 or t.batch_size % (cores * d.num_processes *
                                  t.accumulation_steps):
    return 1
  return cores


def _count_fixed_by_xla_flags() -> bool:
  return '--xla_force_host_platform_device_count' in os.environ.get(
      'XLA_FLAGS', '')


def start_cpu_devices(configs: List[ml_collections.ConfigDict]) -> int:
  """Starts JAX's CPU backend with the devices the runs of `configs` take.

  For one process that runs several configs (a study, the benchmark): the
  most any of them takes; each run then uses its own first
  `cpu_device_count` devices (`local_training_devices`). An explicit count
  must come before JAX starts (`ConfigError` after, from
  `set_cpu_devices`); the automatic one gives way to a count JAX already
  runs with or that XLA_FLAGS' --xla_force_host_platform_device_count sets
  (the tests' 4 devices).

  Returns:
    The number of CPU devices asked for.
  """
  count = max([cpu_device_count(c) for c in configs] or [1])
  explicit = [c.distributed.cpu_devices for c in configs
              if c.get('distributed') is not None and
              c.distributed.get('cpu_devices', 0) > 0]
  if explicit:
    set_cpu_devices(count)
  elif not _count_fixed_by_xla_flags():
    try:
      set_cpu_devices(count)
    except ConfigError:
      pass  # JAX already runs: the automatic rule keeps what it has
  return count


def local_training_devices(config: ml_collections.ConfigDict) -> List:
  """The local devices a pretraining run of `config` pmaps over.

  All of them, except on the CPU of a single process started by
  `start_cpu_devices` with more devices than this config takes (a study
  whose BatchNorm rows take one device per core): then its first
  `cpu_device_count(config)`.
  """
  local = jax.local_devices()
  if (local[0].platform != 'cpu' or jax.process_count() > 1 or
      jax.config.jax_num_cpu_devices <= 0):
    return local
  count = cpu_device_count(config)
  return local[:count] if count <= len(local) else local


def initialize(config: ml_collections.ConfigDict) -> None:
  """Sets the CPU device count; calls `jax.distributed.initialize` if asked.

  `distributed.cpu_devices` splits the CPU into that many JAX devices (0:
  the automatic rule of `cpu_device_count`).

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
  start_cpu_devices([config])
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
