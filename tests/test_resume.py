"""Fault tolerance: kills, preemption, divergence and unusable checkpoints.

End to end, with tiny `main.py` runs in subprocesses (`tiny_runs`): a run
killed at any point and restarted with the same command ends bit-identical to
an uninterrupted one; SIGTERM checkpoints and exits 143, Ctrl-C 130; a
non-finite loss or parameter norm stops the run before anything is
overwritten; a corrupt or mismatched checkpoint, a damaged config.json or
metrics.jsonl is one `error:` line with the workdir left as it was.

The first test's runs must follow one another, and so use one CPU core: the
reference run (started in the background) and then the runs in damaged copies
of its workdir use the other one meanwhile.
"""

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import zipfile

import numpy as np
import pytest

import tiny_runs
from tiny_runs import TINY

# main.py runs end to end, sharing the session's reference run (one worker).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('reference_run')]


def _steps(workdir):
  names = os.listdir(workdir / 'checkpoints')
  return sorted(int(m.group(1)) for m in
                (re.match(r'^ckpt_(\d+)\.npz$', n) for n in names) if m)


def test_killed_then_preempted_run_ends_like_an_uninterrupted_one(
    tmp_path_factory, tmp_path, damaged_runs):
  del damaged_runs  # Set up first only to run beside this test's own runs.
  workdir = tmp_path / 'run'
  log = tmp_path / 'run.log'

  # 1. SIGKILL as soon as the step-2 checkpoint is in place. (This run only
  # reads the compilation cache: the reference run fills it first.)
  tiny_runs.wait_reference_compiled(tmp_path_factory)
  proc = tiny_runs.start(tmp_path_factory, TINY, workdir, log,
                         cache_writes=False)
  tiny_runs.wait_for(
      lambda: (workdir / 'checkpoints' / 'ckpt_2.npz').exists(), proc)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  assert _steps(workdir) == [2], log.read_text()[-2000:]
  assert not (workdir / 'summary.json').exists()

  # 2. The same command resumes from step 2; SIGTERM (preemption) once it
  # has logged a step: it saves the step reached and exits 143.
  proc = tiny_runs.start(tmp_path_factory, TINY, workdir, log)
  tiny_runs.wait_for(
      lambda: re.search(r'resuming from the checkpoint of step 2\n'
                        r'(.*\n)*\[train\] step [3-6]/6', log.read_text()),
      proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 143, log.read_text()[-2000:]
  preempted = re.findall(r'preempted: SIGTERM: saved the checkpoint of step '
                         r'(\d+)', log.read_text())
  assert len(preempted) == 1, log.read_text()[-2000:]
  assert 3 <= int(preempted[0]) < 6
  assert _steps(workdir)[-1] == int(preempted[0])

  # 3. The same command finishes the run: bit-identical parameters, and the
  # same logged losses, once each (records after a checkpoint are redone).
  result = tiny_runs.run(tmp_path_factory, TINY, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  reference = tiny_runs.reference_run(tmp_path_factory)
  assert (tiny_runs.summary(workdir)['online_params_sha256'] ==
          tiny_runs.summary(reference)['online_params_sha256'])
  assert tiny_runs.losses(workdir) == tiny_runs.losses(reference)
  assert [json.loads(l)['step'] for l in
          (workdir / 'metrics.jsonl').read_text().splitlines()] == [
              1, 2, 3, 4, 5, 6]


def _ctrl_c(tmp_path_factory, tmp_path, times):
  """A TINY run sent SIGINT `times` times once it has logged a step; returns
  its workdir and its output, after asserting exit status 130."""
  workdir = tmp_path / 'run'
  log = tmp_path / 'run.log'
  # A second Ctrl-C stops the run wherever it is, as a kill would.
  proc = tiny_runs.start(tmp_path_factory, TINY, workdir, log,
                         cache_writes=times == 1)
  tiny_runs.wait_for(
      lambda: re.search(r'\[train\] step [1-4]/6', log.read_text()), proc)
  for _ in range(times):
    proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=120) == 130, log.read_text()[-2000:]
  text = log.read_text()
  assert 'Traceback' not in text and 'KeyboardInterrupt' not in text, text
  return workdir, text


def test_ctrl_c_checkpoints_the_step_reached_and_exits_130(tmp_path_factory,
                                                         tmp_path):
  workdir, text = _ctrl_c(tmp_path_factory, tmp_path, times=1)
  saved = re.findall(r'interrupted: SIGINT: saved the checkpoint of step '
                     r'(\d+); rerun the same command', text)
  assert len(saved) == 1, text[-2000:]
  # The step in flight was finished and checkpointed, not the one before.
  logged = [int(s) for s in re.findall(r'\[train\] step (\d+)/6', text)]
  assert 2 <= int(saved[0]) < 6 and int(saved[0]) >= max(logged)
  assert _steps(workdir)[-1] == int(saved[0])
  assert not (workdir / 'summary.json').exists()


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path_factory,
                                                          tmp_path):
  _, text = _ctrl_c(tmp_path_factory, tmp_path, times=2)
  # Whichever came first -- the loop's checkpoint or the second signal --
  # the run says so in one line.
  assert len(re.findall(r'^interrupted: ', text, re.M)) == 1, text[-2000:]


