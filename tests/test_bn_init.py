"""The BN-init protocol: BatchNorm folded into trainable per-channel affines."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol import bn_init
from byol import devices
from byol import experiment
from byol import model
from byol import train_loop
from test_experiment import tiny_config

# One worker runs the module: its tests share the converted network (a
# module fixture), which another worker would compile and convert again.
pytestmark = pytest.mark.xdist_group('bn_init')

BATCH = 16


def _assert_outputs_close(got, expected):
  """Every output within 1e-4 of the largest magnitude of its reference."""
  for name in expected:
    scale = float(np.abs(np.asarray(expected[name])).max())
    chex.assert_trees_all_close(got[name], expected[name],
                                atol=1e-4 * max(scale, 1.0), rtol=0,
                                custom_message=name)


def _forward(config):
  return model.Network(config, axis_name=None).forward


@functools.lru_cache(maxsize=None)
def _jitted(config_json):
  """(init, apply) of the network of a config (given as its JSON), jitted
  once for the module: op-by-op, every test would compile each primitive."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  forward = _forward(ml_collections.ConfigDict(json.loads(config_json)))
  return (jax.jit(forward.init, static_argnums=2),
          jax.jit(forward.apply, static_argnums=4))


def _init(config, key, images):
  return _jitted(config.to_json())[0](key, images, True)


def _apply(config, params, state, images, is_training=True):
  return _jitted(config.to_json())[1](params, state, None, images,
                                      is_training)


def _images(seed=0, batch=BATCH):
  rng = np.random.RandomState(seed)
  # Roughly normalized images, not centred: BN has real statistics to fold.
  return jnp.asarray(0.5 + rng.randn(batch, 16, 16, 3), jnp.float32)


@pytest.fixture(scope='module')
def converted():
  """(config, BN params, BN state, affine params, affine state, images)."""
  config = tiny_config('local,bn_init')  # BN in encoder, projector, predictor
  images = _images()
  key = jax.random.PRNGKey(3)
  params, state = jax.jit(
      lambda k, x: bn_init.bn_initialised_params(config, k, x))(
          key, images)
  # The BatchNorm network the conversion started from (same key, same
  # weights; the statistics network differs only in its moving-average decay).
  bn_params, bn_state = _init(bn_init.statistics_config(config), key, images)
  return config, bn_params, bn_state, params, state, images


def test_converted_network_computes_the_bn_networks_outputs(converted):
  config, bn_params, bn_state, params, state, images = converted
  expected, _ = _apply(bn_init.statistics_config(config), bn_params, bn_state,
                       images)
  # model.init=bn_init -> the affine network
  for is_training in (True, False):
    got, _ = _apply(config, params, state, images, is_training)
    assert set(got) == set(expected) == {'embedding', 'projection',
                                         'prediction', 'logits'}
    _assert_outputs_close(got, expected)
  # Not trivially so: the same weights with default affines (1, 0), i.e. no
  # normalization at all, compute something else.
  default_params, _ = _init(config, jax.random.PRNGKey(3), images)
  default_params = {m: (default_params[m] if 'affine' in m else v)
                    for m, v in params.items()}
  plain, _ = _apply(config, default_params, state, images)
  assert float(np.abs(np.asarray(plain['projection']) -
                      np.asarray(expected['projection'])).max()) > 1e-2


def test_folding_uses_gamma_and_beta():
  """scale = gamma/std, offset = beta - gamma*mean/std, for any gamma, beta."""
  config = tiny_config('local,bn')
  images = _images(1)
  key = jax.random.PRNGKey(0)
  stats_config = bn_init.statistics_config(config)
  bn_params, bn_state = _init(stats_config, key, images)
  rng = np.random.RandomState(0)
  for module in bn_params:
    if 'batchnorm' in module:
      for leaf in ('scale', 'offset'):
        shape = bn_params[module][leaf].shape
        bn_params[module][leaf] = jnp.asarray(
            rng.uniform(0.5, 1.5, shape) if leaf == 'scale'
            else rng.randn(*shape), jnp.float32)
  expected, bn_state = _apply(stats_config, bn_params, bn_state, images)
  affine = model.network_config(config)
  template, state = _init(affine, key, images)
  params = bn_init.convert_bn_to_affine(bn_params, bn_state, template,
                                        config.model.bn_eps)
  got, _ = _apply(affine, params, state, images)
  _assert_outputs_close(got, expected)


def test_converted_network_is_batch_independent(converted):
  config, bn_params, bn_state, params, state, images = converted
  batch, _ = _apply(config, params, state, images)
  alone, _ = _apply(config, params, state, images[3:4])
  for name in ('embedding', 'projection', 'prediction'):
    chex.assert_trees_all_close(alone[name][0], batch[name][3], rtol=1e-5,
                                atol=1e-5)
  # The BatchNorm network in training mode is not.
  stats_config = bn_init.statistics_config(config)
  bn_batch, _ = _apply(stats_config, bn_params, bn_state, images)
  bn_pair, _ = _apply(stats_config, bn_params, bn_state, images[3:5])
  assert float(np.abs(np.asarray(bn_pair['projection'][0]) -
                      np.asarray(bn_batch['projection'][3])).max()) > 1e-2


def test_scale_and_offset_are_trainable_params(converted):
  config, _, _, params, state, images = converted
  affine = [m for m in params if m.split('/')[-1].startswith('affine')]
  # One per BatchNorm of the network: encoder, projector and predictor.
  assert any(m.startswith('projector/') for m in affine)
  assert any(m.startswith('predictor/') for m in affine)
  assert sum(not m.startswith(('projector/', 'predictor/')) for m in affine) > 4
  assert not any('batchnorm' in m for m in params)
  assert not any('batchnorm' in m for m in state)  # no statistics kept
  affine_forward = _forward(config)

  def loss(p):
    out, _ = affine_forward.apply(p, state, None, images, True)
    return jnp.sum(out['prediction'] ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  for m in affine:
    assert set(grads[m]) == {'scale', 'offset'}
    for leaf in ('scale', 'offset'):
      assert float(jnp.abs(grads[m][leaf]).max()) > 0, (m, leaf)


@pytest.mark.slow
def test_bn_init_config_pretrains(tmp_path):
  # The online classifier's TEST pass and the diagnostics are the train
  # loop's, tested on the reference run (tests/test_train_loop.py): off here.
  config = tiny_config('local,bn_init', **{
      'training.max_steps': 2, 'training.log_every_steps': 1,
      'training.checkpoint_every_steps': 2, 'model.bn_init_batch_size': 32,
      'evaluators.schedule': ()})
  exp = experiment.PretrainExperiment(config, str(tmp_path),
                                      printer=lambda _: None)
  summary = train_loop.train(exp)
  assert summary['step'] == 2
  assert np.isfinite(summary['loss'])
  final = devices.unreplicate(exp.state)
  for tree in (final.online_params, final.target_params):
    assert any(m.split('/')[-1].startswith('affine') for m in tree)
    assert not any('batchnorm' in m for m in tree)
  assert not any('batchnorm' in m for m in final.online_state)
  # The initial affines are data-dependent, not the default (1, 0).
  init = devices.unreplicate(exp.initial_state())
  scales = np.concatenate([np.ravel(v['scale'])
                           for m, v in init.online_params.items()
                           if 'affine' in m])
  assert np.abs(scales - 1.0).max() > 0.05
