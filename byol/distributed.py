"""Multi-process start-up through JAX's own multi-controller runtime."""

import jax
import ml_collections

from byol.errors import ConfigError

_initialized = False


def initialize(config: ml_collections.ConfigDict) -> None:
  """Calls `jax.distributed.initialize` when the config asks for it.

  `distributed.coordinator_address` ('host:port') with `num_processes` and
  `process_id` starts an explicit cluster (CPU/GPU clusters, tests on
  127.0.0.1); `distributed.auto=True` lets JAX detect a TPU pod or a SLURM
  job by itself. With neither, the run is a single process.
  """
  global _initialized
  d = config.get('distributed')
  if _initialized or d is None:
    return
  if d.coordinator_address:
    if d.num_processes < 1 or not 0 <= d.process_id < d.num_processes:
      raise ConfigError(
          f'distributed.process_id={d.process_id} must be in '
          f'[0, distributed.num_processes={d.num_processes})')
    jax.distributed.initialize(coordinator_address=d.coordinator_address,
                               num_processes=d.num_processes,
                               process_id=d.process_id)
    _initialized = True
  elif d.auto:
    jax.distributed.initialize()
    _initialized = True
