"""Test set-up: four CPU devices (chex), before JAX's backends start.

`chex.set_n_cpu_devices` only sets XLA's host device count; importing chex
imports JAX but starts no backend, so it works here, in every pytest-xdist
worker too (each imports this file first).
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Tests compile many small programs and run each a few times: XLA's backend
# optimisations cost more compile time than they save run time here.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()

import chex  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_DEVICES = 4
chex.set_n_cpu_devices(NUM_DEVICES)