_WRITER = textwrap.dedent('''
    import sys
    import numpy as np
    from byol import checkpointing
    ckpt = checkpointing.Checkpointer(sys.argv[1], keep=2)
    step = 0
    while True:
      step += 1
      # ~24 MB per checkpoint: each write takes a while.
      ckpt.save(step, {'w': np.full((6, 1024, 1024), step, np.float32)},
                {'step': step})
''')


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
  """SIGKILL while a checkpoint is being written (a `.tmp-` file exists)."""
  from byol import checkpointing  # pylint: disable=g-import-not-at-top
  # A kill that lands just after a rename leaves no temporary file; try again
  # then (each write takes tens of ms, the kill about one).
  for attempt in range(3):
    directory = tmp_path / f'checkpoints_{attempt}'
    proc = subprocess.Popen(
        [sys.executable, '-c', _WRITER, str(directory)], cwd=tiny_runs.ROOT,
        env=dict(os.environ, JAX_PLATFORMS='cpu'))
    try:
      tiny_runs.wait_for(
          lambda: directory.exists() and
          any(n.endswith('.npz') for n in os.listdir(directory)) and
          any('.tmp-' in n for n in os.listdir(directory)),
          proc, timeout=120, poll=0.001)
      proc.kill()
    finally:
      proc.wait()
    ckpt = checkpointing.Checkpointer(directory)
    step = ckpt.latest_step()
    assert step is not None and step >= 1
    state, meta = ckpt.restore()
    assert meta['step'] == step
    np.testing.assert_array_equal(state["['w']"], np.float32(step))
    if any('.tmp-' in n for n in os.listdir(directory)):
      break
  else:
    pytest.fail('no kill landed during a write in 3 attempts')


def _edit_checkpoint(path, leaf, fn):
  """Rewrites one leaf of a checkpoint, keeping the file self-consistent."""
  with zipfile.ZipFile(path) as zf:
    members = {name: zf.read(name) for name in zf.namelist()}
  index = json.loads(members['checkpoint.json'])
  entry = next(e for e in index['leaves'] if e['path'] == leaf)
  array = fn(np.load(io.BytesIO(members[entry['member']])))
  buffer = io.BytesIO()
  np.save(buffer, array)
  members[entry['member']] = buffer.getvalue()
  entry['sha256'] = hashlib.sha256(buffer.getvalue()).hexdigest()
  members['checkpoint.json'] = json.dumps(index).encode()
  with zipfile.ZipFile(path, 'w') as zf:
    for name, data in members.items():
      zf.writestr(name, data)


# --- damaged workdirs: one error line, nothing overwritten ------------------


def _truncate(workdir):
  path = workdir / 'checkpoints' / 'ckpt_6.npz'
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _flip_a_byte(workdir):
  tiny_runs.damage_array_bytes(workdir / 'checkpoints' / 'ckpt_6.npz',
                               'leaf_5.npy', mask=0x01)


def _other_architecture(workdir):
  # A config.json that matches the command below, beside checkpoints of the
  # narrower net: only the checkpoint's shapes can tell.
  path = workdir / 'config.json'
  config = json.loads(path.read_text())
  config['model']['encoder']['width_multiplier'] = 0.25
  path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _nothing(workdir):
  del workdir


