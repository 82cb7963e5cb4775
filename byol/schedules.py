"""Learning-rate and target-EMA schedules, as functions of the global step.

Both are plain `jnp` functions of the step, so they can be traced inside a
`jit`/`pmap` update step (where the step lives on device as part of the
training state) or evaluated on the host for logging.
"""

import jax.numpy as jnp


def _cosine_decay(step, decay_steps):
  """Goes from 1 at step 0 to 0 at `decay_steps`, then stays at 0."""
  decay_steps = max(int(decay_steps), 1)
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / decay_steps, 0., 1.)
  return 0.5 * (1. + jnp.cos(jnp.pi * progress))


def learning_rate(step, *, base_lr, batch_size, total_steps, warmup_steps):
  """BYOL's learning rate: linear warmup from 0, then cosine decay to 0.

  The peak is `base_lr * batch_size / 256` (the linear scaling rule), reached
  at `warmup_steps`; it decays along a half cosine to 0 at `total_steps`.

  Args:
    step: the global step (a Python int or an integer array).
    base_lr: learning rate for a batch of 256.
    batch_size: the global batch size (all devices, all processes).
    total_steps: length of training in steps.
    warmup_steps: length of the linear warmup in steps (0 for none).

  Returns:
    The learning rate at `step`, a float32 scalar array.
  """
  peak = base_lr * batch_size / 256.
  step = jnp.asarray(step, jnp.float32)
  warmup_steps = int(warmup_steps)
  if warmup_steps > 0:
    warm = peak * step / warmup_steps
  else:
    warm = jnp.asarray(peak, jnp.float32)
  cosine = peak * _cosine_decay(step - warmup_steps,
                                total_steps - warmup_steps)
  return jnp.where(step < warmup_steps, warm, cosine)


def learning_rate_schedule(*, base_lr, batch_size, total_steps, warmup_steps):
  """`learning_rate` as an optax schedule `fn(count) -> lr`.

  The optimizer reads the schedule from its own update counter, so it is built
  once for the whole run.
  """
  def schedule(count):
    return learning_rate(count, base_lr=base_lr, batch_size=batch_size,
                         total_steps=total_steps, warmup_steps=warmup_steps)
  return schedule


def target_ema(step, *, base_ema, total_steps):
  """BYOL's target decay rate tau: from `base_ema` up to 1 along a cosine.

  tau_k = 1 - (1 - base_ema) * (cos(pi * k / K) + 1) / 2, held at 1 after K.

  Args:
    step: the global step k.
    base_ema: tau at step 0.
    total_steps: K, the length of training in steps.

  Returns:
    tau at `step`, a float32 scalar array.
  """
  return 1. - (1. - base_ema) * _cosine_decay(step, total_steps)

