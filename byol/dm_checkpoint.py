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
through `SafeUnpickler`, whose `find_class` resolves each global to one of
`ALLOWED_GLOBALS`: stand-ins of ours for NumPy's array and scalar
reconstruction, the bytes of protocol 2, Haiku's mapping containers,
DeepMind's state classes and the reconstructors dill writes for them
(`_create_namedtuple`, `_get_attr`, `_import_module`, `_create_array`). Each
checks its arguments (an array's declared size against the bytes the file
holds, a namedtuple's module, name and fields, an attribute's exact module
and name); any other global ends the read with a `DMCheckpointError` before
anything is called. dill itself is never imported. Our own package is also
called `byol`, so DeepMind's module names could not be imported anyway.

`import_to_workdir` matches the file, leaf for leaf, against the training
state of a pretraining config of this project and writes it as that
workdir's checkpoint; evaluation, fine-tuning and resumed pretraining then
read the workdir as any other. The only names that differ are the heads'
BatchNorm (`projector/batch_norm` in DeepMind's MLP); they are matched in
either spelling, so the importer does not depend on which one our MLP uses.
"""

import math
import os
import pickle
from typing import Any, Dict, List, NamedTuple, Tuple

import jax
import ml_collections
import numpy as np
import optax

from byol import checkpointing
from byol import files
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


# Bounds on what a file may make the reader build. DeepMind's ResNet-200 x2
# has a few thousand leaves at depth 4 (dict, field, module, name).
MAX_DEPTH = 32
MAX_NODES = 1_000_000
MAX_STEP = 2**31 - 1  # the step is an int32 in our TrainState
_NUMERIC_KINDS = 'biuf'


def _refuse(what):
  raise DMCheckpointError(f'refusing {what}: a DeepMind BYOL checkpoint holds '
                          'only NumPy arrays and its state classes')


def _latin1_encode(text, encoding='latin1'):
  """`_codecs.encode` as protocol-2 pickles use it for bytes: latin-1 only."""
  if encoding not in ('latin1', 'latin-1') or not isinstance(text, str):
    raise pickle.UnpicklingError(
        f'_codecs.encode with encoding {encoding!r} is not a bytes literal')
  return text.encode('latin1')


def _empty_bytes(*args):
  """`bytes()`, as protocol 2 writes b''; `bytes(n)` would allocate n."""
  if args:
    _refuse(f'bytes{args!r:.40}')
  return b''


def _plain_dtype(dtype):
  """`dtype` if it is a plain numeric one (no fields, subarrays or objects)."""
  if (not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS
      or dtype.fields is not None or dtype.subdtype is not None
      or dtype.itemsize == 0):
    _refuse(f'an array of dtype {dtype!r:.60}')
  return dtype


def _dtype(spec, align=False, copy=False):
  """`numpy.dtype`, for the numeric type codes NumPy pickles ('f4', 'i8')."""
  if not isinstance(spec, str) or len(spec) > 4:
    _refuse(f'numpy.dtype({spec!r:.40})')
  try:
    dtype = np.dtype(spec, align=bool(align), copy=bool(copy))
  except TypeError:
    _refuse(f'numpy.dtype({spec!r:.40})')
  return _plain_dtype(dtype)


class _PendingArray(np.ndarray):
  """An array being unpickled: its `__setstate__` checks the declared shape
  and dtype against the bytes the file actually holds before NumPy builds
  anything, so a file cannot make the reader allocate more than its size."""

  def __setstate__(self, state):
    if not isinstance(state, tuple) or len(state) != 5:
      _refuse('an array state that NumPy does not write')
    _, shape, dtype, _, data = state
    if (not isinstance(shape, tuple) or len(shape) > 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                   for d in shape)):
      _refuse(f'an array of shape {shape!r:.60}')
    dtype = _plain_dtype(dtype)
    if not isinstance(data, bytes):
      _refuse('an array whose data are not bytes')
    if math.prod(shape) * dtype.itemsize != len(data):
      raise DMCheckpointError(
          f'an array declares shape {shape} of {dtype} '
          f'({math.prod(shape) * dtype.itemsize} bytes) but holds '
          f'{len(data)} bytes: the file is damaged')
    super().__setstate__(state)


class _NDArrayType:
  """What `numpy.ndarray` unpickles as: the type argument of `_reconstruct`,
  not callable (`ndarray(shape)` would allocate whatever a file asks)."""

  __slots__ = ()

  def __call__(self, *args, **kwargs):
    _refuse(f'a call of numpy.ndarray{args!r:.40}')


_NDARRAY = _NDArrayType()


def _reconstruct(subtype, shape, code):
  """`numpy.core.multiarray._reconstruct`: the empty array NumPy fills with
  its pickled state. NumPy always writes shape (0,); anything else is not
  NumPy's pickle (and could allocate)."""
  if subtype is not _NDARRAY or shape != (0,) or not isinstance(code, bytes):
    _refuse(f'_reconstruct{(shape, code)!r:.60}')
  return np.ndarray.__new__(_PendingArray, (0,), np.uint8)


def _scalar(dtype, data=b''):
  """`numpy.core.multiarray.scalar`: a NumPy scalar from its bytes."""
  dtype = _plain_dtype(dtype)
  if not isinstance(data, bytes) or len(data) != dtype.itemsize:
    _refuse('a NumPy scalar that NumPy does not write')
  return np.frombuffer(data, dtype)[0]


# dill's own reconstructors, as dill writes them for DeepMind's state: it
# pickles NamedTuple classes by value (`_create_namedtuple(name, fields,
# module[, defaults])`), builtin functions as `_get_attr(_import_module(m),
# name)` (0.3.x) and arrays through `_create_array(f, args, state, npdict)`
# (0.4.x). Each stand-in accepts only what those files hold; dill itself is
# never imported, and `_import_module` returns a name, never a module.

# (module, class) -> our stand-in, for DeepMind's classes; their fields must
# be exactly ours.
_STATE_CLASSES = {
    ('byol.byol_experiment', '_ByolExperimentState'): ByolExperimentState,
    ('byol.utils.optimizers', 'ScaleByLarsState'): ScaleByLarsState,
    ('byol.utils.optimizers', 'AddWeightDecayState'): AddWeightDecayState,
    ('optax._src.transform', 'ScaleState'): ScaleState,
    ('optax._src.base', 'EmptyState'): ScaleState,
}


def _create_namedtuple(name, fieldnames, modulename, defaults=None):
  """dill's `_create_namedtuple`: only DeepMind's state classes, by name
  and field list."""
  cls = _STATE_CLASSES.get((modulename, name)) if (
      isinstance(modulename, str) and isinstance(name, str)) else None
  fields = fieldnames if isinstance(fieldnames, tuple) else ()
  if cls is None or fields != cls._fields or defaults:
    _refuse(f'a namedtuple {modulename!s:.60}.{name!s:.60}{fields!s:.80}')
  return cls


class _ModuleName(NamedTuple):
  """What dill's `_import_module` unpickles as: the name only."""
  name: str


# Module names dill 0.3.x writes for the builtin functions of NumPy's pickles
# and of protocol 2's bytes (NumPy 1.x and 2.x spellings).
_MULTIARRAY_MODULES = ('numpy.core._multiarray_umath', 'numpy.core.multiarray',
                       'numpy._core._multiarray_umath',
                       'numpy._core.multiarray')
_MODULE_ATTRIBUTES = {
    **{(m, '_reconstruct'): _reconstruct for m in _MULTIARRAY_MODULES},
    **{(m, 'scalar'): _scalar for m in _MULTIARRAY_MODULES},
    ('_codecs', 'encode'): _latin1_encode,
}


def _import_module(import_name, safe=False):
  del safe
  if not any(import_name == m for m, _ in _MODULE_ATTRIBUTES):
    _refuse(f'dill._dill._import_module({import_name!r:.60})')
  return _ModuleName(import_name)


def _get_attr(module, name):
  found = (_MODULE_ATTRIBUTES.get((module.name, name))
           if isinstance(module, _ModuleName) else None)
  if found is None:
    _refuse(f'dill._dill._get_attr({module!r:.60}, {name!r:.40})')
  return found


def _create_array(f, args, state, npdict=None):
  """dill 0.4's `_create_array`: `f(*args)` then `__setstate__(state)`."""
  if f is not _reconstruct or npdict or not isinstance(args, tuple):
    _refuse('dill._dill._create_array of anything but NumPy\'s _reconstruct')
  array = _reconstruct(*args)
  array.__setstate__(state)
  return array


def _allowed_globals() -> Dict[Tuple[str, str], Any]:
  """(module, name) -> what a pickle's global resolves to: all of it ours."""
  allowed = {
      ('numpy', 'ndarray'): _NDARRAY,
      ('numpy', 'dtype'): _dtype,
      ('_codecs', 'encode'): _latin1_encode,
      ('builtins', 'bytes'): _empty_bytes,
      ('__builtin__', 'bytes'): _empty_bytes,  # protocol 2's name for it
      # Haiku's immutable mappings pickle as `cls(dict)`: `frozendict` in
      # 2020, `FlatMapping` later (Haiku still writes that name).
      ('haiku._src.data_structures', 'frozendict'): HaikuMapping,
      ('haiku._src.data_structures', 'FlatMapping'): HaikuMapping,
      ('haiku._src.data_structures', 'FlatMap'): HaikuMapping,
      ('dill._dill', '_create_namedtuple'): _create_namedtuple,
      ('dill._dill', '_import_module'): _import_module,
      ('dill._dill', '_get_attr'): _get_attr,
      ('dill._dill', '_create_array'): _create_array,
      **_STATE_CLASSES,
  }
  # NumPy pickles name their module `numpy.core` (1.x) or `numpy._core` (2.x).
  for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    allowed[(module, '_reconstruct')] = _reconstruct
    allowed[(module, 'scalar')] = _scalar
  return allowed


ALLOWED_GLOBALS = _allowed_globals()


class SafeUnpickler(pickle.Unpickler):
  """Unpickles only NumPy data and DeepMind BYOL's checkpoint containers.

  Every global a file names resolves to one of `ALLOWED_GLOBALS`, each a
  stand-in of ours that checks its arguments; anything else is refused
  before it is called.
  """

  def find_class(self, module, name):
    found = ALLOWED_GLOBALS.get((module, name))
    if found is None:
      _refuse(f'to unpickle {module!s:.80}.{name!s:.80}')
    return found

  def persistent_load(self, pid):
    raise DMCheckpointError('refusing a pickle with persistent ids')


def _plain(tree):
  """The tree with Haiku's mappings turned into plain dicts and arrays into
  plain ndarrays; iterative, with its depth and size bounded (a file may
  nest deeper than Python's recursion limit, or share one node so often that
  walking it would never end).

  Raises:
    DMCheckpointError: nested deeper than MAX_DEPTH or more than MAX_NODES
      nodes.
  """
  def children(node):
    if isinstance(node, dict):
      return list(node.values())
    if isinstance(node, (list, tuple)):
      return list(node)
    return []

  def rebuilt(node, kids):
    if isinstance(node, dict):
      return dict(zip(node.keys(), kids))
    if isinstance(node, list):
      return kids
    if isinstance(node, tuple):
      return type(node)(*kids) if hasattr(node, '_fields') else tuple(kids)
    if isinstance(node, np.ndarray):
      return node.view(np.ndarray)
    return node

  # Post-order without recursion: a node is rebuilt once its children are.
  stack, done, nodes = [(tree, 0, False)], [], 0
  while stack:
    node, depth, expanded = stack.pop()
    kids = children(node)
    if expanded:
      values = done[len(done) - len(kids):] if kids else []
      del done[len(done) - len(kids):]
      done.append(rebuilt(node, values))
      continue
    nodes += 1
    if nodes > MAX_NODES:
      raise DMCheckpointError(f'more than {MAX_NODES} objects: not a DeepMind '
                              'BYOL checkpoint')
    if depth > MAX_DEPTH:
      raise DMCheckpointError(f'nested more than {MAX_DEPTH} deep: not a '
                              'DeepMind BYOL checkpoint')
    stack.append((node, depth, True))
    stack.extend((kid, depth + 1, False) for kid in reversed(kids))
  return done[0]


def _valid_step(value, path: str) -> int:
  """The file's `step` as an int in [0, MAX_STEP]."""
  if isinstance(value, np.ndarray) and value.shape == ():
    value = value[()]
  if isinstance(value, (int, np.integer)) and not isinstance(
      value, (bool, np.bool_)) and 0 <= int(value) <= MAX_STEP:
    return int(value)
  raise DMCheckpointError(f'{path}: its step {value!r:.40} is not an integer '
                          f'in [0, {MAX_STEP}]')


def read(path: str) -> Dict[str, Any]:
  """Reads a DeepMind BYOL checkpoint through `SafeUnpickler`.

  Files written by DeepMind's Checkpointer (dill, protocol 2) and plain
  pickles of the same state both read. Nothing the file names is called
  unless it is one of `ALLOWED_GLOBALS`, no array is allocated beyond the
  bytes the file holds, and the nesting is bounded.

  Returns:
    {'experiment_state': ByolExperimentState of plain dicts of arrays,
     'step': int}.

  Raises:
    DMCheckpointError: the file is missing, not a pickle, names a callable
      outside the allowed ones, is damaged, or does not hold DeepMind's
      layout (with a valid step).
  """
  try:
    with open(path, 'rb') as f:
      data = SafeUnpickler(f).load()
    data = _plain(data)
  except DMCheckpointError as e:
    raise DMCheckpointError(f'{path}: {e}') from None
  except IsADirectoryError:
    raise DMCheckpointError(f'{path} is a folder, not a checkpoint file'
                            ) from None
  except OSError as e:
    raise DMCheckpointError(f'cannot read {path}: {e.strerror or e}') from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, IndexError, KeyError, OverflowError,
          MemoryError) as e:
    raise DMCheckpointError(
        f'{path} is not a readable DeepMind BYOL checkpoint: '
        f'{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}'
    ) from None
  state = data.get('experiment_state') if isinstance(data, dict) else None
  if not isinstance(state, ByolExperimentState) or 'step' not in data:
    raise DMCheckpointError(
        f'{path} is a pickle but not a DeepMind BYOL pretraining checkpoint '
        '(no experiment_state=_ByolExperimentState(...) and step)')
  return {'experiment_state': state, 'step': _valid_step(data['step'], path)}


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
      if not isinstance(value, (np.ndarray, np.generic)):
        problems.append(f'{what}[{found!r}][{name!r}] is a '
                        f'{type(value).__name__}, not an array')
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
  for module in sorted(map(repr, set(source) - used)):
    problems.append(f'{what}[{module}] is not in the config\'s network')
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


