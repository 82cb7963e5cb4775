"""DeepMind BYOL checkpoints: safe reading, import into a workdir, eval, resume."""

import os
import pickle
import subprocess
import sys
import types
from typing import Any, NamedTuple

import chex

import haiku as hk
from haiku._src import data_structures
import jax
import numpy as np
import optax
import pytest

from byol import checkpointing
from byol import dm_checkpoint
from byol import eval_experiment
from byol import experiment
from byol import model
from byol import train_loop
from configs import byol as byol_config
from configs import eval as eval_config
from test_experiment import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# DeepMind's classes, re-created under their own module names only while a
# fixture file is written (our package is also called `byol`).


class _ByolExperimentState(NamedTuple):
  online_params: Any
  target_params: Any
  online_state: Any
  target_state: Any
  opt_state: Any


class ScaleByLarsState(NamedTuple):
  mu: Any


class AddWeightDecayState(NamedTuple):
  pass


class ScaleState(NamedTuple):
  pass


@pytest.fixture
def deepmind_modules(monkeypatch):
  """Registers byol.byol_experiment etc. in sys.modules for pickling."""
  exp = types.ModuleType('byol.byol_experiment')
  utils = types.ModuleType('byol.utils')
  opt = types.ModuleType('byol.utils.optimizers')
  for module, classes in ((exp, [_ByolExperimentState]),
                          (opt, [ScaleByLarsState, AddWeightDecayState])):
    for cls in classes:
      cls.__module__ = module.__name__
      setattr(module, cls.__name__, cls)
  for module in (exp, utils, opt):
    monkeypatch.setitem(sys.modules, module.__name__, module)
  transform = sys.modules['optax._src.transform']
  ScaleState.__module__ = 'optax._src.transform'
  monkeypatch.setattr(transform, 'ScaleState', ScaleState, raising=False)


def _dm_names(tree):
  """Our Haiku tree as plain dicts, as DeepMind's file holds it (our module
  names are DeepMind's, the heads' `batch_norm` included)."""
  return {m: dict(v) for m, v in tree.items()}


def _trace(opt_state):
  # Anywhere in the optimizer's (nested) chain state.
  nodes = jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))
  return next(s.trace for s in nodes if isinstance(s, optax.TraceState))


def random_state(config, step, seed=0):
  """A TrainState of `config` with random values everywhere (no compile)."""
  rng = np.random.RandomState(seed)

  def fill(path, x):
    name = jax.tree_util.keystr(path)
    if x.dtype.kind == 'i':
      return np.full(x.shape, step, x.dtype)
    if 'var_ema' in name or "'scale'" in name:
      return rng.uniform(0.5, 1.5, x.shape).astype(x.dtype)
    fan_in = int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
    return (rng.randn(*x.shape) / np.sqrt(fan_in)).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(
      fill, experiment.state_template(config))


def write_dm_pickle(path, state, step, immutable=False):
  """`state` in DeepMind's layout, protocol 2 (needs `deepmind_modules`).

  With `immutable`, the parameters are Haiku's own immutable mappings (as
  older Haiku versions returned them): `FlatMap` and `frozendict`.
  """
  online, target = (_dm_names(state.online_params),
                    _dm_names(state.target_params))
  if immutable:
    online = hk.data_structures.to_immutable_dict(online)
    target = data_structures.frozendict(
        {m: data_structures.frozendict(v) for m, v in target.items()})
  es = _ByolExperimentState(
      online_params=online,
      target_params=target,
      online_state=_dm_names(state.online_state),
      target_state=_dm_names(state.target_state),
      opt_state=(AddWeightDecayState(),
                 ScaleByLarsState(mu=_dm_names(_trace(state.opt_state))),
                 ScaleState()))
  with open(path, 'wb') as f:
    pickle.dump(dict(experiment_state=es, step=step,
                     rng=np.array([0, 42], np.uint32)), f, protocol=2)


