"""Tests of byol.schedules: warmup + cosine learning rate, EMA tau."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol import schedules

# Peak = 0.2 * 512 / 256 = 0.4, warmup 10 steps, cosine over steps 10..110.
_LR = dict(base_lr=0.2, batch_size=512, total_steps=110, warmup_steps=10)


@pytest.mark.parametrize('step,expected', [
    pytest.param(0, 0., id='start'),
    pytest.param(5, 0.2, id='mid_warmup'),
    pytest.param(10, 0.4, id='end_of_warmup'),
    pytest.param(35, 0.2 * (1 + np.cos(np.pi / 4)), id='quarter_cosine'),
    pytest.param(60, 0.2, id='mid_cosine'),
    pytest.param(110, 0., id='end'),
    pytest.param(200, 0., id='after_end'),
])
def test_learning_rate_values(step, expected):
  np.testing.assert_allclose(schedules.learning_rate(step, **_LR), expected,
                             atol=1e-6)


def test_optax_schedule_is_jittable_and_equal():
  schedule = schedules.learning_rate_schedule(**_LR)
  steps = jnp.arange(0, 111, 5)
  values = jax.jit(jax.vmap(schedule))(steps)
  expected = [schedules.learning_rate(int(s), **_LR) for s in steps]
  chex.assert_trees_all_close(values, jnp.stack(expected), atol=1e-6, rtol=0)
  # Monotone up during warmup, monotone down afterwards.
  assert np.all(np.diff(values[:3]) > 0)
  assert np.all(np.diff(values[2:]) <= 0)


def test_no_warmup_starts_at_peak():
  lr = schedules.learning_rate(0, base_lr=0.3, batch_size=256,
                               total_steps=100, warmup_steps=0)
  np.testing.assert_allclose(lr, 0.3, atol=1e-7)


@pytest.mark.parametrize('step,expected', [
    pytest.param(0, 0.99, id='start'),
    pytest.param(25, 1 - 0.01 * (np.cos(np.pi / 4) + 1) / 2, id='quarter'),
    pytest.param(50, 0.995, id='mid'),
    pytest.param(100, 1., id='end'),
    pytest.param(150, 1., id='after_end'),
])
def test_target_ema_values(step, expected):
  np.testing.assert_allclose(
      schedules.target_ema(step, base_ema=0.99, total_steps=100), expected,
      atol=1e-7)




class ScheduleVariantsTest(chex.TestCase):
  """Both schedules traced (jit, pmap) give their plain values."""

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_learning_rate(self):
    schedule = self.variant(schedules.learning_rate_schedule(**_LR))
    for step, expected in ((0, 0.), (5, 0.2), (35, 0.2 * (1 + np.cos(np.pi / 4))),
                           (110, 0.)):
      value = schedule(jnp.int32(step))
      chex.assert_shape(value, ())
      chex.assert_type(value, jnp.float32)
      chex.assert_trees_all_close(value, expected, atol=1e-6, rtol=0)

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_target_ema(self):
    tau = self.variant(lambda step: schedules.target_ema(
        step, base_ema=0.99, total_steps=100))
    chex.assert_trees_all_close(
        [tau(jnp.int32(s)) for s in (0, 25, 50, 100)],
        [0.99, 1 - 0.01 * (np.cos(np.pi / 4) + 1) / 2, 0.995, 1.],
        atol=1e-7, rtol=0)
