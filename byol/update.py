"""The pure pretraining update step and the optimizer it applies.

`make_update_fn` returns `update(state, inputs, rng) -> (state, scalars)`, a
pure function run under `jax.pmap(axis_name=devices.AXIS)` (or `jax.jit` on
one device). It reads as accumulate -> pmean -> LARS -> EMA -> logs, and its
parts are named, module-level functions, each testable alone: `loss_fn` (one
micro-batch's loss), `views_forward` (both views through a network),
`example_keys` (per-example augmentation keys), `micro_step` (the
`lax.scan` body), `accumulate_gradients` and `ema`. `state` is an
`experiment.TrainState`.
"""

import functools
from typing import Callable, Optional

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import optax

from byol import augmentations
from byol import devices
from byol import diagnostics
from byol import losses
from byol import model
from byol import optimizers
from byol import schedules


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   warmup: int) -> optax.GradientTransformation:
  """LARS with the run's schedule, masks and per-component rate multiplier."""
  t = config.training
  lr = schedules.learning_rate_schedule(
      base_lr=t.base_lr, batch_size=t.batch_size, total_steps=total_steps,
      warmup_steps=warmup)
  dm_rule = optimizers.exclude_bias_and_norm
  optimizer = optimizers.lars(
      lr, weight_decay=t.weight_decay, eta=t.lars_eta, momentum=t.momentum,
      weight_decay_mask_fn=(optimizers.include_all
                            if t.weight_decay_on_norm_and_bias else dm_rule),
      trust_ratio_mask_fn=(optimizers.include_all
                           if t.trust_ratio_on_norm_and_bias else dm_rule),
      lr_multiplier=t.predictor_lr_multiplier,
      lr_multiplier_where=lambda path: "'predictor/" in path)
  return optimizer


def views_forward(forward: hk.TransformedWithState, params, state, rng,
                  view1, view2, *, one_pass: bool, images_per_pass: int = 0):
  """Both views through a network: (out1, out2, new state).

  With `one_pass` (no batch statistics anywhere) the two views go through as
  one batch of 2B, which gives the same outputs; `images_per_pass` > 0 splits
  that batch into consecutive passes of at most that many images (the same
  function; on XLA:CPU smaller passes keep activations in cache).
  """
  if one_pass:
    both = jnp.concatenate([view1, view2], axis=0)
    total = both.shape[0]
    size = images_per_pass if 0 < images_per_pass < total else total
    outs = []
    for start in range(0, total, size):
      out, state = forward.apply(params, state, rng, both[start:start + size],
                                 True)
      outs.append(out)
    if len(outs) > 1:
      out = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outs)
    n = view1.shape[0]
    out1 = jax.tree.map(lambda x: x[:n], out)
    out2 = jax.tree.map(lambda x: x[n:], out)
  else:
    # BatchNorm: each view keeps its own batch statistics, as in BYOL.
    out1, state = forward.apply(params, state, rng, view1, True)
    out2, state = forward.apply(params, state, rng, view2, True)
  return out1, out2, state


