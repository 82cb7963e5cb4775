"""Tests of byol.diagnostics: proj_std and the effective rank (RankMe)."""

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
  np.testing.assert_allclose(np.asarray(split), whole, rtol=1e-5)