def read_for_config(path: str, config: ml_collections.ConfigDict
                    ) -> Tuple[experiment_lib.TrainState, int]:
  """Reads DeepMind's checkpoint `path` and checks it against `config`.

  Writes nothing: every check that can refuse the file is done here, so that
  `write_to_workdir` can make the workdir afterwards.

  Returns:
    (our TrainState for `config`, the checkpoint's step).

  Raises:
    DMCheckpointError: see `read` and `to_train_state`; also when `config`
      is not a pretraining config.
    ConfigError: `config` itself is invalid.
  """
  if config.get('experiment', 'pretrain') != 'pretrain':
    raise DMCheckpointError('--import_dm needs a pretraining config '
                            '(configs/byol.py), e.g. configs/byol.py:bn')
  experiment_lib.validate_config(config)
  data = read(path)
  return to_train_state(data, config, path), data['step']


def write_to_workdir(state: experiment_lib.TrainState, step: int, path: str,
                     config: ml_collections.ConfigDict, workdir: str,
                     printer=print) -> None:
  """Writes an imported `state` as the first checkpoint of `workdir`.

  Raises:
    DMCheckpointError: `workdir` already holds checkpoints.
  """
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints'),
      keep=config.training.keep_checkpoints)
  if ckpt.latest_step() is not None:
    raise DMCheckpointError(f'{workdir} already holds checkpoints; import '
                            'into a new --workdir')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.write_text(os.path.join(workdir, 'config.json'),
                     config.to_json_best_effort(indent=2, sort_keys=True))
  ckpt.save(step, state, {'step': step, 'seed': config.seed,
                          'imported_from': os.path.abspath(path)})
  printer(f'[import] {path}: DeepMind BYOL checkpoint of step {step} -> '
          f'{ckpt.directory}; evaluate with main.py '
          f'--config=configs/eval.py --workdir={workdir}')


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
    DMCheckpointError: see `read_for_config` and `write_to_workdir`.
  """
  state, step = read_for_config(path, config)
  write_to_workdir(state, step, path, config, workdir, printer)
  return step
