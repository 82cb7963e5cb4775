"""Scale-out: results do not depend on how the global batch is split.

The same global batch on 4 forced CPU devices, in 1 process or in 2
processes of 2 devices over loopback, gives the same augmentations and, with
GroupNorm + WS (no batch statistics) or cross-replica BatchNorm, the same
training trajectory up to float rounding. End to end, with tiny `main.py`
runs (`tiny_runs`) whose network has both: a GN+WS encoder and BatchNorm
projector/predictor. (tests/test_experiment.py compares 1 device with 4 in
one process; tests/test_main.py checks that a batch the devices do not
divide is an error.)
"""

import functools
import os
import re
import signal

import chex
import jax
import numpy as np
import pytest

import tiny_runs
from byol import augmentations
from byol import distributed
from byol.errors import ConfigError
from configs import byol as byol_config

# Every process reads its rows of one data stream: see same_data_main.py.
SAME_DATA = 'tests/same_data_main.py'


def test_cpu_devices_cannot_change_once_jax_runs():
  # distributed.cpu_devices acts before JAX starts (main.py sets it first;
  # tests/test_main.py runs it end to end); later it is a clear error.
  assert jax.local_device_count() == 4  # JAX is running (conftest's 4)
  with pytest.raises(ConfigError, match='before JAX starts'):
    distributed.set_cpu_devices(2)


def test_an_example_augmentation_depends_on_its_key_only():
  config = byol_config.get_config().data.augmentations
  rng = np.random.RandomState(0)
  batch = {v: rng.uniform(size=(4, 8, 8, 3)).astype(np.float32)
           for v in ('view1', 'view2')}
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(
      np.arange(4))
  augment = jax.jit(functools.partial(augmentations.postprocess,
                                      config=config))
  whole = augment(batch, keys)
  # The last two examples alone, as on another device: the same views.
  part = augment(jax.tree.map(lambda x: x[2:], batch), keys[2:])
  chex.assert_trees_all_equal(part, jax.tree.map(lambda x: x[2:], whole))
  for v in ('view1', 'view2'):
    assert not np.array_equal(whole[v][0], whole[v][1])
  # One key per example: raw uint32 keys are accepted too.
  raw = augment(batch, jax.random.key_data(keys))
  chex.assert_trees_all_equal(raw['view1'], whole['view1'])


def assert_same_trajectory(a, b):
  """Same logged losses, parameters and BN statistics up to float rounding.

  Rounding differences (another reduction order) grow over training steps,
  and a bias followed by BatchNorm gets pure-rounding gradients, so the
  parameters are compared as a whole (relative L2 distance), and against how
  far training moved them.
  """
  np.testing.assert_allclose(tiny_runs.losses(a), tiny_runs.losses(b),
                             rtol=1e-5)

  def flat(workdir, prefix, step=None):
    leaves = tiny_runs.checkpoint_leaves(workdir, step, prefix)
    return np.concatenate([leaves[k].ravel() for k in sorted(leaves)])

  for prefix in ('.online_params', '.target_params', '.online_state'):
    pa, pb = flat(a, prefix), flat(b, prefix)
    assert pa.shape == pb.shape
    distance = np.linalg.norm(pa - pb)
    assert distance <= 1e-5 * np.linalg.norm(pb), (prefix, distance)
    assert np.abs(pa - pb).max() <= 1e-4, prefix
  # Training moved the parameters far more than the layouts differ.
  moved = np.linalg.norm(flat(b, '.online_params') -
                         flat(b, '.online_params', step=2))
  assert moved > 100 * np.linalg.norm(flat(a, '.online_params') -
                                      flat(b, '.online_params'))


def _start_pair(tmp_path_factory, workdir, logs):
  port = tiny_runs.free_port()
  return [
      tiny_runs.start(
          tmp_path_factory, tiny_runs.TINY + [
              f'--config.distributed.coordinator_address=127.0.0.1:{port}',
              '--config.distributed.num_processes=2',
              f'--config.distributed.process_id={pid}'],
          workdir, logs[pid], num_devices=2, script=SAME_DATA)
      for pid in range(2)]


@pytest.mark.slow
@pytest.mark.xdist_group('reference_run')
def test_two_processes_of_two_devices_train_like_one_of_four(
    tmp_path_factory, tmp_path):
  """2 processes x 2 CPU devices, over loopback, preempted once and resumed,
  == 1 process x 4 devices uninterrupted (the reference run), with the same
  global batch."""
  tiny_runs.start_reference(tmp_path_factory)  # if need be, beside the pair
  workdir = tmp_path / 'run'
  logs = [tmp_path / f'process_{pid}.log' for pid in range(2)]
  tail = lambda: [log.read_text()[-3000:] for log in logs]

  # SIGTERM to process 1 alone: JAX's preemption service makes both
  # processes checkpoint the same step and stop.
  procs = _start_pair(tmp_path_factory, workdir, logs)
  tiny_runs.wait_for(lambda: '[train] step 1/6' in logs[0].read_text(),
                     procs[0])
  procs[1].send_signal(signal.SIGTERM)
  assert tiny_runs.wait_all(procs) == [143, 143], tail()
  stopped = [re.findall(r'saved the checkpoint of step (\d+)', log.read_text())
             for log in logs]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, tail()
  step = int(stopped[0][0])
  assert 2 <= step < 6 and (workdir / 'checkpoints' / f'ckpt_{step}.npz'
                            ).exists()

  # The same command (on another port) resumes and finishes.
  procs = _start_pair(tmp_path_factory, workdir, logs)
  assert tiny_runs.wait_all(procs) == [0, 0], tail()
  for log in logs:
    text = log.read_text()
    assert f'resuming from the checkpoint of step {step}' in text
    assert '4 device(s)' in text and 'done: step 6' in text, text[-2000:]
  assert_same_trajectory(workdir, tiny_runs.reference_run(tmp_path_factory))
  # Only process 0 wrote metrics (6 records, not 12) and the summary.
  assert len(tiny_runs.losses(workdir)) == 6
  assert tiny_runs.summary(workdir)['step'] == 6


BAD_CLUSTERS = {
    'process_id_out_of_range': (
        ['--config.distributed.coordinator_address=127.0.0.1:8476',
         '--config.distributed.num_processes=2',
         '--config.distributed.process_id=2'], ['process_id=2']),
    'address_without_port': (
        ['--config.distributed.coordinator_address=127.0.0.1'],
        ['host:port']),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(BAD_CLUSTERS))
def test_bad_cluster_config_is_one_error_line(tmp_path_factory, tmp_path,
                                              name):
  args, fragments = BAD_CLUSTERS[name]
  result = tiny_runs.run(tmp_path_factory, tiny_runs.TINY + args,
                         tmp_path / 'w', timeout=120)
  tiny_runs.assert_user_error(result, *fragments)
  assert not (tmp_path / 'w').exists()  # no workdir left behind
