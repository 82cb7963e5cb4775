r"""The one entry point: pretraining, or linear evaluation of a pretraining run.

  python main.py --config=configs/byol.py[:VARIANTS] --workdir=DIR \
      [--config.FIELD=VALUE ...] [--probe]
  python main.py --config=configs/eval.py[:VARIANTS] --workdir=DIR \
      [--config.FIELD=VALUE ...]
  python main.py --config=configs/byol.py:bn --workdir=DIR --import_dm=FILE.pkl

Bad input (unknown field, impossible value, missing dataset, unusable
checkpoint) ends with one `error: ...` line on stderr and exit status 2.
"""

import json
import os
import re
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# Importing the package first keeps TensorFlow's start-up quiet (see
# byol/__init__.py), whatever imports TensorFlow later.
from byol.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, configs/byol.py[:variants] or '
    'configs/eval.py[:variants].', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Working directory: '
                               'checkpoints, metrics, summaries.')
_PROBE = flags.DEFINE_bool(
    'probe', False, 'After pretraining, fit a linear probe on frozen features '
    'of the trained encoder and of the same encoder at initialisation.')
_IMPORT_DM = flags.DEFINE_string(
    'import_dm', None, 'A DeepMind BYOL checkpoint (.pkl) to write as the '
    'first checkpoint of --workdir for the pretraining --config (e.g. '
    'configs/byol.py:bn for pretrain_res50x1.pkl); then exit.')


def fail(message: str, status: int = 2):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    # config_flags embeds the traceback of a failing get_config(): its last
    # line is the exception that says what is wrong.
    message = lines[-1] if 'Traceback' in str(e) else lines[0]
    fail(re.sub(r'^\w+(Error|Exception): ', '', message))
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    # Raised by config_flags for unknown fields, wrong types and by a
    # config's get_config for unknown variants.
    fail(f'bad --config: {str(e).splitlines()[0]}')
  except OSError as e:
    fail(f'cannot read the config file: {e.strerror or e}')
  return None


def _load_config():
  """The resolved config; config_flags defers load errors to first use."""
  if _CONFIG.value is None:
    fail('--config is required, e.g. --config=configs/byol.py:local')
  try:
    config = _CONFIG.value
    config.to_dict()  # touches every field, so deferred errors surface here
  except OSError as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    fail(f'cannot load the config: {lines[-1] if lines else e}')
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    fail(f'bad --config: {str(e).splitlines()[0]}')
  return config


def _workdir() -> str:
  workdir = _WORKDIR.value
  if not workdir:
    fail('--workdir is required')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    fail(f'cannot create workdir {workdir}: {e.strerror}')
  if not os.access(workdir, os.W_OK | os.X_OK):
    fail(f'workdir {workdir} is not writable')
  return workdir


def _run(config, workdir):
  # Imported here so that flag errors come back without importing JAX/TF.
  from byol import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(config)
  if _IMPORT_DM.value:
    from byol import dm_checkpoint  # pylint: disable=g-import-not-at-top
    dm_checkpoint.import_to_workdir(_IMPORT_DM.value, config, workdir)
    return
  if config.get('experiment', 'pretrain') == 'linear_eval':
    from byol import eval_experiment  # pylint: disable=g-import-not-at-top
    summary = eval_experiment.run(config, workdir)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return
  from byol import experiment  # pylint: disable=g-import-not-at-top
  from byol import train_loop  # pylint: disable=g-import-not-at-top
  exp = experiment.PretrainExperiment(config, workdir)
  try:
    summary = train_loop.train(exp)
  except train_loop.Preempted as e:
    word = 'interrupted' if e.signum == signal.SIGINT else 'preempted'
    print(f'{word}: {e}', file=sys.stderr)
    sys.exit(e.exit_status)
  except train_loop.NonFiniteLossError as e:
    fail(str(e), status=1)
  print(f'[train] done: step {summary["step"]}, loss {summary.get("loss", 0):.4f}, '
        f'params sha256 {summary["online_params_sha256"][:16]}')
  if _PROBE.value:
    from byol import eval_experiment  # pylint: disable=g-import-not-at-top
    eval_experiment.probe_report(exp, workdir)


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _load_config()
  workdir = _workdir()
  logging.set_verbosity(logging.ERROR)
  try:
    _run(config, workdir)
  except KeyboardInterrupt:
    # Ctrl-C before the loop could take it, or a second one during a step.
    print('interrupted: stopped at once; rerun the same command to resume '
          'from the last checkpoint', file=sys.stderr)
    sys.exit(128 + signal.SIGINT)
  except UserError as e:
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
