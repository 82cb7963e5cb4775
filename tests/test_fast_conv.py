"""Tests of byol.fast_conv: the same function and gradients as lax.conv."""

import itertools

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol import fast_conv
from byol import layers
from byol import networks

DN = ('NHWC', 'HWIO', 'NHWC')


def _reference(x, w, stride, padding):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                      dimension_numbers=DN)


def _loss(conv, x, w, probe):
  # A non-linear read-out, so that the output gradient differs per element.
  return jnp.sum(jnp.sin(conv(x, w)) * probe)


def _conv_cases():
  for kernel, stride, padding in itertools.product(
      (1, 3, 7), (1, 2), ('SAME', 'VALID')):
    yield pytest.param(kernel, stride, padding,
                       id=f'k{kernel}_s{stride}_{padding.lower()}')
  # Explicit, asymmetric padding, as a tuple of pairs.
  yield pytest.param(3, 2, ((1, 0), (2, 1)), id='k3_s2_explicit')


@pytest.mark.parametrize('kernel,stride,padding', list(_conv_cases()))
def test_forward_and_gradients_equal_lax_conv(kernel, stride, padding):
  rng = np.random.RandomState(kernel * 10 + stride)
  # Odd spatial size: SAME pads unevenly at stride 2.
  x = jnp.asarray(rng.randn(3, 13, 11, 5), jnp.float32)
  w = jnp.asarray(rng.randn(kernel, kernel, 5, 6), jnp.float32)
  ref_out = _reference(x, w, stride, padding)
  out = fast_conv.conv2d(x, w, stride, padding)
  chex.assert_trees_all_equal(out, ref_out)
  probe = jnp.asarray(rng.randn(*ref_out.shape), jnp.float32)

  ref_grads = jax.grad(_loss, (1, 2))(
      lambda x, w: _reference(x, w, stride, padding), x, w, probe)
  grads = jax.jit(jax.grad(_loss, (1, 2)), static_argnums=0)(
      lambda x, w: fast_conv.conv2d(x, w, stride, padding), x, w, probe)
  for name, got, want in zip(('dx', 'dw'), grads, ref_grads):
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 0.1, name
    # float32 rounding of sums of a few hundred terms, relative to the
    # largest entry; a wrong tap, stride or padding is off by O(1).
    chex.assert_trees_all_close(got / scale, want / scale, atol=2e-6,
                                rtol=1e-7, custom_message=name)


def test_weight_standardized_gradient_reaches_raw_weight():
  # WS on top, as layers.WSConv2D uses it: the gradient flows through
  # the standardization to the raw weight.
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(4, 12, 12, 8), jnp.float32)
  w = jnp.asarray(rng.randn(3, 3, 8, 16) * 0.1 + 0.05, jnp.float32)

  def loss(conv, w):
    ws = layers.standardize_weight(w, axis=(0, 1, 2), eps=1e-10)
    return jnp.sum(jnp.square(jax.nn.relu(conv(x, ws))))

  want = jax.grad(loss, 1)(lambda x, w: _reference(x, w, 2, 'SAME'), w)
  got = jax.grad(loss, 1)(lambda x, w: fast_conv.conv2d(x, w, 2, 'SAME'), w)
  scale = float(jnp.max(jnp.abs(want)))
  assert scale > 1e-3
  chex.assert_trees_all_close(got / scale, want / scale, atol=5e-6, rtol=1e-7)
  # The standardization's gradient is orthogonal to a constant shift of
  # each output's kernel: its sum over (h, w, in) is ~0 for every output.
  chex.assert_trees_all_close(jnp.sum(got, axis=(0, 1, 2)) / scale, 0.,
                              atol=1e-4, rtol=1e-7)


@pytest.mark.parametrize('kernel,stride', [
    pytest.param(3, 1, id='k3_s1'),
    pytest.param(3, 2, id='k3_s2'),
    pytest.param(1, 2, id='k1_s2'),
])
def test_gradients_over_chunks_of_the_batch(kernel, stride):
  # 48 examples: the weight gradient is summed over 3 chunks of 16.
  num_chunks = fast_conv._num_chunks  # pylint: disable=protected-access
  assert num_chunks(48, 16) == 3
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(48, 8, 8, 4), jnp.float32)
  w = jnp.asarray(rng.randn(kernel, kernel, 4, 8), jnp.float32)
  probe = jnp.asarray(
      rng.randn(*_reference(x, w, stride, 'SAME').shape), jnp.float32)
  want = jax.grad(_loss, 2)(
      lambda x, w: _reference(x, w, stride, 'SAME'), x, w, probe)
  got = jax.grad(_loss, 2)(
      lambda x, w: fast_conv.conv2d(x, w, stride, 'SAME'), x, w, probe)
  scale = float(jnp.max(jnp.abs(want)))
  chex.assert_trees_all_close(got / scale, want / scale, atol=2e-6, rtol=1e-7)
  # One chunk alone is a third of the gradient, far from the sum.
  one = fast_conv.chunked_weight_gradient(
      x[:16], jnp.cos(_reference(x[:16], w, stride, 'SAME')) * probe[:16],
      (kernel, kernel), (stride, stride), 'SAME')
  assert float(jnp.max(jnp.abs(one - want))) / scale > 0.1


def test_number_of_chunks():
  num_chunks = fast_conv._num_chunks  # pylint: disable=protected-access
  assert num_chunks(512, 16) == 32
  assert num_chunks(256, 16) == 16
  assert num_chunks(24, 16) == 1
  assert num_chunks(100, 16) == 5  # 5 chunks of 20
  assert num_chunks(7, 16) == 1


def test_pointwise_weight_gradient_matches_a_loop():
  rng = np.random.RandomState(2)
  x = rng.randn(2, 6, 6, 3).astype(np.float32)
  dy = rng.randn(2, 3, 3, 4).astype(np.float32)
  got = fast_conv.pointwise_weight_gradient(x, dy, (2, 2), 'SAME')
  want = np.zeros((3, 4), np.float64)
  for n, i, j in itertools.product(range(2), range(3), range(3)):
    want += np.outer(x[n, 2 * i, 2 * j], dy[n, i, j])
  np.testing.assert_allclose(got[0, 0], want, rtol=1e-5, atol=1e-5)


def test_fast_conv_switch_gives_the_same_network_and_gradients():
  """model.encoder.fast_conv: the same parameters, outputs and gradients."""

  def net(fast):
    return hk.transform_with_state(lambda x: networks.resnet(
        depth=18, blocks_per_group=(1, 1, 1, 1), width_multiplier=0.125,
        stem='small', norm='gn', num_groups=4, weight_standardization=True,
        fast_conv=fast)(x, True))

  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 16, 16, 3))
  plain, fast = net(False), net(True)
  # Jitted: op by op, every primitive of the two nets and their gradients
  # would be compiled on its own (several times the CPU of one program each).
  params, state = jax.jit(plain.init)(jax.random.PRNGKey(1), x)
  fast_params, _ = jax.jit(fast.init)(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(params) == jax.tree.structure(fast_params)

  def loss(transformed, p):
    return jnp.sum(jnp.sin(transformed.apply(p, state, None, x)[0]))

  chex.assert_trees_all_close(jax.jit(lambda p: loss(fast, p))(params),
                              jax.jit(lambda p: loss(plain, p))(params),
                              rtol=1e-5, atol=0)
  g_plain = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
  g_fast = jax.jit(jax.grad(lambda p: loss(fast, p)))(params)
  chex.assert_trees_all_close(g_fast, g_plain, rtol=2e-4, atol=2e-5)
