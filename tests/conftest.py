"""Test set-up: four CPU devices (chex), before JAX's backends start.

`chex.set_n_cpu_devices` only sets XLA's host device count; importing chex
imports JAX but starts no backend, so it works here, in every pytest-xdist
worker too (each imports this file first).
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Tests compile many small programs and run each a few times: XLA's backend
# optimisations cost more compile time than they save run time here. XLA:CPU's
# MLIR fusion emitters take about twice the compile time of its older
# elemental emitters (a tiny ResNet's update step: 12 s against 6 s of CPU)
# for the same numbers. Subprocesses (main.py runs) inherit both flags.
for _flag in ('--xla_backend_optimization_level=0',
              '--xla_cpu_use_fusion_emitters=false'):
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' +
                               _flag).strip()

import chex  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_DEVICES = 4
chex.set_n_cpu_devices(NUM_DEVICES)
