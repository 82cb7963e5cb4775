"""Tests of byol.onednn_conv: oneDNN's convolutions as XLA:CPU custom calls.

The library is built here when it is missing or out of date (run.sh's set-up
builds it too), so that these tests always run the current source.
"""

import itertools
import json
import os

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl.testing import parameterized

from byol import layers
from byol import model
from byol import networks
from byol import onednn_conv
from byol.errors import ConfigError
from byol.ops import build_onednn
from configs import byol as byol_config

DN = ('NHWC', 'HWIO', 'NHWC')


@pytest.fixture(scope='module', autouse=True)
def library():
  if not build_onednn.up_to_date():
    build_onednn.build()
  assert onednn_conv.unavailable_reason() is None
  assert onednn_conv.available()


def _reference(x, w, stride, padding):
  return jax.lax.conv_general_dilated(
      x, w, (stride, stride), padding, dimension_numbers=DN,
      precision=jax.lax.Precision.HIGHEST)


def _close(got, want, name, atol=3e-6):
  # float32 sums of up to a few thousand terms, relative to the largest
  # entry; a wrong tap, stride, padding or layout is off by O(1).
  scale = float(jnp.max(jnp.abs(want)))
  assert scale > 0.1, name
  chex.assert_trees_all_close(got / scale, want / scale, atol=atol, rtol=0,
                              custom_message=name)


def _cases():
  for kernel, stride, padding in itertools.product(
      (1, 3, 7), (1, 2), ('SAME', 'VALID')):
    yield (f'k{kernel}_s{stride}_{padding.lower()}', kernel, stride, padding)
  yield ('k3_s2_explicit', 3, 2, ((1, 0), (2, 1)))
  yield ('k3_s1_explicit', 3, 1, ((2, 0), (0, 3)))


class KernelVariantsTest(chex.TestCase):
  """Each custom call against lax.conv and its autodiff, jitted and not."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_cases())
  def test_forward_input_and_weight_gradient(self, kernel, stride, padding):
    rng = np.random.RandomState(kernel * 10 + stride)
    # Odd spatial sizes: SAME pads unevenly at stride 2.
    x = jnp.asarray(rng.randn(3, 13, 11, 5), jnp.float32)
    w = jnp.asarray(rng.randn(kernel, kernel, 5, 6), jnp.float32)
    s = (stride, stride)
    pads = onednn_conv.explicit_padding(x.shape[1:3], w.shape[:2], s, padding)
    y, vjp = jax.vjp(lambda x, w: _reference(x, w, stride, padding), x, w)
    dy = jnp.asarray(rng.randn(*y.shape), jnp.float32)
    dx, dw = vjp(dy)

    got_y = self.variant(lambda x, w: onednn_conv.forward(x, w, s, pads))(x, w)
    got_dx = self.variant(lambda dy, w: onednn_conv.input_grad(
        dy, w, x.shape, s, pads))(dy, w)
    got_dw = self.variant(lambda x, dy: onednn_conv.weight_grad(
        x, dy, w.shape[:2], s, pads))(x, dy)
    chex.assert_shape((got_y, got_dx, got_dw), (y.shape, x.shape, w.shape))
    _close(got_y, y, 'y')
    _close(got_dx, dx, 'dx')
    _close(got_dw, dw, 'dw')


class TestLocalShapes:
  """The `local` encoder's convolutions (a smaller batch)."""

  @pytest.mark.parametrize('size,cin,kernel,cout,stride', [
      (24, 3, 3, 16, 1), (24, 16, 3, 16, 1), (24, 16, 1, 32, 2),
      (24, 16, 3, 32, 2), (12, 32, 3, 64, 2), (6, 64, 1, 128, 2),
      (3, 128, 3, 128, 1)])
  @pytest.mark.parametrize('threads', [1, 2])
  def test_local_network_shapes(self, size, cin, kernel, cout, stride,
                                threads):
    # The `local` encoder's convolutions (a smaller batch), one OpenMP
    # thread per call as the network runs them, and two.
    rng = np.random.RandomState(size + cin)
    x = jnp.asarray(rng.randn(8, size, size, cin), jnp.float32)
    w = jnp.asarray(rng.randn(kernel, kernel, cin, cout), jnp.float32)
    s = (stride, stride)
    pads = onednn_conv.explicit_padding(x.shape[1:3], w.shape[:2], s, 'SAME')
    y, vjp = jax.vjp(lambda x, w: _reference(x, w, stride, 'SAME'), x, w)
    dy = jnp.asarray(rng.randn(*y.shape), jnp.float32)
    dx, dw = vjp(dy)
    f = jax.jit(lambda x, w, dy: (
        onednn_conv.forward(x, w, s, pads, threads),
        onednn_conv.input_grad(dy, w, x.shape, s, pads, threads),
        onednn_conv.weight_grad(x, dy, w.shape[:2], s, pads, threads)))
    got_y, got_dx, got_dw = f(x, w, dy)
    _close(got_y, y, 'y', atol=1e-5)
    _close(got_dx, dx, 'dx', atol=1e-5)
    _close(got_dw, dw, 'dw', atol=1e-5)


