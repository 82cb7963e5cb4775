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
from byol import model
from byol import train_loop
from test_dm_checkpoint import random_state
from test_dm_checkpoint import resnet50_config
from test_experiment import tiny_config

# One worker runs the module: its tests share the module's fixtures (the
# source state, the jitted embedding), which another worker would make again.
pytestmark = pytest.mark.xdist_group('dm_dill')

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


def run_main_cases(cases, tmp_path, env=None):
  """main.py on each case in forked children of one process (see
  tests/main_cases.py); returns their CompletedProcess-like dicts."""
  cases_path, results_path = tmp_path / 'cases.json', tmp_path / 'results.json'
  cases_path.write_text(json.dumps(cases))
  full_env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  full_env.update(env or {})
  done = subprocess.run(
      [sys.executable, os.path.join('tests', 'main_cases.py'),
       str(cases_path), str(results_path)], cwd=ROOT, env=full_env,
      capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return [subprocess.CompletedProcess(case, r['returncode'], r['stdout'],
                                      r['stderr'])
          for case, r in zip(cases, json.loads(results_path.read_text()))]


def small_import_args(path, workdir):
  return ['--config=configs/byol.py:local,bn', f'--workdir={workdir}',
          f'--import_dm={path}',
          *[f'--config.{k}={v}' for k, v in SMALL_OVERRIDES.items()],
          # tiny_config's fields that the network's shapes depend on.
          '--config.model.encoder.num_groups=4',
          '--config.data.image_size=16', '--config.training.batch_size=32']


# ---------------------------------------------------------------------------
# What real dill writes, read leaf for leaf.

# The globals each fixture names: what dill writes for DeepMind's state. dill
# 0.3.6 and 0.3.9 write the same as 0.4.1 (NumPy 1.x spelling of the module).
EXPECTED_GLOBALS = {
    '0.3.2': {('dill._dill', '_create_namedtuple'),
              ('dill._dill', '_get_attr'), ('dill._dill', '_import_module'),
              ('haiku._src.data_structures', 'FlatMapping'),
              ('haiku._src.data_structures', 'frozendict'),
              ('numpy', 'dtype'), ('numpy', 'ndarray')},
    '0.3.9': {('_codecs', 'encode'), ('dill._dill', '_create_array'),
              ('dill._dill', '_create_namedtuple'),
              ('haiku._src.data_structures', 'FlatMapping'),
              ('haiku._src.data_structures', 'frozendict'),
              ('numpy', 'dtype'), ('numpy', 'ndarray'),
              ('numpy.core.multiarray', '_reconstruct')},
    '0.4.1': {('_codecs', 'encode'), ('dill._dill', '_create_array'),
              ('dill._dill', '_create_namedtuple'), ('numpy', 'dtype'),
              ('numpy', 'ndarray'), ('numpy._core.multiarray',
                                     '_reconstruct')},
}


@pytest.fixture(scope='module')
def source():
  return small_state()


@pytest.fixture(scope='module')
def embed():
  # One compilation for every fixture: they share the network's shapes.
  return jax.jit(model.Network(small_config(), axis_name=None).embed)


@pytest.mark.parametrize('version', sorted(EXPECTED_GLOBALS))
def test_fixture_holds_what_dill_writes(version):
  path = fixture(version)
  with open(path, 'rb') as f:
    head = f.read(2)
  assert head == b'\x80\x02'  # protocol 2, as DeepMind's Checkpointer
  assert set(pickle_globals(path)) == EXPECTED_GLOBALS[version]
  # DeepMind's state classes are pickled by value, under their own names.
  raw = open(path, 'rb').read()
  for name in (b'byol.byol_experiment', b'_ByolExperimentState',
               b'byol.utils.optimizers', b'ScaleByLarsState',
               b'AddWeightDecayState', b'optax._src.transform'):
    assert name in raw, name


@pytest.mark.parametrize('version', sorted(EXPECTED_GLOBALS))
def test_dill_fixture_imports_leaf_for_leaf_with_the_same_embeddings(
    version, source, embed):
  path = fixture(version)
  data = dm_checkpoint.read(path)
  assert data['step'] == SMALL_STEP
  online = data['experiment_state'].online_params
  assert type(online) is dict  # pylint: disable=unidiomatic-typecheck
  assert 'projector/batch_norm' in online
  state = dm_checkpoint.to_train_state(data, small_config(), path)
  chex.assert_trees_all_equal_structs(state, source)
  chex.assert_trees_all_equal(state, source)
  images = np.random.RandomState(1).uniform(size=(4, 16, 16, 3)).astype(
      np.float32)
  want = embed(source.online_params, source.online_state, images)
  got = embed(state.online_params, state.online_state, images)
  chex.assert_shape(got, (4, 16))
  assert float(np.abs(want).max()) > 1e-3
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)