def _no_checkpoints(workdir):
  shutil.rmtree(workdir / 'checkpoints')


def _explode_momentum(workdir):
  # Resume from step 4 with an exploding LARS momentum: step 5's loss is
  # still finite (computed before the update), its parameters are not.
  os.remove(workdir / 'checkpoints' / 'ckpt_6.npz')
  os.remove(workdir / 'summary.json')
  _edit_checkpoint(workdir / 'checkpoints' / 'ckpt_4.npz',
                   ".opt_state[2].trace['classifier']['w']",
                   lambda x: np.full_like(x, 1e38))


def _nan_parameter(workdir):
  # Resume from step 4 with one NaN in the online classifier: step 5's loss
  # is NaN.
  os.remove(workdir / 'checkpoints' / 'ckpt_6.npz')
  os.remove(workdir / 'summary.json')

  def poison(x):
    x = x.copy()
    x.flat[0] = np.nan
    return x

  _edit_checkpoint(workdir / 'checkpoints' / 'ckpt_4.npz',
                   ".online_params['classifier']['w']", poison)


def _broken_config_json(workdir):
  (workdir / 'config.json').write_text('{broken')


def _broken_checkpoint_index(workdir):
  # The index member of the newest checkpoint is cut short; the arrays are
  # intact.
  path = workdir / 'checkpoints' / 'ckpt_6.npz'
  with zipfile.ZipFile(path) as zf:
    members = {name: zf.read(name) for name in zf.namelist()}
  members['checkpoint.json'] = members['checkpoint.json'][:40]
  with zipfile.ZipFile(path, 'w') as zf:
    for name, data in members.items():
      zf.writestr(name, data)


def _resume_from_step_4(workdir):
  # A resumed run reads metrics.jsonl to drop the records after step 4.
  os.remove(workdir / 'checkpoints' / 'ckpt_6.npz')
  os.remove(workdir / 'summary.json')


def _garbled_metrics(workdir):
  _resume_from_step_4(workdir)
  path = workdir / 'metrics.jsonl'
  lines = path.read_text().splitlines(keepends=True)
  lines[2] = '{"step": 3, "loss": 4.1\x00\x00 garbage\n'
  path.write_text(''.join(lines))


def _binary_metrics(workdir):
  _resume_from_step_4(workdir)
  path = workdir / 'metrics.jsonl'
  path.write_bytes(path.read_bytes()[:100] + b'\xff\xfe\x00\x81' * 8)


WIDER = '--config.model.encoder.width_multiplier=0.25'
EVAL = ['--config=configs/eval.py:local,fast']
# name: (how a copy of the reference workdir is damaged, command, expected
# fragments of the error line)
BAD_WORKDIRS = {
    'truncated_checkpoint': (_truncate, TINY, ['ckpt_6.npz',
                                               'corrupt or truncated']),
    'corrupt_checkpoint': (_flip_a_byte, TINY, ['ckpt_6.npz', 'corrupt']),
    'different_config': (_nothing, TINY + [WIDER],
                         ['different config', 'width_multiplier']),
    'checkpoint_of_another_architecture': (
        _other_architecture, TINY + [WIDER],
        ['ckpt_6.npz', 'does not match the model']),
    'eval_without_checkpoint': (_no_checkpoints, EVAL, ['no checkpoint']),
    'broken_config_json': (_broken_config_json, TINY,
                           ['config.json is not valid JSON', 'delete it']),
    'broken_checkpoint_index': (
        _broken_checkpoint_index, TINY,
        ['ckpt_6.npz is corrupt', 'checkpoint.json', 'earlier checkpoint']),
    'garbled_metrics': (_garbled_metrics, TINY,
                        ['metrics.jsonl is garbled at line 3',
                         'move it aside']),
    'binary_metrics': (_binary_metrics, TINY,
                       ['metrics.jsonl is not text', 'move it aside']),
}
DIVERGING = {
    'exploding_momentum': (_explode_momentum, TINY,
                           ["the parameters' norm became inf"]),
    'nan_parameter': (_nan_parameter, TINY, ['the loss became nan']),
}