def loss_fn(online_params, online_state, target_params, target_state, rng,
            inputs, *, forward: hk.TransformedWithState,
            config: ml_collections.ConfigDict, axis_name: Optional[str]):
  """The loss of one (micro-)batch of augmented views.

  Returns:
    (loss, (online_state, target_state, logs)); differentiate with respect to
    `online_params`. The loss is the representation loss (BYOL's regression
    or SimCLR's NT-Xent) plus the online classifier's cross-entropy.
  """
  view1, view2 = inputs['view1'], inputs['view2']
  labels = inputs['labels']
  one_pass = model.batch_independent(config)
  images_per_pass = config.training.images_per_pass
  out1, out2, online_state = views_forward(
      forward, online_params, online_state, rng, view1, view2,
      one_pass=one_pass, images_per_pass=images_per_pass)
  if config.method == 'byol':
    t1, t2, target_state = views_forward(
        forward, target_params, target_state, rng, view1, view2,
        one_pass=one_pass, images_per_pass=images_per_pass)
    # losses.byol_loss stops the gradient into the target projections.
    repr_loss = losses.byol_loss(out1['prediction'], out2['prediction'],
                                 t1['projection'], t2['projection'])
  else:
    repr_loss = losses.nt_xent(out1['projection'], out2['projection'],
                               temperature=config.training.temperature,
                               axis_name=axis_name)
  logits = out1['logits'].astype(jnp.float32)
  # Unlabelled images (label -1, e.g. STL-10's `unlabelled` split) neither
  # train the online classifier nor count in its accuracy.
  labelled = (labels >= 0).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(labelled), 1.0)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1])
  classif_loss = jnp.sum(
      optax.softmax_cross_entropy(logits, one_hot) * labelled) / count
  top1 = jnp.sum((jnp.argmax(logits, -1) == labels) * labelled) / count
  loss = repr_loss + classif_loss
  logs = dict(loss=loss, repr_loss=repr_loss, classif_loss=classif_loss,
              top1_accuracy=top1,
              proj_std=diagnostics.proj_std(out1['projection'], axis_name))
  return loss, (online_state, target_state, logs)


def example_keys(rng, micro, per_device: int, *, accum: int,
                 axis_name: Optional[str]):
  """One augmentation key per example of this device's micro-batch `micro`.

  Example keys are `fold_in(rng, g)`, g the example's index in the step's
  global batch laid out as [devices (of all processes), micro-batches,
  per-device batch] -- the layout in which the host feeds it. An example's
  augmentations therefore depend only on the step's key and its place in
  the global batch: splitting the same global batch over 1 or 4 devices, 1
  or 2 processes, or k micro-batches gives the same views.
  """
  device = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  first = (device * accum + micro) * per_device
  index = first + jnp.arange(per_device, dtype=jnp.int32)
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)


def micro_step(carry, xs, *, grad_fn: Callable, config,
               axis_name: Optional[str], augment: bool = True):
  """One micro-batch: augment, add its gradient to the sum.

  A `lax.scan` body: carry = (online_state, target_state, grads_sum,
  online_params, target_params), xs = (inputs, micro-batch index, rng).
  Without `augment` the views are taken as given. The network normalises
  them (`model.Network`).
  """
  online_state, target_state, grads_sum, params, target_params = carry
  inputs, micro, rng = xs
  aug_rng, fwd_rng = jax.random.split(rng)
  keys = example_keys(aug_rng, micro, inputs['view1'].shape[0],
                      accum=config.training.accumulation_steps,
                      axis_name=axis_name)
  fwd_rng = jax.random.fold_in(fwd_rng, micro)
  if augment:
    inputs = augmentations.postprocess(inputs, keys,
                                       config.data.augmentations)
  grads, (online_state, target_state, logs) = grad_fn(
      params, online_state, target_params, target_state, fwd_rng, inputs)
  grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
  return (online_state, target_state, grads_sum, params,
          target_params), logs


def accumulate_gradients(state, inputs, rng, *, step_fn, accum: int):
  """Runs `step_fn` (a bound `micro_step`) over the k micro-batches.

  Returns:
    (mean gradient, online_state, target_state, logs averaged over the
    micro-batches), all still local to this device.
  """
  zeros = jax.tree.map(jnp.zeros_like, state.online_params)
  carry = (state.online_state, state.target_state, zeros,
           state.online_params, state.target_params)
  if accum == 1:
    carry, logs = step_fn(carry, (jax.tree.map(lambda x: x[0], inputs), 0,
                                  rng))
  else:
    micro = jnp.arange(accum, dtype=jnp.int32)
    carry, logs = jax.lax.scan(
        lambda c, xs: step_fn(c, xs + (rng,)), carry, (inputs, micro))
    logs = jax.tree.map(jnp.mean, logs)
  online_state, target_state, grads, _, _ = carry
  grads = jax.tree.map(lambda g: g / accum, grads)
  return grads, online_state, target_state, logs


