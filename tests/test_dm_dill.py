"""DeepMind's checkpoints as DeepMind's code writes them: with dill.

DeepMind's Checkpointer pickles its state with `dill.dump(..., protocol=2)`,
and dill does not write plain pickles: it names its own reconstructors
(`dill._dill._create_namedtuple`, `_get_attr`, `_import_module` in 0.3.x,
`_create_array` in 0.4.x). The fixtures in tests/dm_fixtures/ were written
by real dill (0.3.2 with NumPy 1.26, as the released files were written in
2020; 0.4.1 with NumPy 2) through `write_dm_checkpoint.py`, DeepMind's module
and class names and protocol 2 (`make_fixtures.py` rewrites them); the
importer must read those bytes without importing dill or running anything
they name beyond its own stand-ins. Hostile and damaged files end in one
`error:` line, exit 2, and no workdir.
"""

import collections
import json
import math
import os
import pickle
import pickletools
import subprocess
import sys

import chex
import jax
import numpy as np
import optax
import pytest

from byol import checkpointing
from byol import dm_checkpoint
from byol import experiment
from byol import train_loop
from byol.evaluation import features
from test_dm_checkpoint import random_state
from test_dm_checkpoint import resnet50_config
from test_experiment import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'dm_fixtures')
WRITER = os.path.join(FIXTURES, 'write_dm_checkpoint.py')
SMALL_STEP = 3
DILL_VERSIONS = ('0.3.2', '0.4.1')
# Overrides of `small_config` on the command line (for main.py runs).
SMALL_OVERRIDES = {
    'model.encoder.width_multiplier': 0.03125,  # 2..16 channels
    'model.projector.hidden_size': 16, 'model.projector.output_size': 8,
    'model.predictor.hidden_size': 16, 'model.predictor.output_size': 8,
    'training.max_steps': SMALL_STEP + 2,
}


def small_config():
  """The fixtures' network: a narrow BatchNorm ResNet-18 (KBs of weights)."""
  return tiny_config('local,bn', **SMALL_OVERRIDES)


def small_state():
  """The state the fixtures hold (a fixed function of its seed)."""
  return random_state(small_config(), SMALL_STEP, seed=7)


def _trace(opt_state):
  nodes = jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))
  return next(s.trace for s in nodes if isinstance(s, optax.TraceState))


def write_source(path, state, step):
  """`state` as the arrays `write_dm_checkpoint.py` reads."""
  arrays = {'step': np.asarray(step), 'rng': np.array([0, 42], np.uint32)}
  trees = {f: getattr(state, f) for f in ('online_params', 'target_params',
                                          'online_state', 'target_state')}
  trees['mu'] = _trace(state.opt_state)
  for field, tree in trees.items():
    for module, leaves in tree.items():
      for name, value in leaves.items():
        arrays[f'{field}|{module}|{name}'] = np.asarray(value)
  np.savez(path, **arrays)


def fixture(version):
  return os.path.join(FIXTURES, f'small_bn_dill-{version}.pkl')


def pickle_globals(path):
  """Every (module, name) global the pickle names, with its count."""
  with open(path, 'rb') as f:
    ops = list(pickletools.genops(f))
  return collections.Counter(tuple(arg.split(' ')) for op, arg, _ in ops
                             if op.name == 'GLOBAL')
