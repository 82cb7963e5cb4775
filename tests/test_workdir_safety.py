"""Nothing lost: one writer per workdir, finished runs left as they are,
every bad number, an unusable `checkpoints` and a full disk one `error:`
line (exit 2) with nothing changed and no workdir left behind."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import zipfile

import chex
import numpy as np
import pytest

import tiny_runs
from byol import checkpointing
from byol import files
from byol.errors import UserError
from test_dm_dill import fixture
from test_dm_dill import run_main_cases
from test_dm_dill import small_import_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = '--config=configs/byol.py:local'


def hold_lock(workdir):
  """A process that takes `workdir`'s lock and sleeps (until killed)."""
  code = ('import sys, time\nfrom byol import files\n'
          'files.WorkdirLock(sys.argv[1]).acquire()\n'
          'print("locked", flush=True)\ntime.sleep(600)\n')
  proc = subprocess.Popen([sys.executable, '-c', code, str(workdir)],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == 'locked'
  return proc


def kill(proc):
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stdout.close()


# ---------------------------------------------------------------------------
# The lock itself.


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
  holder = hold_lock(tmp_path)
  try:
    with pytest.raises(UserError, match=f'in use by process {holder.pid}'):
      files.WorkdirLock(str(tmp_path)).acquire()
  finally:
    kill(holder)


def test_the_lock_of_a_killed_process_does_not_block(tmp_path):
  holder = hold_lock(tmp_path)
  kill(holder)  # SIGKILL: no clean-up ran, the lock file stays
  lock_path = tmp_path / files.LOCK_NAME
  assert lock_path.read_text().strip() == str(holder.pid)
  with files.WorkdirLock(str(tmp_path)):
    assert lock_path.read_text().strip() == str(os.getpid())
  assert not lock_path.exists()  # released: no trace left


def test_prune_keeps_a_living_writers_temporary_file(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, keep=2)
  ckpt.save(1, {'w': np.ones(3, np.float32)})
  sleeper = subprocess.Popen([sys.executable, '-c',
                              'import time; time.sleep(600)'])
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  try:
    living_tmp = tmp_path / f'ckpt_7.npz.tmp-{sleeper.pid}'
    dead_tmp = tmp_path / f'ckpt_5.npz.tmp-{dead.pid}'
    own_tmp = tmp_path / f'ckpt_3.npz.tmp-{os.getpid()}'
    for path in (living_tmp, dead_tmp, own_tmp):
      path.write_bytes(b'partial')
    ckpt.save(2, {'w': np.zeros(3, np.float32)})
    assert living_tmp.exists()  # another writer's file in flight
    assert not dead_tmp.exists() and not own_tmp.exists()  # debris
    assert ckpt.steps() == [1, 2]
  finally:
    sleeper.kill()
    sleeper.wait()


# ---------------------------------------------------------------------------
# A full disk while a checkpoint is written.


def test_a_full_disk_keeps_the_previous_checkpoint_newest(tmp_path,
                                                          monkeypatch):
  ckpt = checkpointing.Checkpointer(tmp_path, keep=3)
  first = {'w': np.arange(4, dtype=np.float32)}
  ckpt.save(2, first)

  def full(*args, **kwargs):
    del args, kwargs
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(zipfile.ZipFile, 'writestr', full)
  with pytest.raises(checkpointing.CheckpointError,
                     match='disk is full.*step 4.*step 2 stays the newest'):
    ckpt.save(4, {'w': np.zeros(4, np.float32)})
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ['ckpt_2.npz']  # no partial file
  state, _ = ckpt.restore(target=first)
  chex.assert_trees_all_equal(state, first)


# ---------------------------------------------------------------------------
# Through main.py: each case one `error:` line, exit 2, nothing changed.

BAD_NUMBERS = [
    ('epochs_nan', ['--config.training.epochs=nan'], 'training.epochs'),
    ('epochs_inf', ['--config.training.epochs=inf'], 'training.epochs'),
    ('warmup_nan', ['--config.training.warmup_epochs=nan'],
     'training.warmup_epochs'),
    ('base_lr_inf', ['--config.training.base_lr=-inf'], 'training.base_lr'),
    ('momentum_nan', ['--config.training.momentum=nan'], 'training.momentum'),
    ('negative_weight_decay', ['--config.training.weight_decay=-1'],
     'training.weight_decay'),
    ('batch_1e9', ['--config.training.batch_size=1000000000'],
     'training.batch_size=1000000000'),
    ('max_steps_2_40', ['--config.training.max_steps=1099511627776'],
     'at most 2147483647'),
    ('epochs_1e15', ['--config.training.epochs=1e15'], 'at most 2147483647'),
]


def test_bad_numbers_locks_checkpoints_and_full_disks_through_main(tmp_path):
  cases, checks = [], []
  for name, args, fragment in BAD_NUMBERS:
    cases.append([LOCAL, f'--workdir={tmp_path / name}', *args])
    checks.append((name, fragment))

  # A run writing in the workdir: a second one is refused, nothing touched.
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'config.json').write_text('{}')
  holder = hold_lock(busy)
  # The lock left behind by a SIGKILLed run: it does not block.
  stale = tmp_path / 'stale'
  stale.mkdir()
  kill(hold_lock(stale))
  # `checkpoints` a file, not a folder.
  odd = tmp_path / 'odd'
  odd.mkdir()
  (odd / 'checkpoints').write_text('not a folder')
  before = {d: tiny_runs.snapshot(d) for d in (busy, odd)}
  cases += [
      [LOCAL, *tiny_runs.TINY[1:], f'--workdir={busy}'],
      small_import_args(fixture('0.4.1'), stale),
      [LOCAL, *tiny_runs.TINY[1:], f'--workdir={odd}'],
      {'args': small_import_args(fixture('0.4.1'), tmp_path / 'full'),
       'full_disk': True},
  ]
  try:
    results = run_main_cases(cases, tmp_path)
  finally:
    kill(holder)

  for (name, fragment), result in zip(checks, results):
    tiny_runs.assert_user_error(result, fragment)
    assert not (tmp_path / name).exists(), name  # no empty workdir left
  busy_run, stale_run, odd_run, full_run = results[len(checks):]
  tiny_runs.assert_user_error(busy_run, f'in use by process {holder.pid}')
  tiny_runs.assert_user_error(odd_run, 'checkpoints', 'not the folder')
  for d in (busy, odd):
    assert tiny_runs.snapshot(d) == before[d]
  assert stale_run.returncode == 0, stale_run.stderr[-2000:]
  assert os.listdir(stale / 'checkpoints') == ['ckpt_3.npz']
  assert not (stale / files.LOCK_NAME).exists()
  tiny_runs.assert_user_error(full_run, 'disk is full')
  assert os.listdir(tmp_path / 'full' / 'checkpoints') == []


# ---------------------------------------------------------------------------
# A finished run stays finished.


# A main.py run in a copy of the session's reference run: beside the other
# tests that read it, so that one worker makes it once.
@pytest.mark.slow
@pytest.mark.xdist_group('reference_run')
def test_rerunning_a_finished_run_changes_nothing(tmp_path_factory, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(tiny_runs.reference_run(tmp_path_factory), workdir)
  before = tiny_runs.snapshot(workdir)
  summary = tiny_runs.summary(workdir)
  result = tiny_runs.run(tmp_path_factory, tiny_runs.TINY, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [l for l in result.stdout.splitlines() if l.startswith('[train]')]
  assert lines == [
      '[train] resuming from the checkpoint of step 6',
      "[train] finished already: the checkpoint of step 6 is the run's last; "
      'nothing was changed (a longer run, with another training.max_steps or '
      'epochs, is a new run: use another --workdir)'], result.stdout
  assert result.stderr == ''
  assert tiny_runs.snapshot(workdir) == before  # sha256, size and mtime
  assert 'loss' in summary and summary['wall_time_sec'] > 0.01
