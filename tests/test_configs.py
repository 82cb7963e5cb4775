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
