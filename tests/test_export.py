"""Encoders out: torchvision-layout safetensors for PyTorch, a TF SavedModel.

Verification, not trust: each kind of network (BatchNorm, GN+WS, the `local`
small-stem net, a bottleneck net with the ImageNet stem) is exported with
random weights and random BatchNorm averages, loaded in torch and in
TensorFlow, and its embeddings compared with the project's evaluation-mode
forward on the same images, to 1e-4 relative. torch is a test dependency
(requirements-test.txt), installed by `./run.sh test`: these tests do not
skip.
"""

import json
import os
import re
import subprocess
import sys

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from byol import checkpointing
from byol import dm_checkpoint
from byol import experiment
from byol import model
from byol import networks
from byol.evaluation import features
from byol.export import exporter
from byol.export import savedmodel
from byol.export import torch_layout
from byol.export import torch_resnet
from configs import byol as byol_config
from test_dm_checkpoint import deepmind_modules  # pylint: disable=unused-import
from test_dm_checkpoint import random_state
from test_dm_checkpoint import write_dm_pickle
from test_experiment import tiny_config

# One worker runs the module: its tests share the exports of the `exports`
# fixture, which another worker would make (and convert) again.
pytestmark = pytest.mark.xdist_group('export')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The agreement the export promises (README, "Use the weights elsewhere").
RTOL = 1e-4

# Each kind of network, as overrides of the tests' tiny `local` config:
# (variant, overrides, image sides). Odd and even sides: TensorFlow's SAME
# padding differs from torchvision's on even inputs to a stride-2 layer.
KINDS = {
    'bn': ('local,bn', {}, (16, 24)),
    'gnws': ('local', {}, (16, 24)),
    'bn_imagenet_stem': ('local,bn', {'model.encoder.stem': 'imagenet'},
                         (32, 33)),
    'gnws_bottleneck_imagenet_stem': (
        'local', {'model.encoder.stem': 'imagenet', 'model.encoder.depth': 50},
        (32, 33)),
    'ln': ('local', {'model.encoder.norm': 'ln'}, (16,)),
}


# Kinds also checked as SavedModels (the others are torch-only variations).
SAVEDMODEL_KINDS = ('bn', 'local', 'gnws_bottleneck_imagenet_stem')

# The two largest networks (their exports, each with a SavedModel, cost the
# most) are checked in the full suite only; the fast tier keeps BN, GN+WS,
# LN and the ImageNet stem in torch and BN as a SavedModel.
_LARGE_KINDS = ('local', 'gnws_bottleneck_imagenet_stem')


def kind_params(kinds):
  return [pytest.param(k, marks=pytest.mark.slow) if k in _LARGE_KINDS
          else k for k in kinds]


def kind_config(kind):
  variant, overrides, _ = KINDS[kind]
  return tiny_config(variant, **overrides)


def local_config():
  """The `local` preset's own network (width 0.25, 24 px), unshrunk."""
  return byol_config.get_config('local')


def network(config, seed=0):
  """(params, state) of `config`'s online network, random everywhere: BN
  averages, norm scales and offsets, so that no layer is an identity."""
  state = random_state(config, step=3, seed=seed)
  return state.online_params, state.online_state


def images(n, side, seed=1):
  return np.random.RandomState(seed).uniform(
      size=(n, side, side, 3)).astype(np.float32)


def project_outputs(config, params, state, x):
  """The project's evaluation-mode forward: the reference."""
  forward = model.make_forward(config, 10, axis_name=None)
  from byol import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  out, _ = jax.jit(forward.apply, static_argnums=4)(
      params, state, None, dataset_lib.normalize(x, config.data.dataset),
      False)
  return jax.tree.map(np.asarray, out)


def to_torch_input(x, info):
  mean = np.asarray(info['input']['mean'], np.float32)
  std = np.asarray(info['input']['std'], np.float32)
  return torch.from_numpy(np.ascontiguousarray(
      ((x - mean) / std).transpose(0, 3, 1, 2)))


def assert_close_relative(got, want, rtol=RTOL):
  """|got - want| <= rtol * max|want| everywhere (and want is not ~0)."""
  scale = float(np.abs(want).max())
  assert scale > 1e-3, 'a degenerate reference proves nothing'
  chex.assert_trees_all_close(np.asarray(got), want, rtol=0,
                              atol=rtol * scale)


