"""Test set-up: four CPU devices (chex), before JAX's backends start.

`chex.set_n_cpu_devices` only sets XLA's host device count; importing chex
imports JAX but starts no backend, so it works here, in every pytest-xdist
worker too (each imports this file first).
"""

import os
import shutil
import tempfile

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

# One persistent XLA compilation cache for the whole pytest session, shared
# by both xdist workers and every main.py / study subprocess: they compile the
# same tiny-ResNet programs again and again (every resumed run, every
# process of a two-process run, every test that builds its own jitted step).
# The controller (or the only process, without xdist) makes a fresh folder
# before the workers start, so they inherit it with the environment, and
# removes it at the end: no entry outlives the code that compiled it. JAX
# reads these variables when it is imported (below, through chex) and
# subprocesses inherit them. Every program is cached, however short its
# compilation (the default skips those under a second: most of ours). A
# maximum size makes JAX take a file lock around each read and write of the
# folder (it writes entries in place, not by an atomic rename), so that no
# process reads an entry that another is still writing; the size itself is
# never reached.
_CACHE_OWNER = 'BYOL_TEST_XLA_CACHE_OWNER'
if 'PYTEST_XDIST_WORKER' not in os.environ or not os.environ.get(
    'JAX_COMPILATION_CACHE_DIR'):
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='byol-test-xla-cache-')
  os.environ[_CACHE_OWNER] = str(os.getpid())
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
os.environ['JAX_COMPILATION_CACHE_MAX_SIZE'] = str(64 << 30)

import chex  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_DEVICES = 4
chex.set_n_cpu_devices(NUM_DEVICES)
# The pytest processes themselves do not write to the cache: they keep their
# programs in memory (module fixtures share them), and serialising every small
# program to disk under the lock cost more than it saved (test_losses,
# test_optimizers and test_networks: 74 s of CPU with the cache, 50 s without).
# Their subprocesses, which start from nothing, still share it.
jax.config.update('jax_enable_compilation_cache', False)


@pytest.fixture
def persistent_compilation_cache():
  """The session's persistent compilation cache, on for one in-process test.

  For a test that runs the same programs again after `jax.clear_caches()`:
  the studies clear JAX's in-memory caches after every row, so without the
  persistent cache the second seed of a row, in the same process, compiles
  all of the row's programs again. Off again afterwards (see above).
  """
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  # JAX decides once whether a process uses the cache; resetting makes it
  # decide again at the next compilation.
  jax.config.update('jax_enable_compilation_cache', True)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', False)
    compilation_cache.reset_cache()


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


def pytest_unconfigure(config):
  """Removes the session's compilation cache, in the process that made it."""
  del config  # unused
  if os.environ.get(_CACHE_OWNER) == str(os.getpid()):
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