def ema(target_params, online_params, tau):
  """target <- tau * target + (1 - tau) * online, leaf by leaf."""
  return jax.tree.map(lambda t, o: t + (1.0 - tau) * (o - t),
                      target_params, online_params)


def make_update_fn(config: ml_collections.ConfigDict,
                   forward: hk.TransformedWithState,
                   optimizer: optax.GradientTransformation,
                   total_steps: int,
                   warmup: int,
                   axis_name: Optional[str] = devices.AXIS,
                   augment: bool = True):
  """Returns `update(state, inputs, rng) -> (state, scalars)`.

  `forward` is a `model.Network`'s (it normalises the views itself); `state`
  is an `experiment.TrainState`; `total_steps` and `warmup` are the
  schedule's, as given to `make_optimizer` (the EMA rate reads the first, the
  logged learning rate both). `inputs` holds `view1`, `view2`, `labels` with
  a leading micro-batch axis of length `training.accumulation_steps`. Run it
  under `jax.pmap` with `axis_name` (or with `axis_name=None` on one device,
  under `jax.jit`). `rng` must be the same on every device (see
  `example_keys`).

  Gradient accumulation: the k micro-batches run one after another
  (`lax.scan`) and their gradients are averaged before the single optimizer
  and EMA step. Without batch statistics (GN, LN, affine, none; WS or not)
  that is the update of the whole batch, up to float rounding. Under
  BatchNorm it is not: each micro-batch is normalised with its own
  statistics, over batch/k examples (pooled over devices by the cross-replica
  axis), and the BN moving averages advance once per micro-batch (and view);
  SimCLR's negatives likewise come from the micro-batch only.

  With `augment=False` the step skips the on-device augmentations and trains
  on `view1` and `view2` as given: views augmented
  elsewhere, or a benchmark of the network step alone.
  """
  t = config.training
  grad_fn = jax.grad(functools.partial(loss_fn, forward=forward,
                                       config=config, axis_name=axis_name),
                     has_aux=True)
  step_fn = functools.partial(micro_step, grad_fn=grad_fn, config=config,
                              axis_name=axis_name, augment=augment)

  def update(state, inputs, rng):
    # The batch's layout, checked while tracing (free under jit/pmap): a batch
    # without its micro-batch axis would otherwise fail deep in the scan, or
    # (accumulation 1) train on a slice of it.
    chex.assert_rank([inputs['view1'], inputs['labels']], [5, 2])
    chex.assert_equal_shape([inputs['view1'], inputs['view2']])
    chex.assert_equal_shape_prefix(
        [inputs['view1'], inputs['labels']], 2)
    chex.assert_axis_dimension(inputs['view1'], 0, t.accumulation_steps)
    # `rng` is the same on every device: per-example keys (example_keys) make
    # the augmentations differ between examples, and so between devices.
    grads, online_state, target_state, logs = accumulate_gradients(
        state, inputs, rng, step_fn=step_fn, accum=t.accumulation_steps)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      logs = jax.lax.pmean(logs, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.online_params)
    online_params = optax.apply_updates(state.online_params, updates)
    tau = schedules.target_ema(state.step, base_ema=t.tau_base,
                               total_steps=total_steps)
    target_params = state.target_params
    if config.method == 'byol':
      target_params = ema(state.target_params, online_params, tau)
    logs['tau'] = tau
    # Checked on the host with the loss: a step can turn finite parameters
    # into non-finite ones while its own loss (computed before it) is finite.
    logs['param_norm'] = optax.tree.norm(online_params)
    logs['learning_rate'] = schedules.learning_rate(
        state.step, base_lr=t.base_lr, batch_size=t.batch_size,
        total_steps=total_steps, warmup_steps=warmup)
    new_state = state._replace(
        step=state.step + 1, online_params=online_params,
        target_params=target_params, online_state=online_state,
        target_state=target_state, opt_state=opt_state)
    return new_state, logs

  return update