def _assert_same_state(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------
# A small BatchNorm ResNet: import, evaluate, fine-tune, resume.

SMALL_STEP = 3


@pytest.fixture(scope='module')
def small_config():
  # DeepMind's networks are BatchNorm without WS; 5 steps in all, so that a
  # resumed run takes 2 more. Nothing is measured during them (the online
  # classifier would read every TEST image; the test evaluates the workdir
  # with DeepMind's protocol instead).
  return tiny_config('local,bn', **{'training.max_steps': SMALL_STEP + 2,
                                    'evaluators.schedule': ()})


@pytest.fixture
def imported(tmp_path, deepmind_modules, small_config):
  del deepmind_modules
  state = random_state(small_config, SMALL_STEP)
  path = str(tmp_path / 'pretrain.pkl')
  write_dm_pickle(path, state, SMALL_STEP)
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  return state, path, workdir


@pytest.mark.slow
def test_small_resnet_imports_evaluates_and_resumes(imported, small_config):
  state, path, workdir = imported
  assert b'byol.byol_experiment' in open(path, 'rb').read(4096)
  lines = []
  step = dm_checkpoint.import_to_workdir(path, small_config, workdir,
                                         printer=lines.append)
  assert step == SMALL_STEP
  # Leaf for leaf what was written, with no renaming by hand; the momentum
  # and step count land in our LARS chain's state.
  restored, meta = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints')).restore(
          target=experiment.state_template(small_config))
  _assert_same_state(state, restored)
  assert meta['imported_from'] == os.path.abspath(path)
  assert int(restored.step) == SMALL_STEP

  # Evaluation-mode embeddings equal the source parameters' forward.
  embed = jax.jit(model.Network(small_config, axis_name=None).embed)
  images = np.random.RandomState(1).uniform(size=(4, 16, 16, 3)).astype(
      np.float32)
  want = np.asarray(embed(state.online_params, state.online_state, images))
  got = np.asarray(embed(restored.online_params, restored.online_state,
                         images))
  assert np.abs(want).max() > 1e-3
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)

  # DeepMind's evaluation protocol runs on the workdir.
  c = eval_config.get_config('dm,local')
  c.unlock()
  c.update_from_flattened_dict({
      'training.batch_size': 64, 'training.max_steps': 2,
      'data.image_size': 8, 'training.log_every_steps': 1})
  c.lock()
  result = eval_experiment.run(c, workdir, printer=lambda _: None)
  assert result['checkpoint_step'] == SMALL_STEP
  assert result['num_test_examples'] == 10_000
  assert 0.0 < result['top1_accuracy'] <= result['top5_accuracy'] <= 1.0

  # Pretraining resumes from the imported step and runs to the end.
  out = []
  summary = train_loop.train(experiment.PretrainExperiment(
      small_config, workdir, printer=out.append))
  assert any(f'resuming from the checkpoint of step {SMALL_STEP}' in l
             for l in out), out
  assert summary['step'] == SMALL_STEP + 2
  assert np.isfinite(summary['loss'])


def test_a_config_that_does_not_fit_is_refused(imported):
  _, path, workdir = imported
  gn = tiny_config('local', **{'training.max_steps': SMALL_STEP + 2})
  with pytest.raises(dm_checkpoint.DMCheckpointError,
                     match=r"does not fit.*groupnorm.*is missing"):
    dm_checkpoint.import_to_workdir(path, gn, workdir)
  assert os.listdir(workdir) == []  # nothing written


# ---------------------------------------------------------------------------
# A ResNet-50 tree with DeepMind's names.


def resnet50_config(width=0.25):
  c = byol_config.get_config('bn')
  c.unlock()
  c.model.encoder.width_multiplier = width
  for head in ('projector', 'predictor'):
    c.model[head].hidden_size = 64
    c.model[head].output_size = 16
  c.data.image_size = 32
  c.lock()
  return c


