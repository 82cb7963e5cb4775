"""The pretraining update step: pmapped BYOL/SimCLR steps, EMA, accumulation."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol import devices
from byol import experiment
from byol import model
from byol import schedules
from byol import update as update_lib
from configs import byol as byol_config

# One worker runs the module: its tests share compiled steps (lru_cache'd
# below), which another worker would compile again.
pytestmark = pytest.mark.xdist_group('experiment')

NUM_DEVICES = 4  # tests/conftest.py forces 4 CPU devices
IMAGE = 16
BATCH = 16  # global


def tiny_config(variant='local', **overrides):
  c = byol_config.get_config(variant)
  c.unlock()
  c.model.encoder.width_multiplier = 0.125  # 8..64 channels
  c.model.encoder.num_groups = 4
  for head in ('projector', 'predictor'):
    c.model[head].hidden_size = 32
    c.model[head].output_size = 16
    c.model[head].num_groups = 4
  c.data.image_size = IMAGE
  c.training.batch_size = BATCH
  c.training.max_steps = 20
  c.training.warmup_epochs = 0.0
  c.training.base_lr = 2.0
  c.update_from_flattened_dict(overrides)
  c.lock()
  return c


def fixed_batch(num_devices, accum=1, per_device=None, seed=0):
  per_device = per_device or BATCH // (num_devices * accum)
  rng = np.random.RandomState(seed)
  shape = (num_devices, accum, per_device, IMAGE, IMAGE, 3)
  return {
      'view1': rng.uniform(size=shape).astype(np.float32),
      'view2': rng.uniform(size=shape).astype(np.float32),
      'labels': rng.randint(0, 10, size=shape[:3]).astype(np.int32),
  }


@functools.lru_cache(maxsize=None)
def compiled(variant, method, num_devices):
  """(init, update, config), pmapped over `num_devices`; cached per variant."""
  config = tiny_config(variant, method=method)
  network = model.Network(config, devices.AXIS)
  forward = network.forward
  total = config.training.max_steps
  warmup = experiment.warmup_steps(config)
  optimizer = update_lib.make_optimizer(config, total, warmup)
  local = jax.local_devices()[:num_devices]
  init = jax.pmap(experiment.make_init_fn(network, optimizer),
                  axis_name=devices.AXIS, devices=local)
  update = jax.pmap(
      update_lib.make_update_fn(config, forward, optimizer, total, warmup),
      axis_name=devices.AXIS, devices=local)
  return init, update, config


def jitted(config):
  """(init, update) of `config` under jit on one device, 20 total steps, no
  warm-up."""
  network = model.Network(config, axis_name=None)
  forward = network.forward
  optimizer = update_lib.make_optimizer(config, 20, 0)
  init = jax.jit(experiment.make_init_fn(network, optimizer))
  update = jax.jit(update_lib.make_update_fn(config, forward, optimizer, 20,
                                             0, axis_name=None))
  return init, update


def flat(tree):
  """Every leaf of `tree`, raveled into one vector (empty for no leaves)."""
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)] +
                        [np.zeros(0)])


def replicated_key(seed, n):
  return jnp.broadcast_to(jax.random.PRNGKey(seed), (n, 2))


def init_state(init, n):
  return init(replicated_key(0, n),
              np.zeros((n, BATCH // n, IMAGE, IMAGE, 3), np.float32))


@pytest.mark.slow
@pytest.mark.parametrize('variant,method', [
    ('local', 'byol'),  # GN+WS everywhere
    ('local,bn', 'byol'),
    ('local', 'simclr'),
    ('local,bn', 'simclr'),
])
def test_pmapped_steps_lower_the_loss_on_a_fixed_batch(variant, method):
  init, update, _ = compiled(variant, method, NUM_DEVICES)
  state = init_state(init, NUM_DEVICES)
  batch = fixed_batch(NUM_DEVICES)
  rng = replicated_key(7, NUM_DEVICES)  # same augmentations every step
  losses = []
  for _ in range(8):
    state, logs = update(state, batch, rng)
    losses.append(float(logs['repr_loss'][0]))
    # pmean'd logs are the same on every device.
    np.testing.assert_allclose(logs['loss'][0], logs['loss'][1], rtol=1e-6)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0] - 0.05, losses
  assert int(state.step[0]) == 8
  # Parameters stay identical across replicas.
  leaf0 = jax.tree.leaves(state.online_params)[0]
  np.testing.assert_array_equal(leaf0[0], leaf0[1])


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['local', 'local,bn'])
def test_one_device_and_four_follow_the_same_trajectory(variant):
  """The same global batch of 16 on 1 device or split over 4: the same
  losses and parameters up to float rounding, with GN+WS (no batch
  statistics) and with cross-replica BatchNorm (statistics of the global
  batch). Augmentations are on: their keys depend on an example's place in
  the global batch only."""
  runs = []
  for n in (1, NUM_DEVICES):
    init, update, _ = compiled(variant, 'byol', n)
    state = init_state(init, n)
    start = jax.tree.map(lambda x: np.asarray(x[0]), state.online_params)
    batch = fixed_batch(n)  # one random stream, split n ways
    losses = []
    for step in range(3):
      state, logs = update(state, batch, replicated_key(10 + step, n))
      losses.append(float(logs['loss'][0]))
    runs.append((losses, jax.tree.map(lambda x: np.asarray(x[0]), state)))
  (l1, s1), (l4, s4) = runs
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  assert l1[0] != l1[1]  # the steps did change something
  # online_state: BatchNorm's moving averages (empty under GN+WS).
  assert (variant == 'local,bn') == (flat(s1.online_state).size > 0)
  for field in ('online_params', 'target_params', 'online_state'):
    a, b = flat(getattr(s1, field)), flat(getattr(s4, field))
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), field
  moved = np.linalg.norm(flat(s1.online_params) - flat(start))
  gap = np.linalg.norm(flat(s1.online_params) - flat(s4.online_params))
  assert moved > 100 * gap, (moved, gap)


def test_target_is_an_ema_of_the_new_online_params():
  # The module's shared one-device step (compiled once, guarded): the EMA is
  # the same per replica; UpdateStepVariantsTest checks the pmapped form
  # against this step, and the pmapped tests above run it on four devices.
  config, _, _, state = _one_device()
  update = _guarded_step()
  # Online and target start from different keys.
  w_online = state.online_params['classifier']['w']
  w_target = state.target_params['classifier']['w']
  assert np.abs(np.asarray(w_online) - np.asarray(w_target)).max() > 1e-3
  new, logs = update(state, jax.tree.map(lambda x: x[0], fixed_batch(1)),
                     jax.random.PRNGKey(1))
  # _one_device's optimizer and step count 20 steps.
  tau = float(schedules.target_ema(0, base_ema=config.training.tau_base,
                                   total_steps=20))
  np.testing.assert_allclose(float(logs['tau']), tau, rtol=1e-6)
  for old_t, new_o, new_t in zip(jax.tree.leaves(state.target_params),
                                 jax.tree.leaves(new.online_params),
                                 jax.tree.leaves(new.target_params)):
    expected = tau * np.asarray(old_t) + (1 - tau) * np.asarray(new_o)
    np.testing.assert_allclose(np.asarray(new_t), expected, atol=1e-6)


def test_classifier_gradient_does_not_reach_the_encoder():
  config = tiny_config('local')
  forward = model.make_forward(config, 10, axis_name=None)
  x = jnp.asarray(np.random.RandomState(0).uniform(
      size=(4, IMAGE, IMAGE, 3)), jnp.float32)
  params, state = forward.init(jax.random.PRNGKey(0), x, True)

  def classifier_loss(p):
    out, _ = forward.apply(p, state, None, x, True)
    return jnp.sum(out['logits'] ** 2)

  grads = jax.jit(jax.grad(classifier_loss))(params)
  for name, leaves in grads.items():
    norm = sum(float(jnp.sum(g ** 2)) for g in leaves.values())
    if name.startswith('classifier'):
      assert norm > 0
    else:
      assert norm == 0, name


@pytest.mark.slow
def test_accumulation_equals_the_large_batch_under_gn_ws():
  """k micro-batches of B/k with averaged gradients == one batch of B."""
  # Augmentation randomness is drawn per micro-batch; with every
  # probability at zero both runs see the same views. One batch of B: the
  # shared one-pass steps (the same config, batch, keys and step count).
  accum = 4
  results = [_two_one_pass_steps()]
  c = _without_augmentations(**{'training.images_per_pass': 0,
                                'training.accumulation_steps': accum})
  init, update = jitted(c)
  state = init(jax.random.PRNGKey(0),
               np.zeros((BATCH, IMAGE, IMAGE, 3), np.float32))
  batch = jax.tree.map(
      lambda x: x.reshape((accum, x.shape[2] // accum) + x.shape[3:]),
      fixed_batch(1, accum=1))
  for _ in range(2):
    state, logs = update(state, batch, jax.random.PRNGKey(3))
  results.append((state, logs))
  (s1, l1), (s4, l4) = results
  np.testing.assert_allclose(float(l1['loss']), float(l4['loss']), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1.online_params),
                  jax.tree.leaves(s4.online_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize('images_per_pass', [16, 12])
def test_passes_of_fewer_images_give_the_one_pass_step(images_per_pass):
  """training.images_per_pass: the same step as one pass of both views (the
  old path, images_per_pass=0), up to float rounding, for passes that divide
  the 32 images (16 + 16) and for more passes with a short last one
  (12 + 12 + 8). The augmentations are off (as for the shared one-pass
  steps): they are drawn before the views are split into passes."""
  batch = jax.tree.map(lambda x: x[0], fixed_batch(1))
  results = [_two_one_pass_steps()]  # shared by both parameters
  c = _without_augmentations(**{'training.images_per_pass': images_per_pass})
  init, update = jitted(c)
  state = init(jax.random.PRNGKey(0),
               np.zeros((BATCH, IMAGE, IMAGE, 3), np.float32))
  for _ in range(2):
    state, logs = update(state, batch, jax.random.PRNGKey(3))
  results.append((state, logs))
  (s0, l0), (s1, l1) = results
  for key in ('loss', 'repr_loss', 'classif_loss', 'proj_std'):
    np.testing.assert_allclose(float(l1[key]), float(l0[key]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves((s1.online_params, s1.target_params)),
                  jax.tree.leaves((s0.online_params, s0.target_params))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6)


def test_update_without_augmentations_trains_on_the_views_as_given():
  """make_update_fn(augment=False) (the benchmark's +noaug): the step's loss
  is that of the given views (the network normalises them); with the augmentations the
  same batch gives another loss."""
  config, forward, optimizer, state = _one_device()
  batch = fixed_batch(1)
  losses = {}
  for augment in (False, True):
    # With the augmentations: the module's shared (guarded) jitted step.
    update = _guarded_step() if augment else jax.jit(
        update_lib.make_update_fn(config, forward, optimizer, 20, 0,
                                  axis_name=None, augment=False))
    _, logs = update(state, jax.tree.map(lambda x: x[0], batch),
                     jax.random.PRNGKey(3))
    losses[augment] = float(logs['repr_loss'])
  views = {k: batch[k][0, 0] for k in ('view1', 'view2')}
  # micro_step's forward key for micro-batch 0 of the step key.
  fwd_rng = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(3))[1], 0)
  _, (_, _, direct) = update_lib.loss_fn(
      state.online_params, state.online_state, state.target_params,
      state.target_state, fwd_rng, dict(views, labels=batch['labels'][0, 0]),
      forward=forward, config=config, axis_name=None)
  np.testing.assert_allclose(losses[False], float(direct['repr_loss']),
                             rtol=1e-5)
  assert abs(losses[True] - losses[False]) > 1e-3, losses


def test_unlabelled_examples_leave_the_online_classifier_alone():
  """Label -1 (an unlabelled split's) adds nothing to the classifier's loss
  or accuracy: both are the means over the labelled examples only."""
  config, forward, _, state = _one_device()
  batch = jax.tree.map(lambda x: x[0, 0], fixed_batch(1))
  labels = batch['labels'].copy()
  labels[::2] = -1
  _, (_, _, logs) = update_lib.loss_fn(
      state.online_params, state.online_state, state.target_params,
      state.target_state, jax.random.PRNGKey(1), dict(batch, labels=labels),
      forward=forward, config=config, axis_name=None)
  # GN+WS: an image's logits do not depend on the rest of its batch.
  out, _ = forward.apply(state.online_params, state.online_state, None,
                         batch['view1'], True)
  logits = np.asarray(out['logits'], np.float64)
  kept = labels >= 0
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected_loss = -log_p[kept, labels[kept]].mean()
  expected_top1 = (logits[kept].argmax(-1) == labels[kept]).mean()
  np.testing.assert_allclose(float(logs['classif_loss']), expected_loss,
                             rtol=1e-4)
  np.testing.assert_allclose(float(logs['top1_accuracy']), expected_top1)
  # A batch with no label at all: no classifier loss, not NaN.
  _, (_, _, none) = update_lib.loss_fn(
      state.online_params, state.online_state, state.target_params,
      state.target_state, jax.random.PRNGKey(1),
      dict(batch, labels=np.full_like(labels, -1)),
      forward=forward, config=config, axis_name=None)
  assert float(none['classif_loss']) == 0.0
  assert float(none['top1_accuracy']) == 0.0


@pytest.mark.parametrize('field, value, match', [
    ('data.pretrain_split', 'test', 'pretrain_split must be'),
    ('data.pretrain_split', 'extra', 'pretrain_split must be'),
    ('data.std', (0.3, 0.3, 0.3), 'together'),
])
def test_data_fields_are_checked_before_any_data_is_read(field, value, match):
  config = tiny_config('local', **{field: value})
  with pytest.raises(experiment.ConfigError, match=match):
    experiment.validate_config(config)


def test_images_per_pass_must_not_be_negative():
  config = tiny_config('local', **{'training.images_per_pass': -1})
  with pytest.raises(experiment.ConfigError, match='images_per_pass'):
    experiment.validate_config(config)


@pytest.mark.slow
def test_accumulation_under_batchnorm_runs_with_per_micro_batch_statistics():
  """BN + accumulation: finite, and the BN averages move once per micro-batch
  (each micro-batch is normalised with its own statistics)."""
  accum, steps = 2, 2
  config = tiny_config('local,bn', **{'training.accumulation_steps': accum})
  init, update = jitted(config)
  state = init(jax.random.PRNGKey(0),
               np.zeros((BATCH // accum, IMAGE, IMAGE, 3), np.float32))
  batch = jax.tree.map(lambda x: x[0], fixed_batch(1, accum=accum))
  first = state
  for step in range(steps):
    state, logs = update(state, batch, jax.random.PRNGKey(step))
    assert np.isfinite(float(logs['loss'])) and np.isfinite(
        float(logs['param_norm']))
  counters = [v for path, v in jax.tree_util.tree_flatten_with_path(
      state.online_state)[0] if 'counter' in jax.tree_util.keystr(path)]
  # Under BN each view is its own forward pass: two updates per micro-batch.
  assert counters and all(int(c) == steps * accum * 2 for c in counters)
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(first.online_params), jax.tree.leaves(state.online_params))]
  assert max(moved) > 1e-3


@pytest.mark.slow
def test_bfloat16_steps_track_float32():
  """model.dtype=bfloat16: convolutions and matmuls in bf16; parameters,
  normalization statistics and the loss in f32. Five steps on a fixed batch
  (lr 0.2) follow the f32 run: every loss within 1% (measured: 0.3%), the
  parameters within 35% of how far training moved them (measured: 22% after
  the first step, 25% after the fifth: bf16 gradients of this tiny net differ
  from f32 ones by ~0.2 in relative L2, mostly where WS' and GN's backward
  passes subtract nearly equal terms)."""
  runs = []
  for dtype in ('float32', 'bfloat16'):
    c = tiny_config('local', **{'model.dtype': dtype, 'training.base_lr': 0.2})
    init, update = jitted(c)
    state = init(jax.random.PRNGKey(0),
                 np.zeros((BATCH, IMAGE, IMAGE, 3), np.float32))
    start = state.online_params
    batch = jax.tree.map(lambda x: x[0], fixed_batch(1))
    losses = []
    for step in range(5):
      state, logs = update(state, batch, jax.random.PRNGKey(step))
      assert logs['loss'].dtype == jnp.float32
      losses.append(float(logs['loss']))
    assert all(x.dtype == jnp.float32
               for x in jax.tree.leaves(state.online_params))
    runs.append((np.array(losses), state.online_params, start))
  (l32, p32, start), (l16, p16, _) = runs
  np.testing.assert_allclose(l16, l32, rtol=1e-2)
  assert np.abs(l16 - l32).max() > 1e-4  # bf16 was really used
  moved = np.linalg.norm(flat(p32) - flat(start))
  gap = np.linalg.norm(flat(p16) - flat(p32))
  assert gap <= 0.35 * moved, (gap, moved)



@functools.lru_cache(maxsize=None)
def _one_device(variant='local'):
  """(config, forward, optimizer, initial state) of one device, 20 steps."""
  config = tiny_config(variant)
  network = model.Network(config, axis_name=None)
  forward = network.forward
  optimizer = update_lib.make_optimizer(config, 20, 0)
  init = jax.jit(experiment.make_init_fn(network, optimizer))
  state = init(jax.random.PRNGKey(0),
               np.zeros((BATCH, IMAGE, IMAGE, 3), np.float32))
  return config, forward, optimizer, state


class UpdateStepVariantsTest(chex.TestCase):
  """The update step under pmap (one device: device index 0, as under jit)
  gives the jitted step's state and logs (the jitted step, `_guarded_step`,
  is the reference; a with_jit variant would compile the same program again).
  The op-by-op (without_jit) form is left out: compiling each primitive of a
  ResNet's step alone costs ~55 s of CPU; the pieces it is made of (losses,
  LARS, EMA, schedules, GN/WS, augmentations) each have all three variants,
  and test_update_without_augmentations_trains_on_the_views_as_given checks
  the jitted step against `loss_fn` called directly."""

  @chex.variants(with_pmap=True)
  def test_pmap_form_equals_the_jitted_step(self):
    config, forward, optimizer, state = _one_device()
    pmapped = self.variant.type is chex.ChexVariantType.WITH_PMAP
    fn = update_lib.make_update_fn(
        config, forward, optimizer, 20, 0,
        axis_name=devices.AXIS if pmapped else None)
    step = self.variant(fn, **({'n_devices': 1} if pmapped else {}))
    batch = jax.tree.map(lambda x: x[0], fixed_batch(1))
    new, logs = step(state, batch, jax.random.PRNGKey(3))
    reference, reference_logs = _guarded_step()(state, batch,
                                                jax.random.PRNGKey(3))
    chex.assert_trees_all_equal_shapes_and_dtypes(new, reference)
    chex.assert_trees_all_close(new, reference, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(logs, reference_logs, rtol=1e-5, atol=1e-6)
    chex.assert_tree_all_finite(logs)
    assert int(new.step) == 1


@functools.lru_cache(maxsize=None)
def _guarded_step():
  """The jitted one-device update step, guarded against retracing: every test
  that calls it (below and above) checks that it compiles once."""
  config, forward, optimizer, _ = _one_device()
  return jax.jit(chex.assert_max_traces(update_lib.make_update_fn(
      config, forward, optimizer, 20, 0, axis_name=None), n=1))


def test_update_step_compiles_once_and_a_leaked_python_scalar_retraces():
  _, _, _, state = _one_device()
  step = _guarded_step()
  batch = jax.tree.map(lambda x: x[0], fixed_batch(1))
  losses = []
  for i in range(3):  # new values, same shapes and dtypes: no new trace
    state, logs = step(state, batch, jax.random.PRNGKey(i))
    losses.append(float(logs['loss']))
  assert len(set(losses)) == 3 and int(state.step) == 3
  # A restore that hands back the step as a Python int: a weakly typed scalar
  # is another abstract value, so the step would compile again.
  leaked = state._replace(step=int(state.step))
  with pytest.raises(AssertionError, match='assert_max_traces'):
    step(leaked, batch, jax.random.PRNGKey(9))


def _wrong_layouts():
  batch = jax.tree.map(lambda x: x[0], fixed_batch(1))  # [accum 1, 16, ...]
  return {
      # The micro-batch axis left out: [16, H, W, 3] views, [16] labels.
      'no_micro_batch_axis': (jax.tree.map(lambda x: x[0], batch), 'rank'),
      # Labels of 3 examples beside views of 16.
      'labels_of_other_examples': (dict(batch, labels=batch['labels'][:, :3]),
                                   'shape_prefix'),
      # Two micro-batches where the config says one.
      'other_accumulation': (jax.tree.map(
          lambda x: x.reshape((2, x.shape[1] // 2) + x.shape[2:]), batch),
                             'axis_dimension'),
  }


@pytest.mark.parametrize('name', list(_wrong_layouts()))
def test_a_batch_of_the_wrong_layout_fails_while_tracing(name):
  config, forward, optimizer, state = _one_device()
  batch, check = _wrong_layouts()[name]
  fn = update_lib.make_update_fn(config, forward, optimizer, 20, 0,
                                 axis_name=None)
  # Caught while tracing, before anything is compiled.
  with pytest.raises(AssertionError, match=check):
    jax.jit(fn).trace(state, batch, jax.random.PRNGKey(0))


def _without_augmentations(**overrides):
  """tiny_config('local', **overrides) with every augmentation's probability
  at zero: the views are the batch's, whatever the random draws."""
  config = tiny_config('local', **overrides)
  config.unlock()
  for view in ('view1', 'view2'):
    for field in ('flip_prob', 'color_jitter_prob', 'grayscale_prob',
                  'blur_prob', 'solarize_prob'):
      config.data.augmentations[view][field] = 0.0
  config.lock()
  return config


@functools.lru_cache(maxsize=None)
def _two_one_pass_steps():
  """(state, logs) after two steps of key 3 on `fixed_batch(1)` with
  images_per_pass=0 (one pass of both views) and no augmentations; shared
  by the parameters of test_passes_of_fewer_images_give_the_one_pass_step
  and by test_accumulation_equals_the_large_batch_under_gn_ws (its batch of
  B in one micro-batch)."""
  c = _without_augmentations(**{'training.images_per_pass': 0})
  init, update = jitted(c)
  state = init(jax.random.PRNGKey(0),
               np.zeros((BATCH, IMAGE, IMAGE, 3), np.float32))
  batch = jax.tree.map(lambda x: x[0], fixed_batch(1))
  for _ in range(2):
    state, logs = update(state, batch, jax.random.PRNGKey(3))
  return state, logs
