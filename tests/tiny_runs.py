"""Tiny `main.py` runs in subprocesses, for the end-to-end tests.

A tiny run is a few steps of a narrow small-stem ResNet-18 on 16 px
Fashion-MNIST crops, on forced CPU devices. Most of its cost is importing
JAX/TensorFlow and compiling the update step; runs with the same config and
device count share compiled programs through the session's persistent
compilation cache (tests/conftest.py; both xdist workers use the same one).
The uninterrupted reference run is likewise made once per session
(`reference_run`) and only read by the tests that compare with it.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny network of every end-to-end test (flags over configs/byol.py:local):
# a small-stem ResNet-18 of 8..64 channels, heads 32 -> 16, on 16 px crops;
# GroupNorm of 4 groups wherever the config asks for GroupNorm.
TINY_NET = [
    '--config.model.encoder.width_multiplier=0.125',
    '--config.model.encoder.num_groups=4',
    '--config.model.projector.hidden_size=32',
    '--config.model.projector.output_size=16',
    '--config.model.projector.num_groups=4',
    '--config.model.predictor.hidden_size=32',
    '--config.model.predictor.output_size=16',
    '--config.model.predictor.num_groups=4',
    '--config.data.image_size=16',
]

# 6 steps of 32 images, a checkpoint every 2, a metrics line every step. No
# warm-up and a small learning rate: the parameters move, and float rounding
# (e.g. a different reduction order on another device layout) stays small.
# The encoder is the paper's GN+WS; the projector and predictor use
# BatchNorm, as in the original BYOL, so that one run covers both kinds of
# normalization (and the BatchNorm moving averages in checkpoints), at the
# cost of one compilation rather than two.
TINY = [
    '--config=configs/byol.py:local',
    *TINY_NET,
    '--config.model.projector.norm=bn',
    '--config.model.projector.weight_standardization=False',
    '--config.model.predictor.norm=bn',
    '--config.model.predictor.weight_standardization=False',
    '--config.training.batch_size=32',
    '--config.training.warmup_epochs=0',
    '--config.training.base_lr=0.2',
    '--config.training.max_steps=6',
    '--config.training.checkpoint_every_steps=2',
    '--config.training.log_every_steps=1',
    '--config.evaluators.collapse.batch_size=64',
    "--config.evaluators.schedule=((1, 'collapse'),)",
]
# The reference run also measures the online classifier's TEST accuracy at
# its last step, which test_train_loop reads. The other runs leave it out: it
# puts every TEST image through the network (about 10 s of CPU, a third of a
# tiny run), and a run may resume or compare with another whose evaluators
# differ (they measure, they do not train).
REFERENCE = TINY[:-1] + [
    "--config.evaluators.schedule=((1, 'collapse'), (120, 'online_classifier'))"]
TIMEOUT = 300  # seconds, per run


def env(tmp_path_factory, num_devices=4, cache_writes=True):
  """The environment of a run on `num_devices` forced CPU devices.

  The run reads and writes the session's compilation cache (its folder is
  in os.environ); with `cache_writes=False` it only reads it: for a run
  that a test SIGKILLs, which could otherwise leave a half-written entry
  behind (JAX writes an entry in place) for every later run to trip over.
  """
  del tmp_path_factory  # The cache is the session's, not the worker's.
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  flags.append(f'--xla_force_host_platform_device_count={num_devices}')
  out = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS=' '.join(flags), PYTHONUNBUFFERED='1')
  if not cache_writes:
    # Only programs that take longer than this to compile are written.
    out['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '1e9'
  return out


def start(tmp_path_factory, args, workdir, log_path, *, num_devices=4,
          script='main.py', cache_writes=True):
  """Starts `script` (main.py or a test wrapper) with `args`; stdout+stderr
  go to `log_path`. `cache_writes=False` for a run the test will SIGKILL
  (see `env`)."""
  with open(log_path, 'ab') as log:
    return subprocess.Popen(
        [sys.executable, script, f'--workdir={workdir}', *args], cwd=ROOT,
        env=env(tmp_path_factory, num_devices, cache_writes), stdout=log,
        stderr=subprocess.STDOUT)


def run(tmp_path_factory, args, workdir, *, num_devices=4, timeout=TIMEOUT):
  """Runs main.py to the end; returns the CompletedProcess."""
  return subprocess.run(
      [sys.executable, 'main.py', f'--workdir={workdir}', *args], cwd=ROOT,
      env=env(tmp_path_factory, num_devices), capture_output=True, text=True,
      timeout=timeout)


def wait_all(procs, timeout=TIMEOUT):
  """Return codes of `procs`; kills every one still running on timeout."""
  deadline = time.time() + timeout
  try:
    return [p.wait(timeout=max(1, deadline - time.time())) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


_reference_procs = {}  # base temporary directory -> the reference's Popen


def start_reference(tmp_path_factory):
  """Starts the reference run in the background unless it is done or running:
  callers that can do something else meanwhile call this first."""
  base = tmp_path_factory.getbasetemp()
  if (base / 'reference' / 'summary.json').exists() or base in _reference_procs:
    return
  _reference_procs[base] = start(tmp_path_factory, REFERENCE,
                                 base / 'reference', base / 'reference.log')


def wait_reference_compiled(tmp_path_factory):
  """Starts the reference run if need be and waits until it has logged its
  first step: every program of a TINY run is then in the session's
  compilation cache, so a run started next, even one that only reads the
  cache (`cache_writes=False`), does not compile them all again."""
  base = tmp_path_factory.getbasetemp()
  start_reference(tmp_path_factory)
  proc = _reference_procs.get(base)
  if proc is not None:
    wait_for(lambda: '[train] step 1/6' in (base / 'reference.log').read_text()
             or proc.poll() is not None, proc)


def reference_run(tmp_path_factory):
  """Workdir of the uninterrupted REFERENCE run (TINY that also measures
  the online classifier; made once per session)."""
  base = tmp_path_factory.getbasetemp()
  start_reference(tmp_path_factory)
  proc = _reference_procs.get(base)
  if proc is not None:
    code = wait_all([proc])[0]
    assert code == 0, (base / 'reference.log').read_text()[-3000:]
  return base / 'reference'


def summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['loss'] for line in f]


def checkpoint_leaves(workdir, step=None, prefix='.online_params'):
  """{leaf path: array} of a checkpoint's leaves whose path starts with
  `prefix` (default: the online parameters)."""
  from byol import checkpointing  # pylint: disable=g-import-not-at-top
  flat, _ = checkpointing.Checkpointer(
      os.path.join(workdir, 'checkpoints')).restore(step)
  return {k: v for k, v in flat.items() if k.startswith(prefix)}


def snapshot(directory):
  """{relative path: (sha256, size, mtime_ns)} of every file under it."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (digest, st.st_size,
                                               st.st_mtime_ns)
  return out


