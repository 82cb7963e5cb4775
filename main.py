r"""The one entry point: pretraining, or linear evaluation of a pretraining run.

  python main.py --config=configs/byol.py[:VARIANTS] --workdir=DIR \
      [--config.FIELD=VALUE ...] [--probe]
  python main.py --config=configs/eval.py[:VARIANTS] --workdir=DIR \
      [--config.FIELD=VALUE ...]
  python main.py --config=configs/byol.py:bn --workdir=DIR --import_dm=FILE.pkl

Bad input (unknown field, impossible value, missing dataset, unusable
checkpoint) ends with one `error: ...` line on stderr and exit status 2.
"""

import errno
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
from byol import files
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


def _workdir_path() -> str:
  workdir = _WORKDIR.value
  if not workdir:
    fail('--workdir is required')
  return workdir


class _Workdir:
  """The workdir, made (if new) and locked for the run that writes it.

  Created only when the run is about to write, after every check that can
  fail without writing; a workdir this command made is removed again when
  the command ends with nothing written there (e.g. a refused checkpoint).
  Only process 0 takes the lock (`files.WorkdirLock`): it is the only
  writer in a multi-process run.
  """

  def __init__(self, path: str, lock_name: str = files.LOCK_NAME):
    self.path = path
    self._lock = None
    self._lock_name = lock_name
    self._created = False

  def __enter__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self._created = not os.path.exists(self.path)
    try:
      os.makedirs(self.path, exist_ok=True)
    except OSError as e:
      raise UserError(f'cannot create workdir {self.path}: '
                      f'{e.strerror or e}') from None
    if not os.access(self.path, os.W_OK | os.X_OK):
      self._remove_if_empty()
      raise UserError(f'workdir {self.path} is not writable')
    if jax.process_index() == 0:
      self._lock = files.WorkdirLock(self.path, self._lock_name)
      try:
        self._lock.acquire()
      except BaseException:
        self._lock = None
        self._remove_if_empty()
        raise
    return self

  def __exit__(self, *exc_info):
    if self._lock is not None:
      self._lock.release()
    self._remove_if_empty()

  def _remove_if_empty(self):
    if self._created:
      try:
        os.rmdir(self.path)  # fails, as it should, unless it is empty
      except OSError:
        pass


def _run(config, workdir):
  # Before JAX and TensorFlow start their threads: a CPU step's buffers are
  # reused instead of faulted in again every step (byol/host_memory.py).
  from byol import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.keep_freed_memory()
  # Imported here so that flag errors come back without importing JAX/TF.
  from byol import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(config)
  if _IMPORT_DM.value:
    from byol import dm_checkpoint  # pylint: disable=g-import-not-at-top
    # The file is read and checked before the workdir is made.
    state, step = dm_checkpoint.read_for_config(_IMPORT_DM.value, config)
    with _Workdir(workdir):
      dm_checkpoint.write_to_workdir(state, step, _IMPORT_DM.value, config,
                                     workdir)
    return
  if config.get('experiment', 'pretrain') == 'linear_eval':
    from byol import eval_experiment  # pylint: disable=g-import-not-at-top
    if not os.path.isdir(workdir):
      raise UserError(f'{workdir} is not a pretraining workdir (no such '
                      'folder); pretrain there first')
    # Evaluations write in a folder of their own: one lock per folder, so
    # that an evaluation may read a workdir whose pretraining still runs.
    name = os.path.basename(eval_experiment.output_dir(config, workdir))
    with _Workdir(workdir, lock_name=f'.lock-{name}'):
      summary = eval_experiment.run(config, workdir)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return
  from byol import experiment  # pylint: disable=g-import-not-at-top
  from byol import train_loop  # pylint: disable=g-import-not-at-top
  exp = experiment.PretrainExperiment(config, workdir)
  with _Workdir(workdir):
    try:
      summary = train_loop.train(exp)
    except train_loop.Preempted as e:
      word = 'interrupted' if e.signum == signal.SIGINT else 'preempted'
      print(f'{word}: {e}', file=sys.stderr)
      sys.exit(e.exit_status)
    except train_loop.NonFiniteLossError as e:
      fail(str(e), status=1)
    if summary.get('finished_before'):
      print(f'[train] finished already: the checkpoint of step '
            f'{summary["step"]} is the run\'s last; nothing was changed (a '
            'longer run, with another training.max_steps or epochs, is a new '
            'run: use another --workdir)')
    else:
      print(f'[train] done: step {summary["step"]}, loss '
            f'{summary["loss"]:.4f}, params sha256 '
            f'{summary["online_params_sha256"][:16]}')
    if _PROBE.value:
      from byol import devices  # pylint: disable=g-import-not-at-top
      from byol.evaluation import probe  # pylint: disable=g-import-not-at-top
      trained = devices.unreplicate(exp.state)
      initial = devices.unreplicate(exp.initial_state())
      probe.probe_report(
          exp.network, (trained.online_params, trained.online_state),
          (initial.online_params, initial.online_state), workdir)


def _disk_full(e: OSError) -> bool:
  return e.errno in (errno.ENOSPC, errno.EDQUOT)


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _load_config()
  workdir = _workdir_path()
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
  except OSError as e:
    if not _disk_full(e):
      raise
    # Every file of the workdir is written next to its name and renamed
    # over it, so what was there before stays whole.
    where = f': {e.filename}' if e.filename else ''
    fail(f'the disk is full ({e.strerror}{where}); '
         'the files written before are kept; free space and rerun the same '
         'command to resume from the last checkpoint')


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
