"""LARS as in DeepMind's BYOL, composed from optax transformations.

The update of one parameter tensor p with gradient g at step t is

  g    <- g + wd * p                       (weight decay, masked)
  g    <- trust * g,  trust = eta * ||p|| / ||g||  (1 if either norm is 0;
                                                    masked)
  mu   <- momentum * mu + g
  p    <- p - lr_t * mu

with biases and every normalization parameter excluded from both weight decay
and the trust ratio (DeepMind's rule; each exclusion can be switched off).

Why not `optax.lars`: it applies the learning rate *before* the momentum
accumulator (mu <- m * mu + lr_t * trust * g; update = -mu), whereas the rule
above (and DeepMind's code) applies it *after* (update = -lr_t * mu). The two
agree only while the learning rate is constant; during BYOL's warmup and cosine
decay they differ, e.g. at step 0 of the warmup (lr_0 = 0) `optax.lars`
discards the first gradient while this rule keeps it in the momentum.
"""

import jax
import optax


def _key_name(key):
  """The name of one entry of a `jax.tree_util` key path, as a string."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def exclude_bias_and_norm(params):
  """Marks the parameters that get weight decay and the LARS trust ratio.

  A leaf is excluded (False) when its own name is `b` (a bias), or when any
  module on its path has `norm` or `affine` in its name (`batchnorm_0`,
  `groupnorm_1`, `layernorm`, `initial_batchnorm`, `shortcut_groupnorm`,
  `affine_0`, ...): their scales and offsets are not weights in the sense of
  LARS or of weight decay.

  Args:
    params: a pytree of parameters, e.g. a Haiku params dict
      {'res_net50/~/block_group_0/~/block_0/~/batchnorm_0': {'scale': ...}}.

  Returns:
    A pytree of Python bools with the structure of `params`, True where the
    leaf is subject to weight decay and to the trust ratio.
  """
  def included(path, leaf):
    del leaf
    names = [_key_name(k) for k in path]
    if not names:
      return True
    leaf_name, module_names = names[-1], names[:-1]
    if leaf_name == 'b':
      return False
    for module_path in module_names:
      for module in module_path.replace('/~/', '/').split('/'):
        if 'norm' in module or 'affine' in module:
          return False
    return True

  return jax.tree_util.tree_map_with_path(included, params)


def include_all(params):
  """A mask that subjects every parameter to weight decay / the trust ratio."""
  return jax.tree.map(lambda _: True, params)


def lars(learning_rate, *, weight_decay=0., eta=1e-3, momentum=0.9,
         mask_fn=exclude_bias_and_norm, weight_decay_mask_fn=None,
         trust_ratio_mask_fn=None, lr_multiplier=1.0, lr_multiplier_where=None):
  """LARS with the learning rate applied after momentum (DeepMind's rule).

  Args:
    learning_rate: a float, or an optax schedule `fn(count)`; a schedule is
      evaluated on the optimizer's own update counter (0 for the first
      update), so the optimizer is built once for the whole run.
    weight_decay: the L2 coefficient added to the gradient.
    eta: the LARS trust coefficient.
    momentum: the heavy-ball momentum coefficient.
    mask_fn: params -> pytree of bools, True where weight decay and the trust
      ratio apply; None applies them everywhere.
    weight_decay_mask_fn: overrides `mask_fn` for weight decay alone.
    trust_ratio_mask_fn: overrides `mask_fn` for the trust ratio alone.
    lr_multiplier: multiplies the learning rate of the parameters that
      `lr_multiplier_where` (`str -> bool` on the key path) selects.
    lr_multiplier_where: see `lr_multiplier`.

  Returns:
    An `optax.GradientTransformation`. Its state has the same structure
    whatever the masks and multiplier, so checkpoints do not depend on them.
  """
  mask_fn = mask_fn or include_all
  wd_mask = weight_decay_mask_fn or mask_fn
  trust_mask = trust_ratio_mask_fn or mask_fn
  return optax.chain(
      optax.masked(optax.add_decayed_weights(weight_decay), wd_mask),
      # optax's trust ratio is trust_coefficient * ||p|| / ||g||, set to 1
      # when either norm is 0: exactly the rule above with eta.
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=eta),
                   trust_mask),
      optax.trace(decay=momentum),
      # Last, so that the step size multiplies the accumulated momentum.
      scale_by_learning_rate(learning_rate, lr_multiplier,
                             lr_multiplier_where),
  )


def scale_by_learning_rate(learning_rate, multiplier=1.0, where=None):
  """`optax.scale_by_learning_rate`, times `multiplier` on some parameters.

  Args:
    learning_rate: a float or an optax schedule.
    multiplier: the factor on the learning rate of the parameters `where`
      selects.
    where: `str -> bool` on a leaf's key path (`jax.tree_util.keystr`), e.g.
      `lambda path: "'predictor/" in path`.

  Returns:
    A transformation with the same state as `optax.scale_by_learning_rate`
    whatever the multiplier, so that checkpoints do not depend on it.
  """
  base = optax.scale_by_learning_rate(learning_rate)
  if multiplier == 1.0 or where is None:
    return base

  def update(updates, state, params=None):
    updates, state = base.update(updates, state, params)
    updates = jax.tree_util.tree_map_with_path(
        lambda path, u: u * multiplier if where(jax.tree_util.keystr(path))
        else u, updates)
    return updates, state

  return optax.GradientTransformation(base.init, update)