def damage_array_bytes(npz_path, member, mask=0xFF):
  """XORs `mask` into the last data byte of `member` (e.g. 'leaf_3.npy') of
  an uncompressed .npz: past the member's local zip header and its .npy
  header, inside the array data. The zip stays readable."""
  import zipfile  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(npz_path) as zf:
    info = zf.getinfo(member)
  with open(npz_path, 'r+b') as f:
    f.seek(info.header_offset + 26)
    name_length, extra_length = np.frombuffer(f.read(4), '<u2')
    f.seek(info.header_offset + 30 + int(name_length) + int(extra_length) +
           info.compress_size - 1)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ mask]))


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait_for(condition, proc, timeout=TIMEOUT, poll=0.05):
  """Polls `condition()` until it holds; fails if `proc` ends first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    if proc.poll() is not None:
      raise AssertionError(f'the run ended (status {proc.returncode}) '
                           'before the awaited event')
    time.sleep(poll)
  proc.send_signal(signal.SIGKILL)
  raise AssertionError('timed out waiting for the run')


def assert_user_error(result, *fragments):
  """One `error:` line on stderr, exit status 2, no traceback."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith('error: '), lines[0]
  assert 'Traceback' not in result.stderr
  for f in fragments:
    assert f in lines[0], (f, lines[0])
