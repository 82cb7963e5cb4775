"""The command line: bad input gives one `error:` line, exit 2, nothing lost."""

import json
import os
import subprocess
import sys

import pytest

from tiny_runs import TINY_NET, assert_user_error

# Each test is a main.py (or python -c) subprocess.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = 'configs/byol.py:local'
# A tiny, fast local run (a few steps of a narrow net on 16 px crops).
TINY = [*TINY_NET, '--config.training.batch_size=32']


def run_main(args, workdir, timeout=300, env=None):
  full_env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  full_env.update(env or {})
  return subprocess.run(
      [sys.executable, 'main.py', f'--workdir={workdir}', *args],
      cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


# Errors found while parsing flags or checking the config: no training starts.
BAD_INPUTS = [
    ('unknown_field', [f'--config={LOCAL}', '--config.training.bogus=1'],
     ['bogus']),
    ('wrong_type', [f'--config={LOCAL}', '--config.training.batch_size=abc'],
     ['batch_size']),
    ('unknown_norm', [f'--config={LOCAL}', '--config.model.encoder.norm=banana'],
     ['banana', 'gn']),
    ('unknown_method', [f'--config={LOCAL}', '--config.method=moco'],
     ['moco']),
    ('unknown_variant', ['--config=configs/byol.py:banana'], ['banana']),
    ('unknown_epoch_preset', ['--config=configs/byol.py:local,77'], ['77']),
    ('missing_config_file', ['--config=configs/nope.py'], []),
    ('no_config', [], ['--config']),
    ('zero_batch', [f'--config={LOCAL}', '--config.training.batch_size=0'],
     ['batch_size']),
    ('negative_log_every', [f'--config={LOCAL}',
                            '--config.training.log_every_steps=-5'],
     ['log_every_steps']),
    ('unknown_dataset', [f'--config={LOCAL}', '--config.data.dataset=cifar99'],
     ['cifar99']),
    ('groups_not_dividing', [f'--config={LOCAL}', *TINY,
                             '--config.model.encoder.num_groups=3'],
     ['3']),
    ('batch_not_divisible', [f'--config={LOCAL}', *TINY,
                             '--config.training.batch_size=30'],
     ['30', '4 devices']),
    ('negative_cpu_devices', [f'--config={LOCAL}',
                              '--config.distributed.cpu_devices=-1'],
     ['distributed.cpu_devices=-1', '>= 0']),
    # distributed.cpu_devices splits the CPU: 3 devices do not divide 16.
    ('cpu_devices_not_dividing', [f'--config={LOCAL}', *TINY,
                                  '--config.distributed.cpu_devices=3'],
     ['3 devices']),
    ('stray_argument', [f'--config={LOCAL}', 'extra'], ['extra']),
    ('bad_dtype', [f'--config={LOCAL}', '--config.model.dtype=float8'],
     ['float8']),
    # Checked by the networks' constructors, named by the config path.
    ('zero_hidden_size', [f'--config={LOCAL}',
                          '--config.model.projector.hidden_size=0'],
     ['model.projector', 'hidden_size must be positive']),
    ('zero_width', [f'--config={LOCAL}',
                    '--config.model.encoder.width_multiplier=0'],
     ['model.encoder', 'width_multiplier must be positive']),
]


# Workdirs of the eval runs below, each with this config.json written first.
DAMAGED_CONFIGS = [
    ('{broken', 'not valid JSON'),
    ('[1, 2]', 'does not hold a config'),
    ('{"method": "byol"}', "no field 'model'"),
]


def _unwritable_target(tmp_path):
  if os.geteuid() == 0:
    return '/proc/byol-cannot-write-here'
  ro = tmp_path / 'ro'
  ro.mkdir()
  os.chmod(ro, 0o500)
  return str(ro / 'w')


@pytest.fixture(scope='module')
def main_runs(tmp_path_factory):
  """The runs of bad input that end before any computation, all forked
  from one process that imported main.py once (tests/main_cases.py): each
  `python main.py` start would otherwise import JAX and TensorFlow again.

  Returns {case name: (CompletedProcess, workdir)}; case names are
  BAD_INPUTS' names, 'eval_without_run', 'damaged_config_<i>' and
  'unwritable'.
  """
  base = tmp_path_factory.mktemp('main_runs')
  named = {}
  for name, args, _ in BAD_INPUTS:
    named[name] = (args, base / name / 'w')
  eval_args = ['--config=configs/eval.py:local,fast']
  (base / 'eval_without_run').mkdir()
  named['eval_without_run'] = (eval_args, base / 'eval_without_run')
  for i, (text, _) in enumerate(DAMAGED_CONFIGS):
    workdir = base / f'damaged_config_{i}'
    workdir.mkdir()
    (workdir / 'config.json').write_text(text)
    named[f'damaged_config_{i}'] = (eval_args, workdir)
  named['unwritable'] = ([f'--config={LOCAL}'], _unwritable_target(base))
  cases = [[f'--workdir={workdir}', *args] for args, workdir in
           named.values()]
  cases_path, results_path = base / 'cases.json', base / 'results.json'
  cases_path.write_text(json.dumps(cases))
  # Four forced CPU devices, as the batch checks need (the other cases end
  # before any backend starts); conftest's XLA flags are kept.
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS=' '.join(
                 flags + ['--xla_force_host_platform_device_count=4']))
  done = subprocess.run(
      [sys.executable, os.path.join('tests', 'main_cases.py'),
       str(cases_path), str(results_path)], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(results_path.read_text())
  return {name: (subprocess.CompletedProcess(case, r['returncode'],
                                             r['stdout'], r['stderr']),
                 workdir)
          for (name, (_, workdir)), case, r in zip(named.items(), cases,
                                                   results)}


@pytest.mark.parametrize('name,args,fragments', BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_error_line(main_runs, name, args, fragments):
  result, workdir = main_runs[name]
  assert result.args[1:] == args  # the case's own command line
  assert_user_error(result, *fragments)
  # Nothing was written into the workdir.
  assert not os.path.exists(workdir) or not os.listdir(workdir)


def test_missing_dataset_files(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  result = run_main([f'--config={LOCAL}', *TINY,
                     f'--config.data.data_dir={empty}'], tmp_path / 'w',
                    env={'TFDS_DATA_DIR': str(tmp_path / 'tfds'),
                         'BYOL_NO_TFDS_DOWNLOAD': '1'})
  assert_user_error(result, 'dataset-fashion-mnist')


def _bare_env():
  """The environment without any TensorFlow logging or oneDNN setting."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS')}
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def test_tensorflow_settings_precede_its_import():
  # Holds on any CPU: what main.py has set by the time anything could import
  # TensorFlow. oneDNN's start-up line ignores TF_CPP_MIN_LOG_LEVEL, so only
  # TF_ENABLE_ONEDNN_OPTS=0 keeps it off stderr on CPUs that enable it.
  probe = ('import os, sys; import main; '
           'print(os.environ.get("TF_ENABLE_ONEDNN_OPTS"), '
           'os.environ.get("TF_CPP_MIN_LOG_LEVEL"), '
           '"tensorflow" in sys.modules)')
  result = subprocess.run([sys.executable, '-c', probe], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=_bare_env())
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ['0', '2', 'False']


def test_tensorflow_starts_silently():
  # On CPUs with AVX-512 TensorFlow 2.21 prints "WARNING: All log messages
  # before absl::InitializeLog() ..." and "oneDNN custom operations are on"
  # at import unless oneDNN is off, whatever TF_CPP_MIN_LOG_LEVEL says.
  code = ('from byol.data import splits; '
          'splits.tf.constant(1.0); splits.tfds.Split.TRAIN')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=_bare_env())
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr == ''


def test_evaluating_a_workdir_without_a_run(main_runs):
  result, _ = main_runs['eval_without_run']
  assert_user_error(result, 'config.json')


@pytest.mark.parametrize('text, fragment', DAMAGED_CONFIGS)
def test_evaluating_a_workdir_with_a_damaged_config(main_runs, text, fragment):
  result, workdir = main_runs[
      f'damaged_config_{DAMAGED_CONFIGS.index((text, fragment))}']
  assert_user_error(result, 'config.json', fragment)
  assert (workdir / 'config.json').read_text() == text
  assert sorted(os.listdir(workdir)) == ['config.json']


def test_unwritable_workdir(main_runs):
  result, _ = main_runs['unwritable']
  assert_user_error(result, 'workdir')
