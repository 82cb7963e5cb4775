"""Tests of byol.diagnostics: proj_std and the effective rank (RankMe)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol import diagnostics


def test_effective_rank_of_identical_rows_is_one():
  z = np.tile(np.random.RandomState(0).randn(1, 32), (100, 1))
  assert diagnostics.effective_rank(z) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize('k', [1, 5, 32])
def test_effective_rank_counts_equal_directions(k):
  # k orthonormal directions with equal weight: singular values all equal.
  q, _ = np.linalg.qr(np.random.RandomState(1).randn(64, 64))
  z = np.concatenate([q[:k]] * 4, 0) * 3.0  # 4k rows spanning k directions
  assert diagnostics.effective_rank(z) == pytest.approx(k, rel=1e-4)


def test_effective_rank_is_between_one_and_min_dim():
  z = np.random.RandomState(2).randn(50, 20) ** 3
  r = diagnostics.effective_rank(z)
  assert 1.0 < r < 20.0


def test_proj_std_of_isotropic_gaussian_is_one_over_sqrt_d():
  z = jax.random.normal(jax.random.PRNGKey(0), (8192, 64))
  assert float(diagnostics.proj_std(z)) == pytest.approx(1 / 8.0, rel=0.02)


def test_proj_std_of_collapsed_features_is_zero():
  z = jnp.tile(jnp.arange(1.0, 17.0)[None], (64, 1))
  # sqrt of a rounding-level variance: ~1e-4, against 1/sqrt(16) = 0.25 healthy.
  assert float(diagnostics.proj_std(z)) < 1e-3


def test_proj_std_under_pmap_equals_the_whole_batch():
  n = jax.local_device_count()
  z = jax.random.normal(jax.random.PRNGKey(1), (n * 16, 8)) + 0.3
  whole = float(diagnostics.proj_std(z))
  split = jax.pmap(lambda x: diagnostics.proj_std(x, 'i'), axis_name='i')(
      z.reshape(n, 16, 8))
  chex.assert_trees_all_close(split, jnp.full((n,), whole), rtol=1e-5, atol=0)


class ProjStdVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_proj_std_equals_numpy(self):
    z = np.random.RandomState(3).randn(32, 8).astype(np.float32) + 0.5
    value = self.variant(diagnostics.proj_std)(jnp.asarray(z))
    unit = z / np.linalg.norm(z.astype(np.float64), axis=1, keepdims=True)
    chex.assert_shape(value, ())
    chex.assert_trees_all_close(value, unit.std(0).mean(), rtol=1e-5, atol=0)

  @chex.variants(with_pmap=True)
  def test_proj_std_over_the_pmap_axis(self):
    # Every device gets the same rows (chex's pmap variant): the pooled
    # statistics are those of one copy.
    z = np.random.RandomState(4).randn(16, 8).astype(np.float32)
    value = self.variant(lambda x: diagnostics.proj_std(x, 'i'))(
        jnp.asarray(z))
    chex.assert_trees_all_close(value, diagnostics.proj_std(jnp.asarray(z)),
                                rtol=1e-5, atol=0)


def test_rankme_of_gathered_diagnostics_features_is_the_whole_batchs():
  # RankMe is computed on the host in float64 from the features that
  # make_diagnostics_fn gathers over the devices: the gathered matrix is the
  # whole batch's, in order, so its RankMe is the unsharded one.
  import haiku as hk  # pylint: disable=g-import-not-at-top
  n = jax.local_device_count()
  forward = hk.transform_with_state(
      lambda x, is_training: {'projection': jnp.tanh(x @ jnp.ones((6, 4))),
                              'embedding': x})
  x = np.random.RandomState(5).randn(n * 8, 6).astype(np.float32)
  fn = jax.pmap(diagnostics.make_diagnostics_fn(forward, 'i'), axis_name='i',
                in_axes=(None, None, 0))
  out = fn({}, {}, x.reshape(n, 8, 6))
  chex.assert_shape(out['embedding'], (n, n * 8, 6))
  chex.assert_trees_all_close(out['embedding'][0], x, atol=0, rtol=0)
  chex.assert_trees_all_close(out['embedding'][-1], x, atol=0, rtol=0)
  assert diagnostics.effective_rank(out['embedding'][0]) == pytest.approx(
      diagnostics.effective_rank(x), rel=1e-6)
  assert 5.0 < diagnostics.effective_rank(x) <= 6.0
