"""Tests of byol.losses: BYOL regression loss and SimCLR NT-Xent."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol import losses


def _nt_xent_reference(z1, z2, temperature):
  """NT-Xent written out anchor by anchor in NumPy (float64)."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n = len(z1)
  total = 0.
  for a in range(2 * n):
    positive = (a + n) % (2 * n)
    logits = np.array([z[a] @ z[c] / temperature for c in range(2 * n)
                       if c != a])
    candidates = [c for c in range(2 * n) if c != a]
    log_norm = np.log(np.sum(np.exp(logits)))
    total += log_norm - logits[candidates.index(positive)]
  return total / (2 * n)


@pytest.mark.parametrize('x,y,expected', [
    pytest.param([1., 0.], [0., 1.], 2., id='orthogonal'),
    pytest.param([1., 0.], [-2., 0.], 4., id='opposite'),
    pytest.param([3., 4.], [0.3, 0.4], 0., id='same_direction'),
    pytest.param([1., 0.], [0.5, np.sqrt(3) / 2], 1., id='sixty_degrees'),
])
def test_known_vectors(x, y, expected):
  value = losses.regression_loss(jnp.array([x]), jnp.array([y]))
  chex.assert_shape(value, (1,))
  chex.assert_trees_all_close(value, jnp.array([expected]), atol=1e-6, rtol=0)


def test_per_example_shape_and_batch_values():
  x = jnp.array([[1., 0.], [1., 0.], [0., 2.]])
  y = jnp.array([[0., 1.], [-1., 0.], [0., 5.]])
  chex.assert_trees_all_close(losses.regression_loss(x, y),
                              jnp.array([2., 4., 0.]), atol=1e-6, rtol=0)


def test_zero_vector_is_finite():
  x = jnp.zeros((1, 3))
  y = jnp.array([[1., 2., 2.]])
  value, grad = jax.value_and_grad(
      lambda x: losses.regression_loss(x, y).sum())(x)
  # A zero prediction is normalised to zero: distance to a unit vector is 1.
  chex.assert_trees_all_close(value, jnp.float32(1.), atol=1e-6, rtol=0)
  chex.assert_tree_all_finite(grad)


def test_symmetrised_value():
  p1 = jnp.array([[1., 0.], [0., 1.]])
  p2 = jnp.array([[0., 1.], [0., 1.]])
  z1 = jnp.array([[-1., 0.], [0., 1.]])
  z2 = jnp.array([[0., 3.], [1., 0.]])
  # Example 0: reg(p1, z2) = 2, reg(p2, z1) = 2; example 1: 2 and 0.
  chex.assert_trees_all_close(losses.byol_loss(p1, p2, z1, z2),
                              jnp.float32(3.), atol=1e-6, rtol=0)


def test_gradient_reaches_predictions_not_targets():
  rng = np.random.default_rng(0)
  p1, p2, z1, z2 = (jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
                    for _ in range(4))
  grads = jax.grad(losses.byol_loss, argnums=(0, 1, 2, 3))(p1, p2, z1, z2)
  assert float(jnp.abs(grads[0]).sum()) > 1e-3
  assert float(jnp.abs(grads[1]).sum()) > 1e-3
  assert float(jnp.abs(grads[2]).sum()) == 0.
  assert float(jnp.abs(grads[3]).sum()) == 0.


@pytest.mark.parametrize('temperature', [0.1, 0.5])
def test_matches_numpy_reference(temperature):
  rng = np.random.default_rng(1)
  z1 = rng.standard_normal((6, 5)).astype(np.float32)
  z2 = rng.standard_normal((6, 5)).astype(np.float32)
  value = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2),
                         temperature=temperature)
  chex.assert_trees_all_close(value, _nt_xent_reference(z1, z2, temperature),
                              rtol=1e-5, atol=0)


def test_identical_views_far_apart_give_small_loss():
  # Orthogonal examples, both views equal: each anchor's positive has logit
  # 1/t = 10 and every negative 0; loss = log(1 + (2n - 2) e^-10).
  z = jnp.eye(4)
  expected = np.log1p(6 * np.exp(-10.))
  chex.assert_trees_all_close(losses.nt_xent(z, z, 0.1), expected, atol=1e-6,
                              rtol=0)


