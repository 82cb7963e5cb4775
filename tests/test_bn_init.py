"""The BN-init protocol: BatchNorm folded into trainable per-channel affines."""

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

BATCH = 16


def _assert_outputs_close(got, expected):
  """Every output within 1e-4 of the largest magnitude of its reference."""
  for name in expected:
    scale = float(np.abs(np.asarray(expected[name])).max())
    np.testing.assert_allclose(np.asarray(got[name]),
                               np.asarray(expected[name]),
                               atol=1e-4 * max(scale, 1.0), rtol=0,
                               err_msg=name)


def _forward(config):
  return model.make_forward(config, 10, axis_name=None)


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
      lambda k, x: bn_init.bn_initialised_params(config, _forward, k, x))(
          key, images)
  # The BatchNorm network the conversion started from (same key, same
  # weights; the statistics network differs only in its moving-average decay).
  bn_forward = _forward(bn_init.statistics_config(config))
  bn_params, bn_state = bn_forward.init(key, images, True)
  return config, bn_params, bn_state, params, state, images


def test_converted_network_computes_the_bn_networks_outputs(converted):
  config, bn_params, bn_state, params, state, images = converted
  bn_forward = _forward(bn_init.statistics_config(config))
  expected, _ = bn_forward.apply(bn_params, bn_state, None, images, True)
  affine_forward = _forward(config)  # model.init=bn_init -> affine network
  for is_training in (True, False):
    got, _ = affine_forward.apply(params, state, None, images, is_training)
    assert set(got) == set(expected) == {'embedding', 'projection',
                                         'prediction', 'logits'}
    _assert_outputs_close(got, expected)
  # Not trivially so: the same weights with default affines (1, 0), i.e. no
  # normalization at all, compute something else.
  default_params, _ = affine_forward.init(jax.random.PRNGKey(3), images, True)
  default_params = {m: (default_params[m] if 'affine' in m else v)
                    for m, v in params.items()}
  plain, _ = affine_forward.apply(default_params, state, None, images, True)
  assert float(np.abs(np.asarray(plain['projection']) -
                      np.asarray(expected['projection'])).max()) > 1e-2


def test_folding_uses_gamma_and_beta():
  """scale = gamma/std, offset = beta - gamma*mean/std, for any gamma, beta."""
  config = tiny_config('local,bn')
  images = _images(1)
  key = jax.random.PRNGKey(0)
  stats_forward = _forward(bn_init.statistics_config(config))
  bn_params, bn_state = stats_forward.init(key, images, True)
  rng = np.random.RandomState(0)
  for module in bn_params:
    if 'batchnorm' in module:
      for leaf in ('scale', 'offset'):
        shape = bn_params[module][leaf].shape
        bn_params[module][leaf] = jnp.asarray(
            rng.uniform(0.5, 1.5, shape) if leaf == 'scale'
            else rng.randn(*shape), jnp.float32)
  expected, bn_state = stats_forward.apply(bn_params, bn_state, None, images,
                                           True)
  affine_forward = _forward(bn_init.affine_config(config))
  template, state = affine_forward.init(key, images, True)
  params = bn_init.convert_bn_to_affine(bn_params, bn_state, template,
                                        config.model.bn_eps)
  got, _ = affine_forward.apply(params, state, None, images, True)
  _assert_outputs_close(got, expected)


def test_converted_network_is_batch_independent(converted):
  config, bn_params, bn_state, params, state, images = converted
  affine_forward = _forward(config)
  batch, _ = affine_forward.apply(params, state, None, images, True)
  alone, _ = affine_forward.apply(params, state, None, images[3:4], True)
  for name in ('embedding', 'projection', 'prediction'):
    np.testing.assert_allclose(np.asarray(alone[name][0]),
                               np.asarray(batch[name][3]), rtol=1e-5,
                               atol=1e-5)
  # The BatchNorm network in training mode is not.
  bn_forward = _forward(bn_init.statistics_config(config))
  bn_batch, _ = bn_forward.apply(bn_params, bn_state, None, images, True)
  bn_pair, _ = bn_forward.apply(bn_params, bn_state, None, images[3:5], True)
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


def test_bn_init_config_pretrains(tmp_path):
  config = tiny_config('local,bn_init', **{
      'training.max_steps': 2, 'training.log_every_steps': 1,
      'training.checkpoint_every_steps': 2, 'model.bn_init_batch_size': 32})
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