def relative_error(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
  """kind -> (config, params, state, export folder, encoder.json), made once."""
  made = {}

  def get(kind):
    if kind not in made:
      config = local_config() if kind == 'local' else kind_config(kind)
      params, state = network(config)
      out = str(tmp_path_factory.mktemp('exports') / kind)
      formats = ('torch', 'savedmodel') if kind in SAVEDMODEL_KINDS else (
          'torch',)
      info = exporter.export_network(config, params, state, out, formats,
                                     heads=True, printer=lambda _: None)
      made[kind] = (config, params, state, out, info)
    return made[kind]

  return get


def image_sides(kind):
  return (24, 32) if kind == 'local' else KINDS[kind][2]


# ---------------------------------------------------------------------------
# PyTorch


@pytest.mark.parametrize('kind', kind_params(
    ['bn', 'gnws', 'local', 'bn_imagenet_stem',
     'gnws_bottleneck_imagenet_stem', 'ln']))
def test_torch_gives_the_project_embeddings(exports, kind):
  config, params, state, out, info = exports(kind)
  model_tv = torch_resnet.load(out)
  heads = torch_resnet.load_heads(out)
  for side in image_sides(kind):
    x = images(4, side)
    want = project_outputs(config, params, state, x)
    with torch.no_grad():
      xt = to_torch_input(x, info)
      logits = model_tv(xt).numpy()
      embedding = model_tv.embed(xt)
      projection = heads['projector'](embedding)
      prediction = heads['predictor'](projection)
    assert_close_relative(embedding.numpy(), want['embedding'])
    assert_close_relative(logits, want['logits'])
    assert_close_relative(projection.numpy(), want['projection'])
    assert_close_relative(prediction.numpy(), want['prediction'])


@pytest.mark.parametrize('kind', ['bn', 'bn_imagenet_stem'])
def test_torchvision_padding_would_not(exports, kind):
  """deepmind-research #84: symmetric padding changes the embedding on even
  inputs (stride-2 layers pad (0, 1) in TensorFlow, (1, 1) in torchvision);
  on odd ones the two rules agree."""
  config, params, state, out, info = exports(kind)
  symmetric = torch_resnet.load(out, padding='torchvision')
  even, odd = image_sides(kind)[0], 33
  for side in (even, odd):
    x = images(4, side)
    want = project_outputs(config, params, state, x)['embedding']
    with torch.no_grad():
      got = symmetric.embed(to_torch_input(x, info)).numpy()
    error = relative_error(got, want)
    if side % 2 == 0:
      assert error > 0.05, error
    elif config.model.encoder.stem == 'imagenet':
      assert error < RTOL, error


def test_pre_standardized_ws_weights(exports):
  """A GN+WS export's convs hold standardized kernels (per output channel:
  mean 0, variance 1 / (1 + ws_eps / var)); re-standardizing them on every
  call (fine-tuning mode) leaves the embedding as it is."""
  config, params, state, out, info = exports('gnws')
  assert info['weight_standardization'] == {
      'trained_with': True, 'pre_standardized': True, 'eps': 1e-10,
      'rule': info['weight_standardization']['rule']}
  sd = safetensors.numpy.load_file(os.path.join(out, 'encoder.safetensors'))
  for key in ('conv1.weight', 'layer2.0.conv2.weight',
              'layer3.0.downsample.0.weight'):
    w = sd[key].astype(np.float64)
    chex.assert_trees_all_close(w.mean(axis=(1, 2, 3)), 0., atol=1e-6)
    chex.assert_trees_all_close(w.var(axis=(1, 2, 3)), 1., atol=1e-5)
  fine_tune = torch_resnet.load(out, fine_tune_ws=True)
  assert fine_tune.conv1.weight_standardization
  x = images(4, 16)
  want = project_outputs(config, params, state, x)['embedding']
  with torch.no_grad():
    got = fine_tune.embed(to_torch_input(x, info)).numpy()
  assert_close_relative(got, want)


def _encoder_params_zeros(config):
  """Encoder + classifier parameters of `config`, zeros (shapes only traced)."""
  forward = model.make_forward(config, 1000, axis_name=None)
  s = 64
  shapes = jax.eval_shape(
      lambda x: forward.init(jax.random.PRNGKey(0), x, True),
      jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
  return zeros


@pytest.mark.parametrize('norm', ['bn', 'gn'])
def test_resnet50_layout_is_torchvisions(norm):
  """The exported ResNet-50 has exactly torchvision resnet50's state-dict
  keys and shapes, listed by torchvision's naming rules (torchvision itself
  cannot be installed beside the pinned torch); its parameter count is
  torchvision's published 25,557,032; torch_resnet builds the same module."""
  config = byol_config.get_config('bn' if norm == 'bn' else '')
  params, state = _encoder_params_zeros(config)
  sd = torch_layout.encoder_state_dict(config, params, state)
  want = torch_layout.torchvision_layout((3, 4, 6, 3), True, 1000, norm=norm)
  assert {k: v.shape for k, v in sd.items()} == want
  if norm == 'bn':
    assert len(want) == 320  # 161 parameters + 3 buffers x 53 BatchNorms
  n_params = sum(int(np.prod(s)) for k, s in want.items()
                 if not re.search(r'running_|num_batches', k))
  assert n_params == 25_557_032
  module = torch_resnet.ResNet((3, 4, 6, 3), True, norm=norm,
                               num_classes=1000)
  assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == want
  assert set(module.state_dict()) == set(sd)


def test_resnet18_layout_has_the_extra_shortcut():
  """Our basic-block nets give layer1's first block a projection shortcut,
  which torchvision's resnet18 (11,689,512 parameters) lacks: exactly
  `layer1.0.downsample.{0,1}` more (64 * 64 + 2 * 64 parameters)."""
  config = byol_config.get_config('bn')
  config.unlock()
  config.model.encoder.depth = 18
  config.lock()
  params, state = _encoder_params_zeros(config)
  sd = torch_layout.encoder_state_dict(config, params, state)
  ours = torch_layout.torchvision_layout((2, 2, 2, 2), False, 1000)
  theirs = torch_layout.torchvision_layout((2, 2, 2, 2), False, 1000,
                                           basic_layer1_downsample=False)
  assert {k: v.shape for k, v in sd.items()} == ours
  extra = sorted(set(ours) - set(theirs))
  assert extra == sorted(f'layer1.0.downsample.{k}' for k in (
      '0.weight', '1.weight', '1.bias', '1.running_mean', '1.running_var',
      '1.num_batches_tracked'))
  count = lambda d: sum(int(np.prod(s)) for k, s in d.items()
                        if not re.search(r'running_|num_batches', k))
  assert count(theirs) == 11_689_512
  assert count(ours) - count(theirs) == 64 * 64 + 2 * 64


def test_bn_averages_and_names_map_leaf_for_leaf(exports):
  """Every Haiku leaf of the encoder lands under its torchvision name."""
  config, params, state, out, _ = exports('bn')
  sd = safetensors.numpy.load_file(os.path.join(out, 'encoder.safetensors'))
  root = 'res_net/~/block_group_1/~/block_0/~/'
  chex.assert_trees_all_close(
      sd['layer2.0.conv2.weight'],
      params[root + 'conv_1']['w'].transpose(3, 2, 0, 1))
  chex.assert_trees_all_close(sd['layer2.0.downsample.1.running_var'],
                              state[root + 'shortcut_batchnorm/~/var_ema'][
                                  'average'].reshape(-1))
  chex.assert_trees_all_close(sd['bn1.weight'], params[
      'res_net/~/initial_batchnorm']['scale'].reshape(-1))
  assert sd['bn1.num_batches_tracked'].dtype == np.int64
  n_haiku = sum(x.size for m, v in params.items() if m.startswith('res_net')
                for x in v.values()) + params['classifier']['w'].size + \
      params['classifier']['b'].size
  n_torch = sum(x.size for k, x in sd.items()
                if not re.search(r'running_|num_batches', k))
  assert n_torch == n_haiku


# ---------------------------------------------------------------------------
# TensorFlow SavedModel


@pytest.mark.parametrize('kind', kind_params(SAVEDMODEL_KINDS))
def test_savedmodel_gives_the_project_embeddings(exports, kind):
  config, params, state, out, info = exports(kind)
  assert info['savedmodel']['outputs'] == ['embedding', 'logits',
                                           'projection', 'prediction']
  serve = savedmodel.load_signature(os.path.join(out, 'savedmodel'))
  stride = torch_layout.TOTAL_STRIDE[config.model.encoder.stem]
  for side, n in ((stride * 2, 3), (stride * 4, 2)):
    x = images(n, side)
    want = project_outputs(config, params, state, x)
    got = {k: v.numpy() for k, v in serve(images=x).items()}
    assert sorted(got) == sorted(info['savedmodel']['outputs'])
    for key in got:
      assert_close_relative(got[key], want[key])


def test_savedmodel_exports_what_torch_cannot(tmp_path):
  """The BN-init protocol's `affine` encoder: refused for torch (one line
  that names the norm), exported as a SavedModel that matches."""
  config = kind_config('bn')
  config.unlock()
  config.model.init = 'bn_init'
  config.lock()
  params, state = network(config)
  with pytest.raises(torch_layout.UnsupportedNorm, match="norm 'affine'"):
    exporter.export_network(config, params, state, str(tmp_path / 'a'),
                            ('torch',), printer=lambda _: None)
  assert not os.path.exists(tmp_path / 'a')
  out = str(tmp_path / 'b')
  exporter.export_network(config, params, state, out, ('savedmodel',),
                          printer=lambda _: None)
  x = images(2, 16)
  want = project_outputs(config, params, state, x)['embedding']
  got = savedmodel.load_signature(os.path.join(out, 'savedmodel'))(
      images=x)['embedding'].numpy()
  assert_close_relative(got, want)
  assert not os.path.exists(os.path.join(out, 'encoder.safetensors'))


def test_savedmodel_refuses_a_side_off_the_stride(exports):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _, _, _, out, _ = exports('bn')
  serve = savedmodel.load_signature(os.path.join(out, 'savedmodel'))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match='height must be a multiple of 8'):
    serve(images=images(1, 20))


# ---------------------------------------------------------------------------
# Workdirs, DeepMind checkpoints, the command


def make_workdir(path, config, seed=0, step=7):
  """A pretraining workdir with one checkpoint of random weights."""
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  state = random_state(config, step, seed)
  checkpointing.Checkpointer(os.path.join(path, 'checkpoints')).save(
      step, state, {'step': step})
  return state


def test_export_of_a_workdir_online_and_target(tmp_path):
  config = kind_config('gnws')
  workdir = str(tmp_path / 'run')
  state = make_workdir(workdir, config)
  for encoder, params, net_state in (
      ('online', state.online_params, state.online_state),
      ('target', state.target_params, state.target_state)):
    out = str(tmp_path / encoder)
    info = exporter.export(workdir, out, 'torch', encoder=encoder,
                           printer=lambda _: None)
    assert info['source']['encoder'] == encoder
    assert info['source']['checkpoint_step'] == 7
    assert sorted(os.listdir(out)) == ['encoder.json', 'encoder.safetensors',
                                       'torch_resnet.py']
    x = images(3, 16)
    want = project_outputs(config, params, net_state, x)['embedding']
    with torch.no_grad():
      got = torch_resnet.load(out).embed(to_torch_input(x, info)).numpy()
    assert_close_relative(got, want)
  # Online and target differ, so the choice was honoured.
  a = safetensors.numpy.load_file(str(tmp_path / 'online' /
                                      'encoder.safetensors'))
  b = safetensors.numpy.load_file(str(tmp_path / 'target' /
                                      'encoder.safetensors'))
  assert np.abs(a['conv1.weight'] - b['conv1.weight']).max() > 1e-3


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
  config = tiny_config('local,simclr')
  workdir = str(tmp_path / 'run')
  make_workdir(workdir, config)
  empty = str(tmp_path / 'empty')
  os.makedirs(empty)
  with open(os.path.join(empty, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  out = str(tmp_path / 'out')
  cases = [
      (dict(workdir=empty, out=out, fmt='torch'), 'has no checkpoint'),
      (dict(workdir=workdir, out=out, fmt='onnx'), "unknown --format 'onnx'"),
      (dict(workdir=workdir, out=out, fmt='torch', encoder='target'),
       'simclr has no target network'),
      (dict(workdir=workdir, out=out, fmt='torch', encoder='ema'),
       "unknown --encoder 'ema'"),
      (dict(workdir=workdir, out=out, fmt='torch', checkpoint_step=3),
       'no checkpoint for step 3'),
  ]
  for kwargs, message in cases:
    kwargs = dict(kwargs)
    args = (kwargs.pop('workdir'), kwargs.pop('out'), kwargs.pop('fmt'))
    with pytest.raises(exporter.UserError, match=re.escape(message)):
      exporter.export(*args, printer=lambda _: None, **kwargs)
    assert not os.path.exists(out)
  assert sorted(os.listdir(tmp_path)) == ['empty', 'run']


def test_overwrite_replaces_the_folder(tmp_path):
  config = kind_config('bn')
  workdir = str(tmp_path / 'run')
  make_workdir(workdir, config)
  out = str(tmp_path / 'out')
  os.makedirs(out)
  with open(os.path.join(out, 'old.txt'), 'w') as f:
    f.write('kept unless --overwrite')
  with pytest.raises(exporter.ExportError, match='exists'):
    exporter.export(workdir, out, 'torch', printer=lambda _: None)
  assert os.listdir(out) == ['old.txt']
  exporter.export(workdir, out, 'torch', overwrite=True,
                  printer=lambda _: None)
  assert sorted(os.listdir(out)) == ['encoder.json', 'encoder.safetensors',
                                     'torch_resnet.py']
  assert sorted(os.listdir(tmp_path)) == ['out', 'run']


def test_imported_deepmind_checkpoint_exports(tmp_path, deepmind_modules):
  """A DeepMind BYOL pickle (their BN ResNet layout) imported into a workdir
  exports to torchvision names and gives the same embeddings in torch."""
  del deepmind_modules
  config = kind_config('bn')
  state = random_state(config, 5, seed=3)
  pkl = str(tmp_path / 'pretrain.pkl')
  write_dm_pickle(pkl, state, 5)
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  dm_checkpoint.import_to_workdir(pkl, config, workdir, printer=lambda _: None)
  out = str(tmp_path / 'export')
  info = exporter.export(workdir, out, 'torch', printer=lambda _: None)
  assert info['source']['checkpoint_step'] == 5
  assert info['torch_norm'] == 'BatchNorm2d'
  x = images(3, 16)
  want = project_outputs(config, state.online_params, state.online_state,
                         x)['embedding']
  with torch.no_grad():
    got = torch_resnet.load(out).embed(to_torch_input(x, info)).numpy()
  assert_close_relative(got, want)


def run_cli(*args, cwd=ROOT):
  env = dict(os.environ, PYTHONPATH=ROOT,
             PATH=os.path.dirname(sys.executable) + os.pathsep +
             os.environ.get('PATH', ''))
  return subprocess.run([sys.executable, '-m', 'byol.export', *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=600, check=False)


@pytest.mark.slow  # four `python -m byol.export` processes
def test_command_bad_input_is_one_error_line(tmp_path):
  config = kind_config('bn')
  config.unlock()
  config.model.init = 'bn_init'
  config.lock()
  workdir = str(tmp_path / 'run')
  make_workdir(workdir, config)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('x')
  for args, message in (
      ([f'--workdir={workdir}', '--format=torch', f'--out={tmp_path}/new'],
       "error: the encoder's norm 'affine'"),
      ([f'--workdir={workdir}', '--format=savedmodel', f'--out={out}'],
       f'error: {out} exists'),
      ([f'--workdir={workdir}', f'--out={tmp_path}/new'],
       'error: --format is required'),
      ([f'--workdir={workdir}', '--format=torch', f'--out={tmp_path}/new',
        '--checkpoint_step=x'], 'error: flag --checkpoint_step=x'),
  ):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert 'Traceback' not in result.stderr
  assert [p.name for p in out.iterdir()] == ['keep.txt']
  assert sorted(os.listdir(tmp_path)) == ['out', 'run']


# ---------------------------------------------------------------------------
# README


def readme_section():
  text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
  start = text.index('## Use the weights elsewhere')
  end = text.find('\n## ', start + 1)
  return text[start:end if end > 0 else None]


@pytest.mark.slow  # an export and two snippets, each its own process
def test_readme_snippets_run(tmp_path):
  """The README's export command, its PyTorch and its Keras snippets, run as
  written (in a folder with a `workdirs/local` of a small `local` run)."""
  section = readme_section()
  blocks = re.findall(r'```(\w+)\n(.*?)```', section, re.S)
  commands = [b for lang, b in blocks if lang == 'bash']
  python = [b for lang, b in blocks if lang == 'python']
  assert len(commands) == 1 and len(python) == 2, blocks
  config = tiny_config('local', **{'data.image_size': 24})
  state = make_workdir(str(tmp_path / 'workdirs' / 'local'), config)
  env = dict(os.environ, PYTHONPATH=ROOT,
             PATH=os.path.dirname(sys.executable) + os.pathsep +
             os.environ.get('PATH', ''))
  result = subprocess.run(['bash', '-euo', 'pipefail', '-c', commands[0]],
                          cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr
  folder = tmp_path / 'export'
  x = images(8, 24)
  want = project_outputs(config, state.online_params, state.online_state, x)
  np.save(tmp_path / 'images.npy', x)
  for snippet, name in zip(python, ('torch', 'keras')):
    # Each snippet leaves `embedding`; the check feeds it fixed images.
    check = (f'\nimport numpy\nx = numpy.load({str(tmp_path / "images.npy")!r})'
             '\n')
    if name == 'torch':
      check += ('with torch.no_grad():\n'
                '  e = model(torch.from_numpy(x.transpose(0, 3, 1, 2))'
                '.sub(mean).div(std))\n'
                'numpy.save("out.npy", e.numpy())\n')
    else:
      check += 'numpy.save("out.npy", numpy.asarray(encoder(x)["embedding"]))\n'
    result = subprocess.run([sys.executable, '-c', snippet + check],
                            cwd=folder, env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert_close_relative(np.load(folder / 'out.npy'), want['embedding'])
