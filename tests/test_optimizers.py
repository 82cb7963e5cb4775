"""Tests of byol.optimizers: LARS against a NumPy reference, parameter masks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from byol import optimizers
from byol import schedules

_WD = 0.05
_ETA = 1e-3
_MOMENTUM = 0.9
# Warmup over 3 steps to a peak of 1, then cosine: lr = 0, 1/3, 2/3, 1, ...
_SCHEDULE = dict(base_lr=1., batch_size=256, total_steps=20, warmup_steps=3)


def _params():
  rng = np.random.default_rng(0)
  return {
      'mlp/~/linear_0': {'w': rng.standard_normal((4, 3)).astype(np.float32),
                         'b': rng.standard_normal(3).astype(np.float32)},
      'mlp/~/groupnorm_0': {'scale': np.ones(3, np.float32),
                            'offset': np.zeros(3, np.float32)},
      # Zero weights: the trust ratio must fall back to 1.
      'mlp/~/linear_1': {'w': np.zeros((3, 2), np.float32)},
  }


def _grads(step):
  rng = np.random.default_rng(100 + step)
  return jax.tree.map(
      lambda p: rng.standard_normal(p.shape).astype(np.float32), _params())


def _reference_lars(params, num_steps):
  """The DeepMind rule in float64 NumPy, one leaf at a time."""
  mask = optimizers.exclude_bias_and_norm(params)
  params = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
  momentum = jax.tree.map(np.zeros_like, params)
  trajectory = []
  for step in range(num_steps):
    lr = float(schedules.learning_rate(step, **_SCHEDULE))

    def update(p, g, mu, included, lr=lr):
      g = np.asarray(g, np.float64)
      if included:
        g = g + _WD * p
        p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
        if p_norm > 0 and g_norm > 0:
          g = _ETA * p_norm / g_norm * g
      mu = _MOMENTUM * mu + g
      return p - lr * mu, mu

    out = jax.tree.map(update, params, _grads(step), momentum, mask)
    params = jax.tree.map(lambda o: o[0], out,
                          is_leaf=lambda x: isinstance(x, tuple))
    momentum = jax.tree.map(lambda o: o[1], out,
                            is_leaf=lambda x: isinstance(x, tuple))
    trajectory.append(params)
  return trajectory


def _run(optimizer, params, num_steps):
  state = optimizer.init(params)
  update = jax.jit(optimizer.update)
  trajectory = []
  for step in range(num_steps):
    updates, state = update(_grads(step), state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append(params)
  return trajectory


def _max_abs_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
      a, b)))


def _lars():
  return optimizers.lars(schedules.learning_rate_schedule(**_SCHEDULE),
                         weight_decay=_WD, eta=_ETA, momentum=_MOMENTUM)


def test_matches_reference_with_changing_learning_rate():
  num_steps = 5
  ours = _run(_lars(), _params(), num_steps)
  reference = _reference_lars(_params(), num_steps)
  for step, (a, b) in enumerate(zip(ours, reference)):
    chex.assert_trees_all_close(a, b, atol=1e-6, rtol=0,
                                custom_message=f'step {step}')
  # The parameters did move, by amounts far above the tolerance.
  assert _max_abs_diff(ours[-1], _params()) > 0.5


def test_optax_lars_differs_when_learning_rate_changes():
  # optax.lars multiplies by the learning rate before the momentum: the
  # step-0 gradient (lr_0 = 0 in warmup) never enters its accumulator.
  num_steps = 5
  mask = optimizers.exclude_bias_and_norm
  theirs = _run(optax.lars(schedules.learning_rate_schedule(**_SCHEDULE),
                           weight_decay=_WD, weight_decay_mask=mask,
                           trust_coefficient=_ETA, trust_ratio_mask=mask,
                           eps=0., momentum=_MOMENTUM),
                _params(), num_steps)
  reference = _reference_lars(_params(), num_steps)
  assert _max_abs_diff(theirs[-1], reference[-1]) > 0.1


def test_optax_lars_agrees_with_constant_learning_rate():
  # ...and only that: with a constant rate the two rules coincide.
  mask = optimizers.exclude_bias_and_norm
  ours = _run(optimizers.lars(0.5, weight_decay=_WD, eta=_ETA,
                              momentum=_MOMENTUM), _params(), 3)
  theirs = _run(optax.lars(0.5, weight_decay=_WD, weight_decay_mask=mask,
                           trust_coefficient=_ETA, trust_ratio_mask=mask,
                           eps=0., momentum=_MOMENTUM), _params(), 3)
  chex.assert_trees_all_close(ours[-1], theirs[-1], atol=1e-6, rtol=0)


def test_zero_norm_param_gets_trust_one():
  params = {'linear': {'w': np.zeros((2, 2), np.float32)}}
  grads = {'linear': {'w': np.full((2, 2), 3., np.float32)}}
  optimizer = optimizers.lars(0.1, weight_decay=_WD, eta=_ETA)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  # Trust 1, no momentum yet: update = -lr * g.
  chex.assert_trees_all_close(updates['linear']['w'], np.full((2, 2), -0.3),
                              rtol=1e-6, atol=0)


def test_zero_gradient_is_finite():
  params = {'linear': {'w': np.ones((2, 2), np.float32)}}
  grads = {'linear': {'w': np.zeros((2, 2), np.float32)}}
  optimizer = optimizers.lars(0.1, weight_decay=0., eta=_ETA)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  chex.assert_trees_all_equal(updates['linear']['w'], np.zeros((2, 2)),
                              strict=False)


def test_schedule_read_from_optimizer_count():
  optimizer = _lars()
  params = {'linear': {'b': np.zeros(1, np.float32)}}
  grads = {'linear': {'b': np.ones(1, np.float32)}}
  state = optimizer.init(params)
  first, state = optimizer.update(grads, state, params)
  second, state = optimizer.update(grads, state, params)
  # Bias: no decay, no trust ratio. lr_0 = 0, lr_1 = 1/3, mu_1 = 1.9.
  np.testing.assert_allclose(first['linear']['b'], 0., atol=1e-7)
  np.testing.assert_allclose(second['linear']['b'], -1.9 / 3, rtol=1e-6)


def test_realistic_haiku_params():
  w = jnp.zeros((1,))
  params = {
      'res_net50/~/initial_conv': {'w': w},
      'res_net50/~/initial_batchnorm': {'scale': w, 'offset': w},
      'res_net50/~/block_group_0/~/block_0/~/conv_0': {'w': w},
      'res_net50/~/block_group_0/~/block_0/~/groupnorm_0': {'scale': w,
                                                             'offset': w},
      'res_net50/~/block_group_0/~/block_0/~/shortcut_conv': {'w': w},
      'res_net50/~/block_group_0/~/block_0/~/shortcut_groupnorm': {
          'scale': w, 'offset': w},
      'res_net50/~/block_group_1/~/block_0/~/affine_2': {'scale': w,
                                                         'offset': w},
      'projector/~/linear_0': {'w': w, 'b': w},
      'projector/~/layernorm_0': {'scale': w, 'offset': w},
      'predictor/~/linear_1': {'w': w, 'b': w},
      'classifier': {'w': w, 'b': w},
  }
  mask = optimizers.exclude_bias_and_norm(params)
  included = sorted(f'{module}:{name}' for module, leaves in mask.items()
                    for name, value in leaves.items() if value)
  assert included == [
      'classifier:w',
      'predictor/~/linear_1:w',
      'projector/~/linear_0:w',
      'res_net50/~/block_group_0/~/block_0/~/conv_0:w',
      'res_net50/~/block_group_0/~/block_0/~/shortcut_conv:w',
      'res_net50/~/initial_conv:w',
  ]
  assert len(jax.tree.leaves(mask)) == 19


def test_training_state_shaped_tree():
  # Masks also work on nested containers (paths with attribute keys).
  params = {'online': {'mlp/~/batchnorm': {'scale': 1.}, 'mlp': {'w': 1.}}}
  assert optimizers.exclude_bias_and_norm(params) == {
      'online': {'mlp/~/batchnorm': {'scale': False}, 'mlp': {'w': True}}}




def _head_params():
  return {
      'projector/linear': {'w': jnp.full((3, 2), 0.5), 'b': jnp.ones(2)},
      'projector/groupnorm': {'scale': jnp.full(2, 2.0),
                              'offset': jnp.zeros(2) + 0.1},
      'predictor/linear': {'w': jnp.full((2, 2), -0.25), 'b': jnp.ones(2)},
  }


def _one_update(optimizer, params, grads):
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  return updates


def test_trust_ratio_on_norm_and_bias_scales_them_like_weights():
  params = _head_params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  lr, eta = 0.5, 1e-3
  dm = _one_update(optimizers.lars(lr, eta=eta), params, grads)
  all_in = _one_update(optimizers.lars(
      lr, eta=eta, trust_ratio_mask_fn=optimizers.include_all), params, grads)
  scale = params['projector/groupnorm']['scale']
  # DeepMind's rule: the norm scale moves at the raw rate: -lr * g.
  np.testing.assert_allclose(dm['projector/groupnorm']['scale'], -1.5)
  # Inside the trust ratio: -lr * eta * ||p|| / ||g|| * g.
  want = -lr * eta * float(jnp.linalg.norm(scale)) / float(
      jnp.linalg.norm(grads['projector/groupnorm']['scale'])) * 3.0
  np.testing.assert_allclose(all_in['projector/groupnorm']['scale'], want,
                             rtol=1e-6)
  # Weights are treated the same either way.
  np.testing.assert_allclose(all_in['projector/linear']['w'],
                             dm['projector/linear']['w'], rtol=1e-6)


def test_weight_decay_on_norm_and_bias_adds_wd_times_p():
  params = _head_params()
  grads = jax.tree.map(jnp.zeros_like, params)
  wd = 0.1
  # Zero gradients: the update is -lr * wd * p where weight decay applies.
  dm = _one_update(optimizers.lars(1.0, weight_decay=wd, eta=1.0,
                                   trust_ratio_mask_fn=lambda p: jax.tree.map(
                                       lambda _: False, p)), params, grads)
  all_in = _one_update(optimizers.lars(
      1.0, weight_decay=wd, eta=1.0, trust_ratio_mask_fn=lambda p: jax.tree.map(
          lambda _: False, p),
      weight_decay_mask_fn=optimizers.include_all), params, grads)
  np.testing.assert_allclose(dm['projector/groupnorm']['offset'], 0.0)
  np.testing.assert_allclose(all_in['projector/groupnorm']['offset'], -0.01,
                             rtol=1e-6)
  np.testing.assert_allclose(dm['projector/linear']['w'], -0.05, rtol=1e-6)


def test_masks_do_not_change_the_optimizer_state_structure():
  params = _head_params()
  a = optimizers.lars(0.1).init(params)
  b = optimizers.lars(0.1, weight_decay_mask_fn=optimizers.include_all,
                      trust_ratio_mask_fn=optimizers.include_all).init(params)
  assert jax.tree.structure(a) == jax.tree.structure(b)


def test_predictor_lr_multiplier_scales_only_the_predictor():
  from byol import update  # pylint: disable=g-import-not-at-top
  from configs import byol as byol_config  # pylint: disable=g-import-not-at-top

  def updates(multiplier):
    c = byol_config.get_config('local')
    c.unlock()
    c.training.warmup_epochs = 0.0  # a non-zero rate at step 0
    c.training.predictor_lr_multiplier = multiplier
    params = _head_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    return _one_update(update.make_optimizer(c, 100, 0), params, grads)

  base, fast = updates(1.0), updates(10.0)
  # The optimizer state is the same whatever the multiplier (checkpoints).
  c = byol_config.get_config('local')
  structures = []
  for multiplier in (1.0, 10.0):
    c.unlock()
    c.training.predictor_lr_multiplier = multiplier
    structures.append(jax.tree.structure(
        update.make_optimizer(c, 100, 0).init(_head_params())))
  assert structures[0] == structures[1]
  for module in base:
    for name in base[module]:
      factor = 10.0 if module.startswith('predictor/') else 1.0
      assert float(jnp.abs(base[module][name]).max()) > 0
      np.testing.assert_allclose(fast[module][name],
                                 factor * base[module][name], rtol=1e-6)


class LarsVariantsTest(chex.TestCase):
  """LARS (with either mask rule) and the EMA, traced, equal their plain form
  and the NumPy reference."""

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_lars_steps_match_the_reference(self):
    optimizer = _lars()
    update = self.variant(optimizer.update)
    params = _params()
    state = optimizer.init(params)
    reference = _reference_lars(_params(), 3)
    for step in range(3):
      updates, state = update(_grads(step), state, params)
      params = optax.apply_updates(params, updates)
      chex.assert_trees_all_close(params, reference[step], atol=1e-6, rtol=0)

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_masks_under_transformations(self):
    params = _head_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
    plain = {}
    for name, mask in (('dm', optimizers.exclude_bias_and_norm),
                       ('all', optimizers.include_all)):
      optimizer = optimizers.lars(0.5, weight_decay=0.1, eta=1e-3,
                                  weight_decay_mask_fn=mask,
                                  trust_ratio_mask_fn=mask)
      traced, _ = self.variant(optimizer.update)(
          grads, optimizer.init(params), params)
      plain[name], _ = optimizer.update(grads, optimizer.init(params), params)
      chex.assert_trees_all_close(traced, plain[name], rtol=1e-6, atol=0)
    # DeepMind's rule leaves the norm scale at -lr * g; the other does not.
    chex.assert_trees_all_close(plain['dm']['projector/groupnorm']['scale'],
                                jnp.full((2,), -1.5), rtol=1e-6, atol=0)
    assert float(jnp.abs(plain['all']['projector/groupnorm']['scale'] -
                         plain['dm']['projector/groupnorm']['scale']).max()
                 ) > 1.0

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_ema(self):
    from byol import update as update_lib  # pylint: disable=g-import-not-at-top
    target, online = _params(), _grads(0)
    out = self.variant(update_lib.ema)(target, online, jnp.float32(0.9))
    expected = jax.tree.map(lambda t, o: 0.9 * np.float64(t) + 0.1 * o,
                            target, online)
    chex.assert_trees_all_equal_structs(out, target)
    chex.assert_trees_all_close(out, expected, atol=1e-6, rtol=0)