def test_pmapped_equals_unsharded():
  devices = 2
  if jax.local_device_count() < devices:
    pytest.skip('needs XLA_FLAGS=--xla_force_host_platform_device_count>=2')
  rng = np.random.default_rng(2)
  z1 = rng.standard_normal((8, 5)).astype(np.float32)
  z2 = rng.standard_normal((8, 5)).astype(np.float32)
  full = losses.nt_xent(jnp.asarray(z1), jnp.asarray(z2), 0.1)

  def sharded_loss(a, b):
    return jax.lax.pmean(losses.nt_xent(a, b, 0.1, axis_name='i'), 'i')

  per_device = jax.pmap(sharded_loss, axis_name='i',
                        devices=jax.local_devices()[:devices])(
                            z1.reshape(devices, 4, 5),
                            z2.reshape(devices, 4, 5))
  chex.assert_trees_all_close(per_device, jnp.stack([full] * devices),
                              rtol=1e-5, atol=0)
  # Against the reference too, so that both paths are pinned to a number.
  chex.assert_trees_all_close(full, _nt_xent_reference(z1, z2, 0.1),
                              rtol=1e-5, atol=0)


def test_pmean_of_pmapped_param_grads_equals_unsharded_grad():
  # The training step differentiates each device's loss and pmeans the
  # gradients; through all_gather's transpose this must equal the gradient
  # of the loss of the whole batch.
  devices = 2
  if jax.local_device_count() < devices:
    pytest.skip('needs XLA_FLAGS=--xla_force_host_platform_device_count>=2')
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)
  x1 = rng.standard_normal((8, 3)).astype(np.float32)
  x2 = rng.standard_normal((8, 3)).astype(np.float32)

  def loss(w, a, b, axis_name=None):
    return losses.nt_xent(a @ w, b @ w, 0.1, axis_name=axis_name)

  full_grad = jax.grad(loss)(w, x1, x2)

  def device_grad(w, a, b):
    return jax.lax.pmean(jax.grad(loss)(w, a, b, axis_name='i'), 'i')

  grads = jax.pmap(device_grad, axis_name='i', in_axes=(None, 0, 0),
                   devices=jax.local_devices()[:devices])(
                       w, x1.reshape(devices, 4, 3),
                       x2.reshape(devices, 4, 3))
  assert float(jnp.abs(full_grad).max()) > 1e-2
  chex.assert_trees_all_close(grads[0], full_grad, rtol=1e-4, atol=1e-6)




def _views(seed, batch=8, dim=5):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((batch, dim)), jnp.float32)
          for _ in range(4)]


class LossVariantsTest(chex.TestCase):
  """The losses under jit and pmap equal their plain form (and a number)."""

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_byol_loss(self):
    p1, p2, z1, z2 = _views(4)
    value = self.variant(losses.byol_loss)(p1, p2, z1, z2)
    chex.assert_shape(value, ())
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
    expected = np.mean(
        np.sum((unit(np.asarray(p1, np.float64)) - unit(np.asarray(z2)))**2, 1) +
        np.sum((unit(np.asarray(p2, np.float64)) - unit(np.asarray(z1)))**2, 1))
    chex.assert_trees_all_close(value, expected, rtol=1e-5, atol=0)

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_regression_loss(self):
    x, y, _, _ = _views(5)
    value = self.variant(losses.regression_loss)(x, y)
    chex.assert_shape(value, (8,))
    cos = np.sum(np.asarray(x, np.float64) * np.asarray(y), 1) / (
        np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    chex.assert_trees_all_close(value, 2. - 2. * cos, rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_nt_xent(self):
    z1, z2, _, _ = _views(6)
    value = self.variant(lambda a, b: losses.nt_xent(a, b, 0.2))(z1, z2)
    chex.assert_trees_all_close(
        value, _nt_xent_reference(np.asarray(z1), np.asarray(z2), 0.2),
        rtol=1e-5, atol=0)

  @chex.variants(with_pmap=True)
  def test_nt_xent_over_the_pmap_axis_is_the_whole_batch(self):
    # chex's pmap variant hands every device the same examples: the global
    # batch is the local one repeated once per device.
    z1, z2, _, _ = _views(7, batch=2)
    n = jax.device_count()
    value = self.variant(lambda a, b: losses.nt_xent(a, b, 0.5,
                                                     axis_name='i'))(z1, z2)
    repeated = [np.tile(np.asarray(z), (n, 1)) for z in (z1, z2)]
    chex.assert_trees_all_close(value, _nt_xent_reference(*repeated, 0.5),
                                rtol=1e-5, atol=0)


@pytest.mark.parametrize('shapes', [
    pytest.param(((4, 8), (8,)), id='target_without_batch'),
    pytest.param(((4, 8), (4, 6)), id='other_width'),
])
def test_mismatched_loss_inputs_fail_while_tracing(shapes):
  a, b = (jnp.zeros(s) for s in shapes)
  with pytest.raises(AssertionError, match='assert_equal_shape'):
    jax.jit(losses.regression_loss).lower(a, b)
  with pytest.raises(AssertionError):
    jax.jit(losses.byol_loss).lower(a, a, b, b)
  with pytest.raises(AssertionError):
    jax.jit(losses.nt_xent).lower(a, b)
