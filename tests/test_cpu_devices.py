"""The CPU device count a run takes: `distributed.cpu_device_count`'s rule,
and runs of one process that take different counts (a study's BN and GN+WS
rows).

The same function on any count is `tests/test_experiment.py`'s
1-vs-4-device test.
"""

import math
import os
import subprocess
import sys
import textwrap

import chex
import jax
import pytest

from byol import distributed
from byol.errors import ConfigError
from configs import byol as byol_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(variant='local', **overrides):
  c = byol_config.get_config(variant)
  c.unlock()
  c.update_from_flattened_dict(overrides)
  c.lock()
  return c


@pytest.mark.parametrize('variant,overrides,cores,expected', [
    # Batch statistics and a batch of 256 that splits per core: one per core.
    ('local,bn', {}, 2, 2),
    ('local,bn', {}, 4, 4),
    ('local,bn,simclr', {}, 2, 2),
    # BatchNorm in the encoder alone is enough.
    ('local', {'model.encoder.norm': 'bn'}, 2, 2),
    # 256 does not split over 3 cores: one device.
    ('local,bn', {}, 3, 1),
    # Accumulation: 256 = 2 devices x 2 steps x 64 divides; 36 = 4 steps x 9
    # does not split over 2 devices.
    ('local,bn', {'training.accumulation_steps': 2}, 2, 2),
    ('local,bn', {'training.batch_size': 36,
                  'training.accumulation_steps': 4}, 2, 1),
    ('local,bn', {}, 1, 1),
    # No batch statistics in training: GN+WS, none, the BN-init protocol
    # (its BatchNorm becomes `affine` before the first step).
    ('local', {}, 2, 1),
    ('local', {'model.encoder.norm': 'none', 'model.projector.norm': 'none',
               'model.predictor.norm': 'none'}, 2, 1),
    ('local,bn_init', {}, 2, 1),
    # An explicit count is taken as it is: 1 turns the rule off.
    ('local,bn', {'distributed.cpu_devices': 1}, 2, 1),
    ('local', {'distributed.cpu_devices': 2}, 4, 2),
])
def test_the_automatic_cpu_device_count(variant, overrides, cores, expected):
  c = config(variant, **overrides)
  assert c.distributed.cpu_devices == overrides.get(
      'distributed.cpu_devices', 0)  # 0, automatic, is the default
  assert distributed.cpu_device_count(c, cores=cores) == expected


def test_the_rule_gives_way_to_a_count_jax_runs_with():
  # conftest.py forced 4 devices through XLA_FLAGS and JAX runs: the
  # automatic rule keeps them (a test, or a user who chose the count)...
  assert jax.local_device_count() == 4
  assert distributed.start_cpu_devices([config('local,bn')]) == (
      distributed.cpu_device_count(config('local,bn')))
  assert jax.local_device_count() == 4
  chex.assert_equal(len(distributed.local_training_devices(config('local'))), 4)
  # ...while an explicit count that cannot take effect is an error.
  with pytest.raises(ConfigError, match='before JAX starts'):
    distributed.start_cpu_devices([config('local,bn',
                                          **{'distributed.cpu_devices': 2})])


_MIXED = textwrap.dedent('''
    import chex, jax, numpy as np
    from byol import distributed, experiment
    from configs import byol as byol_config
    distributed.available_cores = lambda: 2  # any machine: as on 2 cores

    def tiny(variant):
      c = byol_config.get_config(variant)
      c.unlock()
      c.model.encoder.width_multiplier = 0.125
      c.model.encoder.num_groups = 4
      for head in ('projector', 'predictor'):
        c.model[head].hidden_size = 32
        c.model[head].output_size = 16
        c.model[head].num_groups = 4
      c.data.image_size = 16
      c.training.batch_size = 8
      c.training.max_steps = 2
      c.lock()
      return c

    configs = [tiny('local'), tiny('local,bn')]
    print('started', distributed.start_cpu_devices(configs),
          jax.local_device_count())
    for c, name in zip(configs, ('gn', 'bn')):
      exp = experiment.PretrainExperiment(c, '/nonexistent')
      exp.state = exp.initial_state()
      n, b = exp.local_devices, exp.per_device_batch
      x = np.random.RandomState(0).uniform(size=(n, 1, b, 16, 16, 3))
      batch = {'view1': x.astype(np.float32),
               'view2': x[..., ::-1].astype(np.float32),
               'labels': np.zeros((n, 1, b), np.int32)}
      logs = exp.step(jax.tree.map(lambda a: jax.device_put(a, exp.sharding),
                                   batch), 0)
      chex.assert_tree_all_finite(logs)  # every device's step, not only the first
      chex.assert_axis_dimension(logs['loss'], 0, n)
      print(name, n, b, float(logs['loss'][0]))
''')


@pytest.mark.slow
def test_a_study_runs_bn_rows_per_core_and_others_on_one_device():
  # A fresh process without the tests' forced device count, as a study
  # (experiments/study.py) starts: BatchNorm rows get one device per core,
  # GN+WS rows the first of them, in the same process.
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(flags))
  out = subprocess.run([sys.executable, '-c', _MIXED], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(l.split(' ', 1) for l in out.stdout.splitlines())
  assert lines['started'] == '2 2'
  gn, bn = lines['gn'].split(), lines['bn'].split()
  assert gn[:2] == ['1', '8']  # one device, the whole batch
  assert bn[:2] == ['2', '4']  # one per core, half the batch each
  assert math.isfinite(float(gn[2])) and math.isfinite(float(bn[2]))