def test_dill_is_not_imported_to_read_a_file():
  code = ('import sys; from byol import dm_checkpoint; '
          f'dm_checkpoint.read({fixture("0.3.2")!r}); '
          "print('dill' in sys.modules)")
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                       capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.stdout.strip() == 'False'


@pytest.mark.slow  # two training steps of a PretrainExperiment
def test_resumed_pretraining_continues_at_the_files_step_with_its_momentum(
    tmp_path, source):
  # Logged every step; no evaluation or diagnostics (only the steps cost).
  config = tiny_config('local,bn', **SMALL_OVERRIDES, **{
      'training.log_every_steps': 1, 'evaluators.schedule': ()})
  workdir = str(tmp_path / 'run')
  step = dm_checkpoint.import_to_workdir(fixture('0.3.2'), config, workdir,
                                         printer=lambda _: None)
  assert step == SMALL_STEP
  lines = []
  exp = experiment.PretrainExperiment(config, workdir, printer=lines.append)
  assert exp.restore_or_init() == SMALL_STEP
  restored = jax.tree.map(lambda x: x[0], exp.state)
  # DeepMind's momentum, in our LARS chain's trace; the schedule's count at
  # the file's step (so the learning rate continues where DeepMind's was).
  chex.assert_trees_all_equal(_trace(restored.opt_state),
                              _trace(source.opt_state))
  counts = [s.count for s in jax.tree_util.tree_leaves(
      restored.opt_state,
      is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  assert [int(c) for c in counts] == [SMALL_STEP]
  summary = train_loop.train(exp)
  assert any(f'resuming from the checkpoint of step {SMALL_STEP}' in l
             for l in lines), lines
  assert summary['step'] == SMALL_STEP + 2
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [json.loads(l)['step'] for l in f]
  assert steps == [SMALL_STEP + 1, SMALL_STEP + 2]
  assert math.isfinite(summary['loss'])
  # The momentum moved on from DeepMind's (it is part of every update).
  final, _ = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints')).restore(
          target=experiment.state_template(config))
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                       _trace(final.opt_state), _trace(source.opt_state))
  assert max(jax.tree.leaves(moved)) > 0


def test_resnet50_tree_written_by_dill_with_deepmind_head_names(tmp_path):
  # The ResNet-50 tree (narrow, so that it is quick), written now by the
  # test environment's dill (requirements-test.txt) with Haiku's mappings.
  config = resnet50_config(width=0.03125)
  state = random_state(config, step=5005, seed=3)
  src, path = tmp_path / 'source.npz', tmp_path / 'pretrain_res50x1.pkl'
  write_source(src, state, 5005)
  subprocess.run([sys.executable, WRITER, str(src), str(path),
                  '--haiku_mappings'], check=True, cwd=FIXTURES,
                 capture_output=True)
  assert ('dill._dill', '_create_namedtuple') in pickle_globals(path)
  data = dm_checkpoint.read(str(path))
  online = data['experiment_state'].online_params
  assert 'projector/batch_norm' in online and 'predictor/batch_norm' in online
  assert 'res_net50/~/block_group_3/~/block_2/~/conv_2' in online
  loaded = dm_checkpoint.to_train_state(data, config, str(path))
  chex.assert_trees_all_equal(loaded, state)


# ---------------------------------------------------------------------------
# The allow-list, pinned: every global a file may name, each ours.