def test_resnet50_tree_matches_deepmind_parameter_count():
  # DeepMind's ResNet-50 (v1, width 1) without its final layer has
  # 23,508,032 parameters: 25,557,032 (torchvision's) minus the 2,049,000 of
  # the 1000-way linear layer. The same tree, by shape only.
  shapes = jax.eval_shape(lambda: experiment.state_template(
      resnet50_config(1.0)).online_params)
  encoder = {m: v for m, v in shapes.items() if m.startswith('res_net50/')}
  assert sum(x.size for x in jax.tree.leaves(encoder)) == 23_508_032
  assert 'res_net50/~/block_group_0/~/block_0/~/shortcut_conv' in encoder


def test_resnet50_with_deepmind_head_names_loads(tmp_path, deepmind_modules):
  del deepmind_modules
  config = resnet50_config()
  state = random_state(config, step=5005, seed=3)
  path = str(tmp_path / 'pretrain_res50.pkl')
  write_dm_pickle(path, state, 5005, immutable=True)
  raw = open(path, 'rb').read()
  assert b'FlatMapping' in raw and b'frozendict' in raw
  data = dm_checkpoint.read(path)
  online = data['experiment_state'].online_params
  assert 'projector/batch_norm' in online and 'predictor/batch_norm' in online
  loaded = dm_checkpoint.to_train_state(data, config, path)
  _assert_same_state(state, loaded)
  embed = jax.jit(model.Network(config, axis_name=None).embed)
  images = np.random.RandomState(0).uniform(size=(2, 32, 32, 3)).astype(
      np.float32)
  want = np.asarray(embed(state.online_params, state.online_state, images))
  got = np.asarray(embed(loaded.online_params, loaded.online_state, images))
  assert want.shape == (2, 512) and np.abs(want).max() > 1e-3
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Pickles that are not DeepMind checkpoints.


class _Payload:
  """Unpickles as a call of `fn(*args)`."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


@pytest.mark.parametrize('fn, args', [
    (eval, ('1 + 1',)),
    (subprocess.call, (['true'],)),
    (os.remove, ('/nonexistent',)),
    (np.load, ('/nonexistent.npy',)),
])
def test_other_callables_are_refused_unrun(tmp_path, fn, args):
  path = str(tmp_path / 'bad.pkl')
  with open(path, 'wb') as f:
    pickle.dump({'experiment_state': _Payload(fn, *args), 'step': 1}, f,
                protocol=2)
  with pytest.raises(dm_checkpoint.DMCheckpointError, match='refusing'):
    dm_checkpoint.read(path)


def test_non_checkpoints_are_user_errors(tmp_path):
  plain = tmp_path / 'plain.pkl'
  plain.write_bytes(pickle.dumps({'step': 1, 'weights': np.ones(3)},
                                 protocol=2))
  with pytest.raises(dm_checkpoint.DMCheckpointError,
                     match='not a DeepMind BYOL pretraining checkpoint'):
    dm_checkpoint.read(str(plain))
  truncated = tmp_path / 'truncated.pkl'
  truncated.write_bytes(plain.read_bytes()[:20])
  with pytest.raises(dm_checkpoint.DMCheckpointError, match='not a readable'):
    dm_checkpoint.read(str(truncated))
  # NumPy arrays themselves (protocol 2: _reconstruct, dtype, bytes) load.
  arrays = tmp_path / 'arrays.pkl'
  arrays.write_bytes(pickle.dumps([np.arange(5, dtype=np.int64),
                                   np.float32(2.5), b'\x00\xff'], protocol=2))
  with open(arrays, 'rb') as f:
    a, s, raw = dm_checkpoint.SafeUnpickler(f).load()
  np.testing.assert_array_equal(a, np.arange(5))
  assert s == np.float32(2.5) and raw == b'\x00\xff'


def test_os_system_pickle_exits_2_with_one_line_and_runs_nothing(tmp_path):
  marker = tmp_path / 'marker'
  path = tmp_path / 'evil.pkl'
  path.write_bytes(pickle.dumps(_Payload(os.system, f'touch {marker}'),
                                protocol=2))
  workdir = tmp_path / 'run'
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/byol.py:bn',
       f'--workdir={workdir}', f'--import_dm={path}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  assert 'system' in lines[0] and 'refusing' in lines[0]
  assert not marker.exists()
  assert not workdir.exists()  # no workdir left behind
