"""Writes the dill fixtures of tests/test_dm_dill.py (run from the repo root).

  python tests/dm_fixtures/make_fixtures.py PYTHON_WITH_DILL [...]

For each Python given (one with dill and NumPy, e.g. a venv with
`pip install dill==0.3.2 numpy==1.26.4`), writes
tests/dm_fixtures/small_bn_dill-<version>.pkl: the small BatchNorm ResNet's
state of `test_dm_dill.small_state()` in DeepMind's layout, dumped by
`write_dm_checkpoint.py` with that dill. The state is a fixed function of
its seed, so the tests compare the files with a state they rebuild.
"""

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

import test_dm_dill  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(pythons):
  if not pythons:
    sys.exit(__doc__)
  with tempfile.TemporaryDirectory() as tmp:
    source = os.path.join(tmp, 'source.npz')
    test_dm_dill.write_source(source, test_dm_dill.small_state(),
                              test_dm_dill.SMALL_STEP)
    for python in pythons:
      version = subprocess.run(
          [python, '-c', 'import dill; print(dill.__version__)'],
          check=True, capture_output=True, text=True).stdout.strip()
      out = os.path.join(HERE, f'small_bn_dill-{version}.pkl')
      # Haiku's immutable mappings as in 2020 with dill 0.3.x; plain dicts
      # (today's Haiku) with 0.4.x: both layouts are covered.
      mappings = ['--haiku_mappings'] if version.startswith('0.3') else []
      subprocess.run([python, os.path.join(HERE, 'write_dm_checkpoint.py'),
                      source, out, *mappings], check=True)


if __name__ == '__main__':
  main(sys.argv[1:])