ALLOWED = {
    ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode'),
    ('builtins', 'bytes'), ('__builtin__', 'bytes'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('haiku._src.data_structures', 'frozendict'),
    ('haiku._src.data_structures', 'FlatMapping'),
    ('haiku._src.data_structures', 'FlatMap'),
    ('byol.byol_experiment', '_ByolExperimentState'),
    ('byol.utils.optimizers', 'ScaleByLarsState'),
    ('byol.utils.optimizers', 'AddWeightDecayState'),
    ('optax._src.transform', 'ScaleState'), ('optax._src.base', 'EmptyState'),
    ('dill._dill', '_create_namedtuple'), ('dill._dill', '_import_module'),
    ('dill._dill', '_get_attr'), ('dill._dill', '_create_array'),
}


def test_the_allow_list_is_exactly_deepminds_state_and_all_stand_ins():
  assert set(dm_checkpoint.ALLOWED_GLOBALS) == ALLOWED
  for key, value in dm_checkpoint.ALLOWED_GLOBALS.items():
    # A function or class of ours, or the inert stand-in of numpy.ndarray:
    # never NumPy's, Python's or dill's own callable.
    module = getattr(value, '__module__', type(value).__module__)
    assert module == dm_checkpoint.__name__, (key, value)


def _op_str(text):
  data = text.encode()
  return b'X' + len(data).to_bytes(4, 'little') + data


def getattr_chain_pickle(command):
  """getattr(_codecs.encode, '__globals__')['os'].system(command), by hand:
  what an allowed Python function's globals would hand an attacker."""
  return b''.join([
      b'\x80\x02cbuiltins\ngetattr\nq\x00',
      b'h\x00c_codecs\nencode\n', _op_str('__globals__'), b'\x86R',  # globals
      b'q\x01h\x00h\x01', _op_str('get'), b'\x86R',  # globals.get
      _op_str('os'), b'\x85R',  # os
      b'q\x02h\x00h\x02', _op_str('system'), b'\x86R',  # os.system
      _op_str(command), b'\x85R.'])


def test_a_getattr_pickle_is_refused_unrun(tmp_path):
  marker = tmp_path / 'marker'
  path = tmp_path / 'getattr.pkl'
  path.write_bytes(getattr_chain_pickle(f'touch {marker}'))
  with pytest.raises(dm_checkpoint.DMCheckpointError,
                     match='refusing.*builtins.getattr'):
    dm_checkpoint.read(str(path))
  assert not marker.exists()


# ---------------------------------------------------------------------------
# Hostile and damaged files: one DMCheckpointError, nothing run, nothing
# allocated beyond the file's size; through main.py one `error:` line, exit
# 2, no workdir.


class _Payload:
  """Unpickles as a call of `fn(*args)` (and `state` given to BUILD)."""

  def __init__(self, fn, *args, state=None):
    self.fn, self.args, self.state = fn, args, state

  def __reduce__(self):
    if self.state is None:
      return self.fn, self.args
    return self.fn, self.args, self.state


def _reconstruct():
  """NumPy's own `_reconstruct` (pickled under its module's name)."""
  from numpy._core import multiarray  # pylint: disable=g-import-not-at-top
  return multiarray._reconstruct  # pylint: disable=protected-access


def _dm_pickle(step):
  """A DeepMind-layout pickle (written with the stand-in classes of
  test_dm_checkpoint under DeepMind's names) with `step` as given."""
  import test_dm_checkpoint as t  # pylint: disable=g-import-not-at-top
  mp = pytest.MonkeyPatch()
  try:
    t.deepmind_modules.__wrapped__(mp)
    state = t._ByolExperimentState(  # pylint: disable=protected-access
        {}, {}, {}, {}, (t.ScaleByLarsState({}),))
    return pickle.dumps(dict(experiment_state=state, step=step), protocol=2)
  finally:
    mp.undo()


def _nested_dicts(depth):
  """{0: {0: ... None}} `depth` deep, by hand (pickle itself would recurse)."""
  return (b'\x80\x02' + b'}K\x00' * depth + b'N' + b's' * depth + b'.')


def _shared_tuples(levels):
  """t = None; t = (t, t) `levels` times: 2**levels leaves, a few bytes."""
  body = b''.join(b'q' + bytes([i]) + b'h' + bytes([i]) + b'\x86'
                  for i in range(levels))
  return b'\x80\x02N' + body + b'.'


def _dill_call(name, *args):
  out = [b'\x80\x02cdill._dill\n' + name.encode() + b'\n']
  for a in args:
    out.append(_op_str(a))
  out.append({1: b'\x85', 2: b'\x86', 3: b'\x87'}[len(args)] + b'R.')
  return b''.join(out)


def _hostile_files():
  """name -> (bytes of the file, a fragment of the error)."""
  big_state = (1, (2**30,), np.dtype('f4'), False, b'\0' * 16)
  truncated = open(fixture('0.4.1'), 'rb').read()
  return {
      # The seven that ended in a traceback.
      'ndarray_2_40_f8': (pickle.dumps(_Payload(np.ndarray, (2**40,), 'f8'),
                                       protocol=2), 'numpy.ndarray'),
      'reconstruct_2_45': (pickle.dumps(_Payload(
          _reconstruct(), np.ndarray, (2**45,), b'b'),
                                        protocol=2), '_reconstruct'),
      'nested_100000': (_nested_dicts(100_000), 'nested more than'),
      'step_x': (_dm_pickle('x'), 'step'),
      'step_nan': (_dm_pickle(float('nan')), 'step'),
      'step_2_40': (_dm_pickle(2**40), 'step'),
      'step_minus_5': (_dm_pickle(-5), 'step'),
      # Sizes declared beyond the data, and types NumPy would build blindly.
      'shape_beyond_data': (pickle.dumps(_Payload(
          _reconstruct(), np.ndarray, (0,), b'b',
          state=big_state), protocol=2), 'holds 16 bytes'),
      'object_array': (pickle.dumps(np.array([1, 'a'], dtype=object),
                                    protocol=2), 'dtype'),
      'bytes_2_40': (pickle.dumps(_Payload(bytes, 2**40), protocol=2),
                     'bytes'),
      'shared_tuples': (_shared_tuples(30), 'objects'),
      # Callables outside the list, and dill's reconstructors misused.
      'os_system': (pickle.dumps(_Payload(os.system, 'touch MARKER'),
                                 protocol=2), 'system'),
      'eval': (pickle.dumps(_Payload(eval, '1 + 1'), protocol=2), 'eval'),
      'subprocess': (pickle.dumps(_Payload(subprocess.call, ['true']),
                                  protocol=2), 'subprocess'),
      'getattr_chain': (getattr_chain_pickle('touch MARKER'), 'getattr'),
      'dill_import_os': (_dill_call('_import_module', 'os'), "'os'"),
      'dill_namedtuple_unknown': (
          _dill_call('_create_namedtuple', 'Evil', 'os'), 'namedtuple'),
      'truncated_dill_fixture': (truncated[:len(truncated) // 2],
                                 'not a readable'),
      'not_a_pickle': (b'PK\x03\x04 not a pickle at all', 'not a readable'),
      'empty': (b'', 'not a readable'),
      'plain_numbers': (pickle.dumps({'step': 1, 'w': [1.0, 2.0]},
                                     protocol=2), 'not a DeepMind'),
  }


HOSTILE = sorted(_hostile_files())


@pytest.fixture(scope='module')
def hostile_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('hostile')
  for name, (data, _) in _hostile_files().items():
    (directory / f'{name}.pkl').write_bytes(data.replace(
        b'MARKER', str(directory / 'marker').encode()))
  return directory


@pytest.mark.parametrize('name', HOSTILE)
def test_hostile_file_is_one_checkpoint_error(hostile_dir, name):
  fragment = _hostile_files()[name][1]
  with pytest.raises(dm_checkpoint.DMCheckpointError) as e:
    data = dm_checkpoint.read(str(hostile_dir / f'{name}.pkl'))
    dm_checkpoint.to_train_state(data, small_config())
  message = str(e.value)
  assert '\n' not in message and fragment in message, message
  assert not (hostile_dir / 'marker').exists()


def test_hostile_files_through_main_are_one_line_and_leave_no_workdir(
    hostile_dir, tmp_path):
  names = HOSTILE + ['missing', 'folder']
  (hostile_dir / 'folder.pkl').mkdir(exist_ok=True)
  cases = [small_import_args(hostile_dir / f'{n}.pkl', tmp_path / n)
           for n in names]
  for name, result in zip(names, run_main_cases(cases, tmp_path)):
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode == 2, (name, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith('error: '), (name, lines)
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / name).exists(), name
  assert not (hostile_dir / 'marker').exists()
