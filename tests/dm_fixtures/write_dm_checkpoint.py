"""Writes a DeepMind BYOL checkpoint as DeepMind's own code writes one.

DeepMind's `byol/utils/checkpointing.py` saves

  dict(experiment_state=_ByolExperimentState(...), step=step, rng=rng)

with `dill.dump(..., protocol=2)`, where `_ByolExperimentState` (module
`byol.byol_experiment`) holds the online and target parameters and states
(Haiku mappings of NumPy arrays) and the LARS chain's state:
(`AddWeightDecayState()`, `ScaleByLarsState(mu)` of `byol.utils.optimizers`,
optax's `ScaleState()`). This script rebuilds that object from the arrays of
a source `.npz` and dumps it with whatever dill the running Python has, so
that tests read the bytes real dill writes, not a pickle of our own.

It needs only dill and NumPy; run it with a Python that has them (not this
project's environment, whose package is also called `byol`):

  python write_dm_checkpoint.py SOURCE.npz OUT.pkl [--haiku_mappings]

SOURCE.npz: arrays keyed `<field>|<module>|<name>` for the fields
online_params, target_params, online_state, target_state and mu (the LARS
momentum), plus `step` and `rng`. With --haiku_mappings the parameters are
Haiku's immutable mappings of 2020 (`FlatMapping` of the online parameters,
`frozendict`s of the target's), which pickle as `cls(dict)`; without it,
plain dicts (what Haiku returns today).
"""

import collections
import sys
import types
from typing import NamedTuple

import dill
import numpy as np


def _module(name):
  """An empty module registered under `name` (and its parents)."""
  parts = name.split('.')
  parent = None
  for i in range(1, len(parts) + 1):
    path = '.'.join(parts[:i])
    module = sys.modules.setdefault(path, types.ModuleType(path))
    if parent is not None:
      # As an import would: pickle finds `a.b.C` through a's attribute b.
      setattr(parent, parts[i - 1], module)
    parent = module
  return module


def _plant(module_name, cls):
  cls.__module__ = module_name
  setattr(_module(module_name), cls.__name__, cls)
  return cls


# DeepMind's classes, with their names, fields and modules.


class _ByolExperimentState(NamedTuple):
  """Byol's model and optimization parameters and state."""
  online_params: object
  target_params: object
  online_state: object
  target_state: object
  opt_state: object


class ScaleByLarsState(NamedTuple):
  mu: object


class AddWeightDecayState(NamedTuple):
  """Stateless transformation."""


class ScaleState(NamedTuple):
  """The scale transformation is stateless."""


class FlatMapping(dict):
  """Haiku's immutable parameter mapping; pickles as `FlatMapping(dict)`."""

  def __reduce__(self):
    return FlatMapping, (dict(self),)


class frozendict(dict):  # pylint: disable=invalid-name
  """Haiku's older immutable mapping; pickles as `frozendict(dict)`."""

  def __reduce__(self):
    return frozendict, (dict(self),)


_plant('byol.byol_experiment', _ByolExperimentState)
_plant('byol.utils.optimizers', ScaleByLarsState)
_plant('byol.utils.optimizers', AddWeightDecayState)
_plant('optax._src.transform', ScaleState)
_plant('haiku._src.data_structures', FlatMapping)
_plant('haiku._src.data_structures', frozendict)


def _trees(source):
  trees = collections.defaultdict(lambda: collections.defaultdict(dict))
  for key in source.files:
    if '|' in key:
      field, module, name = key.split('|')
      trees[field][module][name] = source[key]
  return {field: {m: dict(v) for m, v in tree.items()}
          for field, tree in trees.items()}


def main(argv):
  if len(argv) not in (3, 4) or argv[3:] not in ([], ['--haiku_mappings']):
    sys.exit(__doc__)
  source = np.load(argv[1])
  trees = _trees(source)
  online, target = trees['online_params'], trees['target_params']
  if argv[3:]:
    online = FlatMapping({m: FlatMapping(v) for m, v in online.items()})
    target = frozendict({m: frozendict(v) for m, v in target.items()})
  state = _ByolExperimentState(
      online_params=online, target_params=target,
      online_state=trees.get('online_state', {}),
      target_state=trees.get('target_state', {}),
      opt_state=(AddWeightDecayState(), ScaleByLarsState(mu=trees['mu']),
                 ScaleState()))
  checkpoint = dict(experiment_state=state, step=int(source['step']),
                    rng=source['rng'])
  with open(argv[2], 'wb') as f:
    dill.dump(checkpoint, f, protocol=2)
  print(f'{argv[2]}: dill {dill.__version__}, NumPy {np.__version__}')


if __name__ == '__main__':
  main(sys.argv)
