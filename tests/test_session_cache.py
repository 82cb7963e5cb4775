"""The session's persistent compilation cache (tests/conftest.py) is in use.

If JAX stopped reading the variables conftest exports (a renamed option in a
later JAX), every subprocess would silently compile from scratch
again and the suite would slow down by minutes without failing anything.
"""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _entries(folder, name=''):
  """The cache entries of jitted functions called `name` (all: '').

  Other xdist workers and subprocesses write to the same folder meanwhile, so
  a test counts only the entries of its own, uniquely named, program.
  """
  return {n for n in os.listdir(folder)
          if n.endswith('-cache') and n.startswith(f'jit_{name}')}


def test_the_session_has_one_cache_for_its_subprocesses():
  folder = os.environ['JAX_COMPILATION_CACHE_DIR']
  assert os.path.isdir(folder)
  if 'PYTEST_XDIST_WORKER' in os.environ:
    # A worker hands its subprocesses the folder its controller made.
    assert os.environ['BYOL_TEST_XLA_CACHE_OWNER'] != str(os.getpid())
  # The test process itself compiles in memory only (see conftest.py).
  assert not jax.config.jax_enable_compilation_cache
  before = _entries(folder, 'scaled_sum_of_session_cache_test')

  @jax.jit
  def scaled_sum_of_session_cache_test(x):
    return jnp.sum(x * 3.0, axis=0)

  x = np.arange(13 * 7, dtype=np.float32).reshape(13, 7)
  chex.assert_trees_all_close(scaled_sum_of_session_cache_test(x),
                              3.0 * x.sum(0), rtol=1e-6)
  assert _entries(folder, 'scaled_sum_of_session_cache_test') == before


@pytest.mark.slow  # Two Python processes that import JAX.
def test_a_subprocess_loads_the_program_instead_of_compiling_it():
  # The same program in a fresh process with the session's environment: JAX
  # logs a cache hit (and writes no new entry).
  folder = os.environ['JAX_COMPILATION_CACHE_DIR']
  program = (
      'import logging, sys\n'
      'import jax, jax.numpy as jnp, numpy as np\n'
      'logging.basicConfig(stream=sys.stdout)\n'
      'logging.getLogger("jax._src.compiler").setLevel(logging.DEBUG)\n'
      'def cos5_of_session_cache_test(x):\n'
      '  return jnp.cos(x) * 5.0\n'
      'f = jax.jit(cos5_of_session_cache_test)\n'
      'print(float(f(np.ones((11, 3), np.float32)).sum()))\n')
  run = lambda: subprocess.run([sys.executable, '-c', program], cwd=ROOT,
                               capture_output=True, text=True, timeout=120,
                               check=True).stdout
  first = run()
  entries = _entries(folder, 'cos5_of_session_cache_test')
  assert len(entries) == 1, entries
  second = run()
  assert 'Persistent compilation cache hit' in second, second[-2000:]
  assert first.splitlines()[-1] == second.splitlines()[-1]
  assert _entries(folder, 'cos5_of_session_cache_test') == entries
