"""Tests of byol.checkpointing: round trips, atomicity, pruning, errors."""

import json
import os
from typing import NamedTuple
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_runs
from byol import checkpointing
from byol import optimizers


class TrainState(NamedTuple):
  online_params: dict
  target_params: dict
  online_state: dict
  target_state: dict
  opt_state: tuple


def _state(seed=0, hidden=8):
  rng = np.random.default_rng(seed)
  params = {
      'mlp/~/linear_0': {'w': rng.standard_normal((5, hidden)),
                         'b': rng.standard_normal(hidden)},
      'mlp/~/groupnorm_0': {'scale': rng.standard_normal(hidden)},
  }
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  net_state = {'mlp/~/batchnorm': {'mean_ema': np.arange(3, dtype=np.float32)}}
  opt_state = optimizers.lars(0.1, weight_decay=1e-6).init(params)
  opt_state = jax.tree.map(
      lambda x: x + jnp.asarray(rng.standard_normal(np.shape(x)), x.dtype),
      opt_state)
  return TrainState(params, jax.tree.map(lambda x: x * 2, params), net_state,
                    {}, opt_state)


def _assert_trees_identical(a, b):
  chex.assert_trees_all_equal_structs(a, b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def ckpt(tmp_path):
  return checkpointing.Checkpointer(tmp_path, keep=3)


def test_round_trip_is_bit_identical(ckpt):
  state = _state()
  metadata = {'step': 7, 'config': 'abc123', 'rng': np.array([1, 2],
                                                             np.uint32)}
  ckpt.save(7, state, metadata)
  assert ckpt.latest_step() == 7
  restored, meta = ckpt.restore(target=_state(seed=1))
  _assert_trees_identical(restored, state)
  assert isinstance(restored, TrainState)
  assert isinstance(restored.online_params['mlp/~/linear_0']['w'], np.ndarray)
  assert meta == {'step': 7, 'config': 'abc123', 'rng': [1, 2]}


def test_restore_into_shape_dtype_target(ckpt):
  state = _state()
  ckpt.save(1, state, {})
  target = jax.eval_shape(lambda: state)
  restored, _ = ckpt.restore(1, target=target)
  _assert_trees_identical(restored, state)


def test_special_dtypes_and_scalars(ckpt):
  key = jax.random.key(3)
  state = {'bf16': jnp.arange(4, dtype=jnp.bfloat16) / 3,
           'count': jnp.int32(5), 'flag': np.bool_(True), 'key': key,
           'transposed': np.arange(6, dtype=np.float32).reshape(2, 3).T}
  ckpt.save(2, state, {})
  restored, _ = ckpt.restore(target=jax.eval_shape(lambda: state))
  assert restored['bf16'].dtype == jnp.bfloat16
  np.testing.assert_array_equal(restored['bf16'].view(np.uint16),
                                np.asarray(state['bf16']).view(np.uint16))
  assert restored['count'].shape == ()
  assert int(restored['count']) == 5
  np.testing.assert_array_equal(restored['transposed'],
                                [[0., 3.], [1., 4.], [2., 5.]])
  np.testing.assert_array_equal(jax.random.key_data(restored['key']),
                                jax.random.key_data(key))


def test_keeps_last_n(ckpt):
  for step in (10, 20, 30, 40, 50):
    ckpt.save(step, _state(), {'step': step})
  assert ckpt.steps() == [30, 40, 50]
  assert len(os.listdir(ckpt.directory)) == 3
  _, meta = ckpt.restore(30, target=_state())
  assert meta['step'] == 30


def test_interrupted_write_leaves_previous_checkpoint(ckpt):
  state = _state()
  ckpt.save(100, state, {'step': 100})
  # A writer killed mid-way through step 200 leaves a truncated temporary
  # file (and possibly an empty one); neither must be visible.
  with open(os.path.join(ckpt.directory,
                         'ckpt_200.npz.tmp-99999'), 'wb') as f:
    f.write(b'PK\x03\x04 half a zip')
  # Even one with our own pid (a restarted container reuses pid 1).
  stray = f'ckpt_300.npz.tmp-{os.getpid()}'
  open(os.path.join(ckpt.directory, stray), 'wb').close()
  assert ckpt.latest_step() == 100
  restored, meta = ckpt.restore(target=state)
  _assert_trees_identical(restored, state)
  assert meta['step'] == 100
  # The next successful save clears the debris.
  ckpt.save(200, state, {'step': 200})
  assert sorted(os.listdir(ckpt.directory)) == ['ckpt_100.npz', 'ckpt_200.npz']


def test_truncated_file_raises(ckpt):
  ckpt.save(5, _state(), {})
  path = os.path.join(ckpt.directory, 'ckpt_5.npz')
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(checkpointing.CheckpointError,
                     match='corrupt or truncated'):
    ckpt.restore(target=_state())


def test_flipped_byte_raises(ckpt):
  ckpt.save(5, _state(), {})
  tiny_runs.damage_array_bytes(
      os.path.join(ckpt.directory, 'ckpt_5.npz'), 'leaf_3.npy')
  with pytest.raises(checkpointing.CheckpointError, match='corrupt'):
    ckpt.restore(target=_state())


def test_tampered_checksum_raises(ckpt):
  # A consistent zip whose array no longer matches its recorded SHA-256.
  ckpt.save(5, _state(), {})
  path = os.path.join(ckpt.directory, 'ckpt_5.npz')
  with zipfile.ZipFile(path) as zf:
    members = {name: zf.read(name) for name in zf.namelist()}
  index = json.loads(members['checkpoint.json'])
  index['leaves'][0]['sha256'] = '0' * 64
  members['checkpoint.json'] = json.dumps(index).encode()
  with zipfile.ZipFile(path, 'w') as zf:
    for name, data in members.items():
      zf.writestr(name, data)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"checksum mismatch for "
                     r".online_params\['mlp/~/groupnorm_0'\]"):
    ckpt.restore(target=_state())


def test_shape_mismatch_names_the_path(ckpt):
  ckpt.save(1, _state(hidden=8), {})
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"at .online_params\['mlp/~/groupnorm_0'\]"
                     r"\['scale'\]: saved float32\[8\], model float32\[16\]"):
    ckpt.restore(target=_state(hidden=16))


def test_structure_mismatch_names_the_path(ckpt):
  ckpt.save(1, _state(), {})
  other = _state()._replace(target_state={'mlp/~/batchnorm': {'var': 0.}})
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"model has .target_state"
                     r"\['mlp/~/batchnorm'\]\['var'\]"):
    ckpt.restore(target=other)


def test_missing_checkpoint_raises(ckpt):
  assert ckpt.latest_step() is None
  with pytest.raises(checkpointing.CheckpointError,
                     match='no checkpoint found'):
    ckpt.restore(target=_state())
  ckpt.save(3, _state(), {})
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'no checkpoint for step 4 .*have: \[3\]'):
    ckpt.restore(4, target=_state())


def test_restore_without_target_gives_flat_dict(ckpt):
  state = _state()
  ckpt.save(1, state, {})
  flat, _ = ckpt.restore()
  np.testing.assert_array_equal(
      flat[".online_params['mlp/~/linear_0']['w']"],
      state.online_params['mlp/~/linear_0']['w'])
  assert len(flat) == len(jax.tree.leaves(state))


