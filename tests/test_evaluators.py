"""Evaluators built by name from the config and run on the training loop's schedule."""

import itertools
import json
import os

import chex
import jax.numpy as jnp
import pytest

from byol import checkpointing
from byol import train_loop
from byol.errors import ConfigError
from byol.evaluation import registry
from configs import byol as byol_config
from test_experiment import tiny_config


def test_every_scheduled_name_is_a_registered_evaluator():
  for variant in ('', 'local'):
    config = byol_config.get_config(variant)
    names = [name for _, name in registry.schedule(config)]
    assert names == ['collapse', 'online_classifier']
  assert set(registry.DURING_TRAINING) | set(registry.POST_HOC) == set(
      registry.EVALUATORS)


@pytest.mark.parametrize('schedule, message', [
    (((10, 'linear'),), 'does not run during pretraining'),
    (((10, 'nope'),), 'does not run during pretraining'),
    (((0, 'collapse'),), 'positive integer'),
    (((2.5, 'collapse'),), 'positive integer'),
    (((True, 'collapse'),), 'positive integer'),
    ((('collapse',),), r'\(every_steps, name\) pairs'),
])
def test_a_bad_schedule_is_a_config_error(schedule, message):
  config = tiny_config('local', **{'evaluators.schedule': schedule})
  with pytest.raises(ConfigError, match=message):
    registry.schedule(config)


def test_build_refuses_an_unknown_name():
  with pytest.raises(ConfigError, match="unknown evaluator 'nope'"):
    registry.build('nope', None, None)


class _Recorder:
  """Stands in for an evaluator: records the steps it ran at."""

  calls = []

  def __init__(self, name):
    self.name = name

  @classmethod
  def factory(cls, name):
    def from_config(config, network, **kwargs):
      del config, network, kwargs
      return cls(name)
    return from_config

  def run(self, params, state):
    # The loop hands an evaluator unreplicated host values: the [1]-shaped
    # per-device leaves of the fake state arrive as scalars.
    chex.assert_rank([params['w'], state['s']], 0)
    _Recorder.calls.append((self.name, params['w'], state['s']))
    return {f'{self.name}_value': float(len(_Recorder.calls))}


class _Experiment:
  """What the training loop reads of a PretrainExperiment, without a network.

  Every step's loss is 0.5 + step; `state` holds the step count, so an
  evaluator sees the parameters of the step it runs after.
  """

  def __init__(self, config, workdir):
    self.config, self.workdir = config, workdir
    self.is_chief = True
    self.network = None
    self.local_devices = 1  # the train loop's log line names the devices
    self.total_steps = config.training.max_steps
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, 'checkpoints'))
    self.state = None

  def print(self, line):
    del line

  def restore_or_init(self):
    self.state = _State(jnp.zeros((1,)), jnp.zeros((1,)))
    return 0

  def input(self, start):
    return itertools.count(start)

  def step(self, batch, step):
    del batch
    self.state = _State(jnp.full((1,), step + 1.0), jnp.full((1,), -step))
    names = ('loss', 'repr_loss', 'classif_loss', 'proj_std', 'param_norm')
    return {k: jnp.full((1,), 0.5 + step) for k in names}

  def save(self, step):
    del step

  def summary(self):
    return {}


class _State:
  def __init__(self, w, s):
    self.online_params = {'w': w}
    self.online_state = {'s': s}


def test_the_loop_runs_each_evaluator_on_its_own_period_and_at_the_end(
    tmp_path, monkeypatch):
  for name in registry.DURING_TRAINING:
    monkeypatch.setattr(registry.EVALUATORS[name], 'from_config',
                        _Recorder.factory(name))
  _Recorder.calls = []
  config = tiny_config('local', **{
      'training.max_steps': 7, 'training.log_every_steps': 100,
      'training.checkpoint_every_steps': 100,
      'evaluators.schedule': ((2, 'collapse'), (3, 'online_classifier'))})
  train_loop.train(_Experiment(config, str(tmp_path)))
  # Unreplicated online parameters of the step just taken.
  ran = [(name, float(w[()]), float(s[()]))
         for name, w, s in _Recorder.calls]
  assert ran == [('collapse', 2, -1), ('online_classifier', 3, -2),
                 ('collapse', 4, -3), ('collapse', 6, -5),
                 ('online_classifier', 6, -5), ('collapse', 7, -6),
                 ('online_classifier', 7, -6)]
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  # A record at every step an evaluator ran (and the last), with its results.
  assert [r['step'] for r in records] == [2, 3, 4, 6, 7]
  assert 'collapse_value' in records[0] and 'online_classifier_value' not in (
      records[0])
  assert records[1]['online_classifier_value'] == 2.0
  assert records[3]['collapse_value'] == 4.0
  assert records[3]['online_classifier_value'] == 5.0
