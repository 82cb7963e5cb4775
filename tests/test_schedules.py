"""Tests of byol.schedules: warmup + cosine learning rate, EMA tau."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from byol import schedules

# Peak = 0.2 * 512 / 256 = 0.4, warmup 10 steps, cosine over steps 10..110.
_LR = dict(base_lr=0.2, batch_size=512, total_steps=110, warmup_steps=10)


class LearningRateTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('start', 0, 0.),
      ('mid_warmup', 5, 0.2),
      ('end_of_warmup', 10, 0.4),
      ('quarter_cosine', 35, 0.2 * (1 + np.cos(np.pi / 4))),
      ('mid_cosine', 60, 0.2),
      ('end', 110, 0.),
      ('after_end', 200, 0.),
  )
  def test_values(self, step, expected):
    np.testing.assert_allclose(schedules.learning_rate(step, **_LR), expected,
                               atol=1e-6)

  def test_optax_schedule_is_jittable_and_equal(self):
    schedule = schedules.learning_rate_schedule(**_LR)
    steps = jnp.arange(0, 111, 5)
    values = jax.jit(jax.vmap(schedule))(steps)
    expected = [schedules.learning_rate(int(s), **_LR) for s in steps]
    np.testing.assert_allclose(values, expected, atol=1e-6)
    # Monotone up during warmup, monotone down afterwards.
    self.assertTrue(np.all(np.diff(values[:3]) > 0))
    self.assertTrue(np.all(np.diff(values[2:]) <= 0))

  def test_no_warmup_starts_at_peak(self):
    lr = schedules.learning_rate(0, base_lr=0.3, batch_size=256,
                                 total_steps=100, warmup_steps=0)
    np.testing.assert_allclose(lr, 0.3, atol=1e-7)


class TargetEmaTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('start', 0, 0.99),
      ('quarter', 25, 1 - 0.01 * (np.cos(np.pi / 4) + 1) / 2),
      ('mid', 50, 0.995),
      ('end', 100, 1.),
      ('after_end', 150, 1.),
  )
  def test_values(self, step, expected):
    np.testing.assert_allclose(
        schedules.target_ema(step, base_ema=0.99, total_steps=100), expected,
        atol=1e-7)


if __name__ == '__main__':
  absltest.main()
