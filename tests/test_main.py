"""The command line: bad input gives one `error:` line, exit 2, nothing lost."""

import os
import subprocess
import sys

import pytest

from tiny_runs import assert_user_error

# Each test is a main.py (or python -c) subprocess.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = 'configs/byol.py:local'
# A tiny, fast local run (a few steps of a narrow net on 16 px crops).
TINY = [
    '--config.model.encoder.width_multiplier=0.125',
    '--config.model.encoder.num_groups=4',
    '--config.model.projector.hidden_size=32',
    '--config.model.projector.output_size=16',
    '--config.model.projector.num_groups=4',
    '--config.model.predictor.hidden_size=32',
    '--config.model.predictor.output_size=16',
    '--config.model.predictor.num_groups=4',
    '--config.data.image_size=16',
    '--config.training.batch_size=32',
]


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


@pytest.mark.parametrize('name,args,fragments', BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_error_line(tmp_path, name, args, fragments):
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  result = run_main(args, tmp_path / 'w', env=env)
  assert_user_error(result, *fragments)
  # Nothing was written into the workdir.
  assert not os.path.exists(tmp_path / 'w') or not os.listdir(tmp_path / 'w')


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


def test_evaluating_a_workdir_without_a_run(tmp_path):
  result = run_main(['--config=configs/eval.py:local,fast'], tmp_path)
  assert_user_error(result, 'config.json')


@pytest.mark.parametrize('text, fragment', [
    ('{broken', 'not valid JSON'),
    ('[1, 2]', 'does not hold a config'),
    ('{"method": "byol"}', "no field 'model'"),
])
def test_evaluating_a_workdir_with_a_damaged_config(tmp_path, text, fragment):
  path = tmp_path / 'config.json'
  path.write_text(text)
  result = run_main(['--config=configs/eval.py:local,fast'], tmp_path)
  assert_user_error(result, 'config.json', fragment)
  assert path.read_text() == text
  assert sorted(os.listdir(tmp_path)) == ['config.json']


def test_unwritable_workdir(tmp_path):
  if os.geteuid() == 0:
    target = '/proc/byol-cannot-write-here'
  else:
    ro = tmp_path / 'ro'
    ro.mkdir()
    os.chmod(ro, 0o500)
    target = str(ro / 'w')
  result = run_main([f'--config={LOCAL}'], target)
  assert_user_error(result, 'workdir')
