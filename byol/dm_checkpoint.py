"""DeepMind BYOL's released checkpoints: read them safely, turn them into a workdir.

DeepMind's files (`pretrain_res50x1.pkl`, `pretrain_res200x2.pkl`) are pickles
(protocol 2, written with dill) of

  dict(experiment_state=_ByolExperimentState(online_params, target_params,
                                             online_state, target_state,
                                             opt_state),
       step=step, rng=rng)

where `_ByolExperimentState` lives in `byol.byol_experiment` and `opt_state`
is their LARS chain's state: (`AddWeightDecayState()`, `ScaleByLarsState(mu)`
from `byol.utils.optimizers`, optax's `ScaleState()`). Parameters and states
are Haiku mappings (plain dicts, or Haiku's immutable `frozendict` /
`FlatMapping`, depending on the Haiku version that wrote them) of NumPy
arrays.

Unpickling runs whatever callables a file names, so a pickle is read here only
through `SafeUnpickler`, whose `find_class` allows NumPy's array and scalar
reconstruction, the bytes codec of protocol 2, Haiku's mapping containers and
DeepMind's state classes (each mapped to a stand-in defined here); any other
global ends the read with a `DMCheckpointError` before anything is called.
Our own package is also called `byol`, so DeepMind's module names could not
be imported anyway.

`import_to_workdir` matches the file, leaf for leaf, against the training
state of a pretraining config of this project and writes it as that
workdir's checkpoint; evaluation, fine-tuning and resumed pretraining then
read the workdir as any other. The only names that differ are the heads'
BatchNorm (`projector/batch_norm` in DeepMind's MLP); they are matched in
either spelling, so the importer does not depend on which one our MLP uses.
"""

import importlib
import os
import pickle
from typing import Any, Dict, List, NamedTuple, Tuple

import jax
import ml_collections
import numpy as np
import optax

from byol import checkpointing
from byol import experiment as experiment_lib
from byol.errors import UserError


class DMCheckpointError(UserError):
  """A file that is not a DeepMind BYOL checkpoint, or one that does not fit."""


# Stand-ins for DeepMind's classes: the same fields, nothing callable besides
# the tuple constructor.


class ByolExperimentState(NamedTuple):
  """`byol.byol_experiment._ByolExperimentState`."""
  online_params: Any
  target_params: Any
  online_state: Any
  target_state: Any
  opt_state: Any


class ScaleByLarsState(NamedTuple):
  """`byol.utils.optimizers.ScaleByLarsState`: LARS' momentum."""
  mu: Any


class AddWeightDecayState(NamedTuple):
  """`byol.utils.optimizers.AddWeightDecayState` (stateless)."""


class ScaleState(NamedTuple):
  """optax's `ScaleState` of 2020 (stateless)."""


class HaikuMapping(dict):
  """Haiku's immutable parameter mappings (`frozendict`, `FlatMapping`)."""


def _latin1_encode(text, encoding='latin1'):
  """`_codecs.encode` as protocol-2 pickles use it for bytes: latin-1 only."""
  if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
    raise pickle.UnpicklingError(
        f'_codecs.encode with encoding {encoding!r} is not a bytes literal')
  return text.encode('latin1')


def _numpy_multiarray():
  try:
    return importlib.import_module('numpy._core.multiarray')
  except ImportError:  # NumPy 1.x
    return importlib.import_module('numpy.core.multiarray')


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
  multiarray = _numpy_multiarray()
  allowed = {
      ('numpy', 'ndarray'): np.ndarray,
      ('numpy', 'dtype'): np.dtype,
      ('_codecs', 'encode'): _latin1_encode,
      ('builtins', 'bytes'): bytes,
      ('__builtin__', 'bytes'): bytes,  # protocol 2's name for it
      ('byol.byol_experiment', '_ByolExperimentState'): ByolExperimentState,
      ('byol.utils.optimizers', 'ScaleByLarsState'): ScaleByLarsState,
      ('byol.utils.optimizers', 'AddWeightDecayState'): AddWeightDecayState,
      ('optax._src.transform', 'ScaleState'): ScaleState,
      ('optax._src.base', 'EmptyState'): ScaleState,
      # Haiku's immutable mappings pickle as `cls(dict)`: `frozendict` in
      # 2020, `FlatMapping` later (Haiku still writes that name).
      ('haiku._src.data_structures', 'frozendict'): HaikuMapping,
      ('haiku._src.data_structures', 'FlatMapping'): HaikuMapping,
      ('haiku._src.data_structures', 'FlatMap'): HaikuMapping,
  }
  # NumPy pickles name their module `numpy.core` (1.x) or `numpy._core` (2.x).
  for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    allowed[(module, '_reconstruct')] = multiarray._reconstruct  # pylint: disable=protected-access
    allowed[(module, 'scalar')] = multiarray.scalar
  return allowed


