"""Losses: BYOL's normalised regression loss and SimCLR's NT-Xent."""

import chex
import jax
import jax.numpy as jnp

# Added to the logits of an anchor with itself so that it never counts as a
# candidate; large but finite so that the softmax stays NaN-free.
_SELF_LOGIT_OFFSET = 1e9


def l2_normalize(x, axis=-1, eps=1e-12):
  """Scales `x` to unit L2 norm along `axis`.

  The squared norm is clamped at `eps` inside the rsqrt, so a zero vector maps
  to zero (with finite gradients) instead of NaN.
  """
  squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps))


def regression_loss(x, y, eps=1e-12):
  """BYOL's per-example loss: squared distance of the L2-normalised vectors.

  For unit vectors ||x - y||^2 = 2 - 2 cos(x, y), so the loss lies in [0, 4].

  Args:
    x: predictions, shape [..., D].
    y: targets, same shape as `x`.
    eps: clamp of the squared norms (see `l2_normalize`).

  Returns:
    The loss per example, shape [...] (e.g. [B]).
  """
  # Checked while tracing (free under jit): broadcasting a [B, D] against a
  # [D] or [1, D] target would give a loss, just not this one.
  chex.assert_equal_shape([x, y])
  x = l2_normalize(x, axis=-1, eps=eps)
  y = l2_normalize(y, axis=-1, eps=eps)
  return jnp.sum(jnp.square(x - y), axis=-1)


def byol_loss(online_pred_view1, online_pred_view2,
              target_proj_view1, target_proj_view2):
  """Symmetrised BYOL loss, averaged over the batch.

  The online prediction of each view regresses the target projection of the
  other view; the two directions are summed.

  Args:
    online_pred_view1: online predictor output for view 1, [B, D].
    online_pred_view2: online predictor output for view 2, [B, D].
    target_proj_view1: target projector output for view 1, [B, D].
    target_proj_view2: target projector output for view 2, [B, D].

  Returns:
    A scalar.
  """
  # The target network is only ever moved by the EMA of the online weights,
  # never by this loss: without the stop_gradient, the gradient would also
  # pull the targets towards the predictions, which is the shortcut to a
  # collapsed (constant) representation that BYOL's asymmetry avoids. The
  # caller may already have stopped it; doing it here makes the loss safe on
  # its own.
  chex.assert_rank(online_pred_view1, 2)
  chex.assert_equal_shape([online_pred_view1, online_pred_view2,
                           target_proj_view1, target_proj_view2])
  target_proj_view1 = jax.lax.stop_gradient(target_proj_view1)
  target_proj_view2 = jax.lax.stop_gradient(target_proj_view2)
  loss = (regression_loss(online_pred_view1, target_proj_view2) +
          regression_loss(online_pred_view2, target_proj_view1))
  return jnp.mean(loss)


def nt_xent(z1, z2, temperature=0.1, axis_name=None):
  """SimCLR's NT-Xent loss over the global batch, symmetric in the views.

  Every one of the 2N views in the global batch is an anchor; its positive is
  the other view of the same example and its negatives are the other 2N - 2
  views. Logits are cosine similarities divided by `temperature`.

  Under `pmap`, pass `axis_name`: the projections of all devices are gathered
  so that negatives come from the whole global batch, and this device's
  examples are the anchors. With equal per-device batches, the `pmean` of the
  returned per-device losses equals the loss of the unsharded global batch.

  Args:
    z1: projections of view 1 of the local examples, [B, D].
    z2: projections of view 2, [B, D].
    temperature: softmax temperature.
    axis_name: the pmap axis over which the batch is sharded, or None.

  Returns:
    The mean over this device's 2B anchors, a scalar.
  """
  chex.assert_rank(z1, 2)
  chex.assert_equal_shape([z1, z2])
  z1 = l2_normalize(z1)
  z2 = l2_normalize(z2)
  batch = z1.shape[0]
  if axis_name is None:
    all_z1, all_z2 = z1, z2
    offset = 0
  else:
    # Gradients flow through the gathered copies too: every device's loss
    # depends on every example, as in the unsharded computation.
    all_z1 = jax.lax.all_gather(z1, axis_name, tiled=True)
    all_z2 = jax.lax.all_gather(z2, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * batch
  global_batch = all_z1.shape[0]
  candidates = jnp.concatenate([all_z1, all_z2], axis=0)  # [2N, D]

  # Global index of each local example.
  rows = offset + jnp.arange(batch)
  # The columns of an anchor are the 2N views; its own column is masked out.
  self_mask = jax.nn.one_hot(rows, 2 * global_batch) * _SELF_LOGIT_OFFSET
  logits1 = z1 @ candidates.T / temperature - self_mask
  logits2 = z2 @ candidates.T / temperature - jnp.roll(
      self_mask, global_batch, axis=1)
  # View 1 of example i has its positive in column N + i, view 2 in column i.
  positive1 = jnp.take_along_axis(
      logits1, (rows + global_batch)[:, None], axis=1)[:, 0]
  positive2 = jnp.take_along_axis(logits2, rows[:, None], axis=1)[:, 0]
  loss1 = jax.nn.logsumexp(logits1, axis=1) - positive1
  loss2 = jax.nn.logsumexp(logits2, axis=1) - positive2
  return 0.5 * (jnp.mean(loss1) + jnp.mean(loss2))
