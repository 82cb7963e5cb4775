"""Five bugs a review planted that the rest of the suite let through.

Each test here fails with its bug planted (checked by planting each one):
  * the allow-list of the DeepMind importer widened (tests/test_dm_dill.py:
    `test_the_allow_list_is_exactly_deepminds_state_and_all_stand_ins`,
    `test_a_getattr_pickle_is_refused_unrun`);
  * `training.trust_ratio_on_norm_and_bias` inverted inside `make_optimizer`;
  * no checkpoint when SIGTERM/SIGINT lands on a step that is not a
    checkpoint step;
  * the online classifier's periodic evaluation reading TRAIN, not TEST;
  * the two views' blur probabilities swapped in `postprocess` with
    per-example keys.
"""

import functools
import itertools
import os
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from byol import augmentations
from byol import checkpointing
from byol import dataset as dataset_lib
from byol import model
from byol import schedules
from byol import train_loop
from byol import update
from byol.evaluation import features
from byol.evaluation import online_classifier
from configs import byol as byol_config
from test_dm_checkpoint import random_state
from test_experiment import tiny_config


# ---------------------------------------------------------------------------
# The trust-ratio flag, through the optimizer the experiment builds.


@pytest.mark.parametrize('trust_norms', [False, True])
def test_trust_ratio_flag_decides_a_norm_scales_step(trust_norms):
  config = tiny_config('local', **{
      'training.trust_ratio_on_norm_and_bias': trust_norms,
      'training.weight_decay': 0.0})
  rng = np.random.RandomState(0)
  params = {
      'projector/groupnorm': {
          'scale': jnp.asarray(rng.uniform(0.5, 1.5, (1, 8)), jnp.float32),
          'offset': jnp.zeros((1, 8), jnp.float32)},
      'projector/linear': {
          'w': jnp.asarray(rng.randn(8, 8), jnp.float32)},
  }
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  optimizer = update.make_optimizer(config, total_steps=10, warmup=0)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  t = config.training
  lr = float(schedules.learning_rate_schedule(
      base_lr=t.base_lr, batch_size=t.batch_size, total_steps=10,
      warmup_steps=0)(0))
  scale, g = params['projector/groupnorm']['scale'], 0.3
  if trust_norms:  # -lr * eta * ||p|| / ||g|| * g
    want = -lr * t.lars_eta * float(jnp.linalg.norm(scale)) / float(
        jnp.linalg.norm(grads['projector/groupnorm']['scale'])) * g
  else:  # DeepMind's rule: the raw rate
    want = -lr * g
  chex.assert_trees_all_close(updates['projector/groupnorm']['scale'],
                              jnp.full((1, 8), want), rtol=1e-5)
  # The weights take the trust ratio either way.
  w, gw = params['projector/linear']['w'], grads['projector/linear']['w']
  chex.assert_trees_all_close(
      updates['projector/linear']['w'],
      -lr * t.lars_eta * jnp.linalg.norm(w) / jnp.linalg.norm(gw) * gw,
      rtol=1e-5)


# ---------------------------------------------------------------------------
# A stop on a step that is not a checkpoint step still checkpoints it.


class _CountingExperiment:
  """The parts of a PretrainExperiment the loop uses, without a network:
  SIGTERM arrives during step `stop_at` (1-based); saves are recorded."""

  def __init__(self, config, workdir, stop_at):
    self.config, self.workdir, self.stop_at = config, workdir, stop_at
    self.is_chief = True
    self.network = None  # no evaluator is scheduled to read it
    self.local_devices = 1  # the train loop's log line names the devices
    self.total_steps = config.training.max_steps
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, 'checkpoints'))
    self.saved, self.lines = [], []

  def print(self, line):
    self.lines.append(line)

  def restore_or_init(self):
    return 0

  def input(self, start):
    return itertools.count(start)

  def step(self, batch, step):
    del batch
    if step + 1 == self.stop_at:
      os.kill(os.getpid(), signal.SIGTERM)  # as a preemption would
    names = ('loss', 'repr_loss', 'classif_loss', 'proj_std', 'param_norm')
    return {k: jnp.full((1,), 0.5 + step) for k in names}

  def save(self, step):
    self.saved.append(step)

  def summary(self):
    return {'step': self.saved[-1] if self.saved else 0}


def test_a_stop_on_a_step_between_checkpoints_checkpoints_that_step(tmp_path):
  config = tiny_config('local', **{
      'training.max_steps': 10, 'training.checkpoint_every_steps': 2,
      'training.log_every_steps': 100, 'evaluators.schedule': ()})
  exp = _CountingExperiment(config, str(tmp_path), stop_at=3)
  with pytest.raises(train_loop.Preempted) as e:
    train_loop.train(exp)
  assert e.value.signum == signal.SIGTERM
  assert exp.saved == [2, 3]  # the step the signal landed on, not only 2
  assert 'saved the checkpoint of step 3' in str(e.value)


# ---------------------------------------------------------------------------
# The online classifier is evaluated on TEST, every TEST example once.


@pytest.mark.slow  # an evaluation over the whole TEST split
def test_online_evaluation_reads_every_test_example(tmp_path, monkeypatch):
  config = tiny_config('local', **{
      'evaluators.online_classifier.batch_size': 1000})
  evaluator = online_classifier.OnlineClassifierEvaluator.from_config(
      config.evaluators.online_classifier, model.Network(config))
  state = random_state(config, step=0, seed=1)
  seen = {}
  real = features.extract_features

  def spy(*args, **kwargs):
    logits, labels = real(*args, **kwargs)
    seen.update(split=kwargs['split'], logits=logits, labels=labels)
    return logits, labels

  monkeypatch.setattr(features, 'extract_features', spy)
  result = evaluator.run(state.online_params, state.online_state)
  assert seen['split'] == dataset_lib.Split.TEST
  chex.assert_shape(seen['logits'], (10_000, 10))
  # Every TEST image once: Fashion-MNIST's TEST labels, 1,000 per class.
  np.testing.assert_array_equal(np.bincount(seen['labels'], minlength=10),
                                np.full(10, 1000))
  top1 = float(np.mean(seen['logits'].argmax(-1) == seen['labels']))
  assert result['eval_top1_accuracy'] == pytest.approx(top1, abs=1e-12)


# ---------------------------------------------------------------------------
# Each view's blur probability, through postprocess with per-example keys.


def test_blur_frequency_of_each_view_with_per_example_keys():
  n, side = 1000, 24  # 3 blur taps at 24 px
  augs = byol_config.get_config('local').data.augmentations
  augs.unlock()
  for view in ('view1', 'view2'):
    for field in ('flip_prob', 'color_jitter_prob', 'grayscale_prob',
                  'solarize_prob'):
      augs[view][field] = 0.0  # blur alone
    augs[view].blur_sigma_min = 1.0  # every blur visibly changes the image
  augs.lock()
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  images = {'view1': jax.random.uniform(k1, (n, side, side, 3)),
            'view2': jax.random.uniform(k2, (n, side, side, 3))}
  keys = jax.random.split(k3, n)  # one key per example
  out = jax.jit(functools.partial(augmentations.postprocess,
                                  config=augs))(images, keys)
  blurred = {v: float(jnp.mean(jnp.any(out[v] != images[v], axis=(1, 2, 3))))
             for v in ('view1', 'view2')}
  assert blurred['view1'] == 1.0, blurred  # view 1 always blurs
  # View 2: 0.1, within 3 standard deviations of 1000 draws.
  assert abs(blurred['view2'] - 0.1) < 3 * np.sqrt(0.09 / n), blurred