class SafeUnpickler(pickle.Unpickler):
  """Unpickles only NumPy data and DeepMind BYOL's checkpoint containers."""

  _ALLOWED = None

  def find_class(self, module, name):
    if SafeUnpickler._ALLOWED is None:
      SafeUnpickler._ALLOWED = _allowed_globals()
    found = SafeUnpickler._ALLOWED.get((module, name))
    if found is None:
      raise DMCheckpointError(
          f'refusing to unpickle {module}.{name}: a DeepMind BYOL checkpoint '
          'holds only NumPy arrays and its state classes')
    return found

  def persistent_load(self, pid):
    raise DMCheckpointError('refusing a pickle with persistent ids')


def _plain(tree):
  """The tree with Haiku's mappings turned into plain dicts."""
  if isinstance(tree, dict):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def read(path: str) -> Dict[str, Any]:
  """Reads a DeepMind BYOL checkpoint through `SafeUnpickler`.

  Returns:
    {'experiment_state': ByolExperimentState, 'step': int}.

  Raises:
    DMCheckpointError: the file is missing, not a pickle, names a callable
      outside the allowed ones, or does not hold DeepMind's layout.
  """
  try:
    with open(path, 'rb') as f:
      data = SafeUnpickler(f).load()
  except DMCheckpointError as e:
    raise DMCheckpointError(f'{path}: {e}') from None
  except OSError as e:
    raise DMCheckpointError(f'cannot read {path}: {e.strerror or e}') from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, IndexError, KeyError) as e:
    raise DMCheckpointError(
        f'{path} is not a readable DeepMind BYOL checkpoint: '
        f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None
  state = data.get('experiment_state') if isinstance(data, dict) else None
  if not isinstance(state, ByolExperimentState) or 'step' not in data:
    raise DMCheckpointError(
        f'{path} is a pickle but not a DeepMind BYOL pretraining checkpoint '
        '(no experiment_state=_ByolExperimentState(...) and step)')
  state = ByolExperimentState(*[_plain(x) for x in state])
  return {'experiment_state': state, 'step': int(np.asarray(data['step']))}


def _spellings(module: str) -> List[str]:
  """`module` and its names with the heads' BatchNorm spelled either way."""
  parts = module.split('/')
  swap = {'batchnorm': 'batch_norm', 'batch_norm': 'batchnorm'}
  other = '/'.join(swap.get(p, p) for p in parts)
  return [module] if other == module else [module, other]


def match_tree(source: Dict[str, Dict[str, Any]],
               template: Dict[str, Dict[str, Any]], what: str,
               problems: List[str]) -> Dict[str, Dict[str, np.ndarray]]:
  """Haiku tree `source` laid out as `template` (module -> name -> array).

  Each template module is looked up under its own name, then with the heads'
  BatchNorm in the other spelling. Missing or surplus modules and leaves and
  shape mismatches are appended to `problems`.
  """
  out, used = {}, set()
  if not isinstance(source, dict):
    problems.append(f'{what} is a {type(source).__name__}, not a dict')
    return out
  for module, leaves in template.items():
    found = next((m for m in _spellings(module) if m in source), None)
    if found is None:
      problems.append(f'{what}[{module!r}] is missing')
      continue
    used.add(found)
    out[module] = {}
    for name, like in leaves.items():
      value = source[found].get(name) if isinstance(source[found], dict) \
          else None
      if value is None:
        problems.append(f'{what}[{found!r}][{name!r}] is missing')
        continue
      value = np.asarray(value)
      if value.shape != like.shape:
        problems.append(f'{what}[{found!r}][{name!r}] has shape '
                        f'{value.shape}, the config needs {like.shape}')
        continue
      if np.dtype(value.dtype).kind != np.dtype(like.dtype).kind:
        problems.append(f'{what}[{found!r}][{name!r}] is {value.dtype}, the '
                        f'config needs {like.dtype}')
        continue
      out[module][name] = value.astype(like.dtype)
  for module in sorted(set(source) - used):
    problems.append(f'{what}[{module!r}] is not in the config\'s network')
  return out


def _lars_momentum(opt_state, path: str):
  """The `mu` of DeepMind's LARS chain state."""
  parts = opt_state if isinstance(opt_state, (tuple, list)) else (opt_state,)
  for part in parts:
    if isinstance(part, ScaleByLarsState):
      return _plain(part.mu)
  raise DMCheckpointError(f'{path}: its opt_state holds no ScaleByLarsState '
                          '(LARS momentum)')


def _fill_opt_state(template, momentum, step: int):
  """Our LARS chain state with DeepMind's momentum and step count.

  Our chain (`byol.optimizers.lars`) keeps the momentum in optax's
  `TraceState` and the step in the schedule's count; every other part is
  stateless. Anything else in it is a change this importer must learn about.
  """
  def fill(node):
    if isinstance(node, optax.TraceState):
      return node._replace(trace=momentum)
    if isinstance(node, optax.ScaleByScheduleState):
      return node._replace(count=np.asarray(step, node.count.dtype))
    if isinstance(node, tuple) and hasattr(node, '_fields'):
      return type(node)(*[fill(x) for x in node])
    if isinstance(node, (tuple, list)):
      return type(node)(fill(x) for x in node)
    if isinstance(node, (np.ndarray, jax.Array)):
      raise AssertionError('the optimizer state has a part the DeepMind '
                           'importer does not know')
    return node

  return fill(template)


def to_train_state(data: Dict[str, Any], config: ml_collections.ConfigDict,
                   path: str = 'the checkpoint') -> experiment_lib.TrainState:
  """DeepMind's experiment state as this project's `TrainState` for `config`.

  Raises:
    DMCheckpointError: a module, leaf or shape that does not fit `config`'s
      network (listing the first few differences).
  """
  template = experiment_lib.state_template(config)
  es, step = data['experiment_state'], data['step']
  problems = []
  trees = {
      field: match_tree(getattr(es, field), getattr(template, field), field,
                        problems)
      for field in ('online_params', 'target_params', 'online_state',
                    'target_state')}
  momentum = match_tree(_lars_momentum(es.opt_state, path),
                        template.online_params, 'opt_state.mu', problems)
  if problems:
    more = f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''
    raise DMCheckpointError(
        f'{path} does not fit the config\'s network: '
        f'{"; ".join(problems[:4])}{more}. DeepMind\'s ResNet-50 is '
        '--config=configs/byol.py:bn')
  return experiment_lib.TrainState(
      step=np.asarray(step, template.step.dtype),
      opt_state=_fill_opt_state(template.opt_state, momentum, step), **trees)


def import_to_workdir(path: str, config: ml_collections.ConfigDict,
                      workdir: str, printer=print) -> int:
  """Writes DeepMind's checkpoint `path` as the first checkpoint of `workdir`.

  `config` is the pretraining config the checkpoint is to continue (e.g.
  configs/byol.py:bn for DeepMind's ResNet-50). Writes `config.json` and
  `checkpoints/ckpt_<step>.npz`; then `main.py` with the same config resumes
  pretraining there, and configs/eval.py evaluates or fine-tunes it. The
  random key of DeepMind's loop is not kept: ours derives each step's key
  from the seed and the step. Nothing is written unless the whole file fits.

  Returns:
    The step of the checkpoint.

  Raises:
    DMCheckpointError: see `read` and `to_train_state`; also when `workdir`
      already holds checkpoints or `config` is not a pretraining config.
  """
  if config.get('experiment', 'pretrain') != 'pretrain':
    raise DMCheckpointError('--import_dm needs a pretraining config '
                            '(configs/byol.py), e.g. configs/byol.py:bn')
  experiment_lib.validate_config(config)
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'),
      keep=config.training.keep_checkpoints)
  if ckpt.latest_step() is not None:
    raise DMCheckpointError(f'{workdir} already holds checkpoints; import '
                            'into a new --workdir')
  data = read(path)
  state = to_train_state(data, config, path)
  step = data['step']
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, 'config.json.tmp')
    with open(tmp, 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, os.path.join(workdir, 'config.json'))
  ckpt.save(step, state, {'step': step, 'seed': config.seed,
                          'imported_from': os.path.abspath(path)})
  printer(f'[import] {path}: DeepMind BYOL checkpoint of step {step} -> '
          f'{ckpt.directory}; evaluate with main.py '
          f'--config=configs/eval.py --workdir={workdir}')
  return step