def test_conv2d_gradients_under_jit_trace_once():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(4, 12, 12, 8), jnp.float32)
  w = jnp.asarray(rng.randn(3, 3, 8, 16) * 0.1 + 0.05, jnp.float32)

  def loss(conv, x, w):
    # WS on top, as layers.WSConv2D uses it: the gradient reaches the raw
    # weight through the standardization.
    ws = layers.standardize_weight(w, axis=(0, 1, 2), eps=1e-10)
    return jnp.sum(jnp.sin(conv(x, ws)))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def grads(x, w):
    return jax.value_and_grad(
        lambda x, w: loss(lambda x, w: onednn_conv.conv2d(x, w, 2, 'SAME'),
                          x, w), (0, 1))(x, w)

  want = jax.value_and_grad(
      lambda x, w: loss(lambda x, w: _reference(x, w, 2, 'SAME'), x, w),
      (0, 1))(x, w)
  for _ in range(3):  # new values, same shapes: no new trace
    got = grads(x, w)
    x = x + 1.0
  got = grads(x - 3.0, w)
  chex.assert_trees_all_close(got[0], want[0], rtol=1e-5)
  _close(got[1][0], want[1][0], 'dx', atol=1e-5)
  _close(got[1][1], want[1][1], 'dw', atol=1e-5)


def _net(impl):
  return hk.transform_with_state(lambda x: networks.resnet(
      depth=18, blocks_per_group=(1, 1, 1, 1), width_multiplier=0.125,
      stem='small', norm='gn', num_groups=4, weight_standardization=True,
      conv_impl=impl)(x, True))


def test_switch_gives_the_same_network_and_gradients():
  """model.encoder.conv_impl='onednn': same parameters, outputs, gradients."""
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 3))
  plain, dnnl = _net('lax'), _net('onednn')
  params, state = jax.jit(plain.init)(jax.random.PRNGKey(1), x)
  dnnl_params, _ = jax.jit(dnnl.init)(jax.random.PRNGKey(1), x)
  chex.assert_trees_all_equal(dnnl_params, params)

  def loss(transformed, p):
    return jnp.sum(jnp.sin(transformed.apply(p, state, None, x)[0]))

  chex.assert_trees_all_close(jax.jit(lambda p: loss(dnnl, p))(params),
                              jax.jit(lambda p: loss(plain, p))(params),
                              rtol=1e-5, atol=0)
  g_plain = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
  g_dnnl = jax.jit(jax.grad(lambda p: loss(dnnl, p)))(params)
  chex.assert_trees_all_close(g_dnnl, g_plain, rtol=2e-4, atol=2e-5)


def test_conv_impl_names_and_the_older_switch():
  assert layers.conv_impl('', fast=False) == 'lax'
  assert layers.conv_impl('', fast=True) == 'fast_conv'
  assert layers.conv_impl('lax', fast=True) == 'lax'
  assert layers.conv_impl('onednn') == 'onednn'
  with pytest.raises(ValueError, match="unknown conv_impl 'mkl'"):
    layers.conv_impl('mkl')
  # The custom calls are float32 kernels: a bfloat16 network (and one on an
  # accelerator) gets XLA's own convolution.
  assert layers.conv_impl('onednn', dtype='bfloat16') == 'lax'


def _local_onednn():
  c = byol_config.get_config('local')
  c.unlock()
  c.model.encoder.conv_impl = 'onednn'
  c.lock()
  return c


def test_unbuilt_library_is_a_config_error(monkeypatch):
  # Where the library is not built the project still imports; asking for
  # it is bad input (main.py: one `error:` line, exit status 2).
  monkeypatch.setattr(onednn_conv, 'unavailable_reason',
                      lambda: '/x/libbyol_onednn_conv.so is not built')
  with pytest.raises(ConfigError, match="model.encoder: conv_impl 'onednn' "
                     'cannot be used: /x/libbyol_onednn_conv.so is not built'):
    model.Network(_local_onednn(), axis_name=None).check()
  c = ml_collections.ConfigDict(_local_onednn().to_dict())
  c.model.encoder.conv_impl = 'lax'
  model.Network(c, axis_name=None).check()


def test_library_is_rebuilt_when_its_inputs_change(tmp_path, monkeypatch):
  stamp = build_onednn.current_stamp()
  assert stamp['source_sha256'] and stamp['jaxlib'] == jax.__version__
  monkeypatch.setattr(build_onednn, 'LIBRARY', str(tmp_path / 'lib.so'))
  monkeypatch.setattr(build_onednn, 'STAMP', str(tmp_path / 'stamp.json'))
  assert not build_onednn.up_to_date()  # no library
  (tmp_path / 'lib.so').write_bytes(b'')
  for changed in ({}, dict(stamp, jaxlib='0.0.1'),
                  dict(stamp, source_sha256='0' * 64)):
    (tmp_path / 'stamp.json').write_text(json.dumps(changed))
    assert not build_onednn.up_to_date(), changed
  (tmp_path / 'stamp.json').write_text(json.dumps(stamp))
  assert build_onednn.up_to_date()
  assert os.path.getsize(build_onednn.LIBRARY) == 0  # nothing was rebuilt
