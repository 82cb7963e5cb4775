"""The config presets: what each variant name changes."""

import pytest

from configs import byol as byol_config


def _flat(config):
  out = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f'{prefix}{key}'
      if hasattr(value, 'items'):
        walk(name + '.', value)
      else:
        out[name] = value

  walk('', config)
  return out


def test_local_long_is_local_run_longer():
  local = _flat(byol_config.get_config('local'))
  long = _flat(byol_config.get_config('local_long'))
  changed = {k for k in local if local[k] != long[k]}
  assert changed == {'training.epochs'}
  assert long['training.epochs'] == byol_config.LOCAL_LONG_EPOCHS == 10.0
  assert local['training.epochs'] == 1.5


def test_unknown_variant_names_the_choices():
  with pytest.raises(ValueError, match='local_long'):
    byol_config.get_config('local_lng')


def test_benchmark_variant_names():
  # experiments/benchmark.py: a variant is a base norm plus config changes
  # (+cpuN, +passN, ...) and whether the step augments (+noaug).
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  assert benchmark.parse_variant('bn+cpu2+noaug') == (
      'bn', {'distributed.cpu_devices': 2})
  assert not benchmark.augments('bn+cpu2+noaug')
  assert benchmark.augments('gn+ws+pass128')
  assert benchmark.parse_variant('gn+ws+lax+pass128') == (
      'gn+ws', {'model.encoder.conv_impl': 'lax',
                'training.images_per_pass': 128})
  for bad in ('bn+cpu0', 'bn+fast', 'gn'):
    with pytest.raises(ValueError, match='unknown'):
      benchmark.parse_variant(bad)
