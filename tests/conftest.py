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
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_DEVICES = 4
chex.set_n_cpu_devices(NUM_DEVICES)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """Makes `xdist_group` marks group again under pytest 9.

  pytest-xdist 3.8 groups a worker's tests by appending `@<group>` to their
  node ids (`item._nodeid`); pytest 9 derives `nodeid` from the structured
  `item._id` instead, so the suffix is lost and every grouped test is
  scheduled alone: module fixtures, compiled steps and the session's
  reference run were made on both workers. This sets the id xdist meant, on
  xdist workers with --dist loadgroup only (and not twice, should a later
  xdist set it itself).
  """
  if not getattr(config.option, 'loadgroup', False):
    return
  from _pytest.nodeid import NodeId  # pylint: disable=g-import-not-at-top
  for item in items:
    names = sorted({str(m.args[0] if m.args else m.kwargs.get('name',
                                                              'default'))
                    for m in item.iter_markers('xdist_group')})
    if names and '@' not in item.nodeid.rsplit(']', 1)[-1]:
      item._id = NodeId.parse(f'{item.nodeid}@{"_".join(names)}')  # pylint: disable=protected-access