class _Run:
  """A main.py run in a damaged copy of the reference workdir: one case of a
  `_Batch`."""

  def __init__(self, tmp_path_factory, base, name, damage, args):
    self.workdir = base / name
    shutil.copytree(tiny_runs.reference_run(tmp_path_factory), self.workdir)
    damage(self.workdir)
    self.before = tiny_runs.snapshot(self.workdir)
    self.args = [f'--workdir={self.workdir}', *args]
    self.batch, self.index = None, None
    self._result = None
    self.after = None

  def result(self):
    """Waits for the run; its CompletedProcess (and `after`, a snapshot)."""
    if self._result is None:
      r = self.batch.results()[self.index]
      self._result = subprocess.CompletedProcess(
          ['main.py', *self.args], r['returncode'], r['stdout'], r['stderr'])
      self.after = tiny_runs.snapshot(self.workdir)
    return self._result


class _Batch:
  """The runs of `_Run`s forked from one process that imported main.py once
  (tests/main_cases.py): each `python main.py` start would otherwise import
  JAX and TensorFlow again. Every child is main.py's `main` on its own argv,
  with its own stdout, stderr and exit status."""

  def __init__(self, tmp_path_factory, base, runs):
    for i, run in enumerate(runs):
      run.batch, run.index = self, i
    cases, self._results = base / 'cases.json', base / 'results.json'
    cases.write_text(json.dumps([run.args for run in runs]))
    self._log = base / 'batch.log'
    with open(self._log, 'w') as log:
      self.proc = subprocess.Popen(
          [sys.executable, os.path.join('tests', 'main_cases.py'),
           str(cases), str(self._results)],
          cwd=tiny_runs.ROOT, env=tiny_runs.env(tmp_path_factory),
          stdout=log, stderr=subprocess.STDOUT)
    self._loaded = None

  def results(self):
    if self._loaded is None:
      code = tiny_runs.wait_all([self.proc])[0]
      assert code == 0, self._log.read_text()[-3000:]
      self._loaded = json.loads(self._results.read_text())
    return self._loaded


@pytest.fixture(scope='module')
def damaged_runs(tmp_path_factory):
  """Every BAD_WORKDIRS and DIVERGING run, in the background.

  A thread waits for the reference run (started here if need be), then
  damages a copy of it for each and starts them as one `_Batch`; each test
  waits for its own (`get(name)`).
  """
  base = tmp_path_factory.mktemp('damaged')
  runs, failure, batch = {}, [], []

  def launch():
    try:
      for name, (damage, args, _) in {**BAD_WORKDIRS, **DIVERGING}.items():
        runs[name] = _Run(tmp_path_factory, base, name, damage, args)
      batch.append(_Batch(tmp_path_factory, base, list(runs.values())))
    except BaseException as e:  # pylint: disable=broad-except
      failure.append(e)

  tiny_runs.start_reference(tmp_path_factory)
  thread = threading.Thread(target=launch, daemon=True)
  thread.start()

  def get(name):
    thread.join(timeout=tiny_runs.TIMEOUT)
    if failure:
      raise failure[0]
    return runs[name]

  yield get
  thread.join(timeout=tiny_runs.TIMEOUT)
  for b in batch:
    if b.proc.poll() is None:
      b.proc.kill()
      b.proc.wait()


@pytest.mark.parametrize('name', list(BAD_WORKDIRS))
def test_unusable_workdir_is_one_error_line(damaged_runs, name):
  run = damaged_runs(name)
  tiny_runs.assert_user_error(run.result(), *BAD_WORKDIRS[name][2])
  assert run.after == run.before


@pytest.mark.parametrize('name', list(DIVERGING))
def test_non_finite_values_stop_the_run_before_a_checkpoint(damaged_runs,
                                                            name):
  run = damaged_runs(name)
  result = run.result()
  assert result.returncode == 1, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
  assert 'by step 5' in lines[0] and '(step 4)' in lines[0], lines[0]
  for fragment in DIVERGING[name][2]:
    assert fragment in lines[0], lines[0]
  # The checkpoints are untouched, no summary was written.
  checkpoints = lambda snap: {k: v for k, v in snap.items()
                              if k.startswith('checkpoints')}
  assert checkpoints(run.after) == checkpoints(run.before)
  assert not (run.workdir / 'summary.json').exists()
