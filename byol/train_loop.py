"""The training loop: drives a `PretrainExperiment` from its start to its end.

The role of DeepMind BYOL's `main_loop.train_loop`: the experiment
(`byol/experiment.py`) holds the state and knows how to initialise, restore,
advance and save it; this module owns everything around that -- the workdir
(config check on resume, config.json, metrics.jsonl and TensorBoard events,
summary.json), the evaluators of `config.evaluators.schedule` (built by name,
`byol/evaluation/registry.py`), the progress line, the finiteness check
before a checkpoint, and stopping cleanly on SIGTERM (preemption) or Ctrl-C.

Workdir files are checked before anything is written, so bad input (a config
that differs from the checkpointed run's, a damaged config.json or
metrics.jsonl) leaves the workdir as it was.
"""

import itertools
import json
import os
import signal
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np

from byol import dataset as dataset_lib
from byol import devices
from byol import files
from byol import metrics as metrics_lib
from byol.errors import ConfigError, UserError
from byol.evaluation import registry

# Fields that may change when a run is resumed: they do not change its result.
RESUMABLE_FIELDS = ('training.log_every_steps', 'training.checkpoint_every_steps',
                    'training.keep_checkpoints',
                    # What is measured, not what is trained (the last three:
                    # the evaluators' settings before `evaluators`).
                    'training.eval_every_steps', 'training.eval_batch_size',
                    'training.diagnostics_batch_size',
                    # How the step is arranged for the hardware, not what it
                    # computes (the same function up to float rounding):
                    'model.encoder.fast_conv', 'model.encoder.conv_impl',
                    'training.images_per_pass',
                    # the input pipeline's thread pool (the same batches)
                    'data.input_threads')
# Where the run runs, not what it computes: a preempted multi-host job may come
# back on other hosts (another coordinator address), and every process has its
# own process_id. Like the device count, the number of processes changes how
# the global batch is split and which process reads which shard (so a resumed
# run on another number of processes is a faithful continuation, though not a
# bit-identical one).
RESUMABLE_PREFIXES = ('distributed.', 'evaluators.')


def _flatten_config(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten_config(v, key + '.'))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


# Fields added after runs were written, with the value that means what their
# absence meant: an old run resumes under a new config that leaves them so.
ADDED_FIELDS = {'data.pretrain_split': '', 'data.mean': [], 'data.std': []}


def config_differences(old: dict, new: dict):
  """Config fields (dotted) whose values differ, ignoring resumable ones."""
  a, b = _flatten_config(old), _flatten_config(new)
  for key, default in ADDED_FIELDS.items():
    a.setdefault(key, default)
    b.setdefault(key, default)
  keys = sorted(set(a) | set(b))
  return [k for k in keys if a.get(k) != b.get(k) and k not in RESUMABLE_FIELDS
          and not k.startswith(RESUMABLE_PREFIXES)]


class Preempted(Exception):
  """Raised after a checkpoint was written in answer to SIGTERM or SIGINT.

  Attributes:
    signum: the signal that stopped the run.
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_status(self) -> int:
    """The shell's convention for a process ended by `signum`: 128 + signum."""
    return 128 + self.signum


class StopSignals:
  """Notes SIGTERM and SIGINT (Ctrl-C) so the loop can stop between steps.

  A context manager: inside it, the first of these signals only sets
  `signum`; the loop finishes the step in flight, checkpoints it and stops.
  A second Ctrl-C is a user who will not wait: it raises `KeyboardInterrupt`
  at once, as Python does by default. The previous handlers come back on
  exit.

  With several processes, the handlers are not installed: JAX's preemption
  service (started by jax.distributed.initialize) catches SIGTERM on any
  process and makes all of them agree on the step at which to stop, and a
  Python handler would displace its own; Ctrl-C then stops at once.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, install: bool = True):
    self.signum = None
    self._install = install
    self._previous = {}

  def __enter__(self):
    if self._install:
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._note)
    return self

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def _note(self, signum, frame):  # pylint: disable=unused-argument
    if self.signum is None:
      self.signum = signum
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)




class NonFiniteLossError(Exception):
  """The loss is NaN or infinite; training stopped before a bad checkpoint."""


def check_workdir(workdir: str, config, has_checkpoint: bool) -> None:
  """Raises `UserError` when the workdir's config.json forbids this run.

  A damaged config.json is refused whether or not a checkpoint exists; a
  readable one must match `config` (up to `RESUMABLE_FIELDS`) when the run
  would resume from a checkpoint.
  """
  path = os.path.join(workdir, 'config.json')
  try:
    old = files.read_json(
        path, 'restore it, delete it to resume with the config of this '
        'command, or use another --workdir')
  except FileNotFoundError:
    return
  if not isinstance(old, dict):
    raise ConfigError(f'{path} does not hold a config; delete it to resume '
                      'with the config of this command, or use another '
                      '--workdir')
  if has_checkpoint:
    diff = config_differences(old, json.loads(config.to_json_best_effort()))
    if diff:
      raise ConfigError(
          f'workdir {workdir} holds a run with a different config '
          f'({", ".join(diff[:5])}); use another --workdir')


def train(exp) -> Dict[str, Any]:
  """Runs (or resumes) pretraining to the end; returns the summary.

  Args:
    exp: a `PretrainExperiment` (or anything with its `config`, `network`,
      `workdir`, `print`, `is_chief`, `total_steps`, `checkpointer`,
      `restore_or_init`, `input`, `step`, `save` and `summary`).

  Raises:
    Preempted: after SIGTERM or Ctrl-C, once the step reached is saved.
    NonFiniteLossError: the loss or the parameters stopped being finite.
    UserError: the workdir or the dataset cannot be used.
  """
  check_workdir(exp.workdir, exp.config,
                exp.checkpointer.latest_step() is not None)
  evaluators = registry.build_schedule(exp.config, exp.network)
  start = exp.restore_or_init()
  if start >= exp.total_steps:
    return finished_summary(exp, start)
  inputs = iter(())
  if start < exp.total_steps:
    # The first batch is read before anything is written, so that a missing
    # or unreadable dataset leaves the workdir as it was.
    inputs = exp.input(start)
    inputs = itertools.chain([next(inputs)], inputs)
  metrics_path = os.path.join(exp.workdir, 'metrics.jsonl')
  keep = (metrics_lib.metrics_to_keep(metrics_path, start) if exp.is_chief
          else None)
  # Nothing is written before this point.
  if exp.is_chief:
    files.write_text(os.path.join(exp.workdir, 'config.json'),
                     exp.config.to_json_best_effort(indent=2, sort_keys=True))
    # A tfds:/tfds_dir:/folder: source: its files, splits and statistics.
    dataset_lib.write_data_manifest(exp.config.data, exp.workdir)
  writer = metrics_lib.MetricsWriter(exp.workdir, enabled=exp.is_chief,
                                     keep=keep)
  try:
    with StopSignals(install=jax.process_count() == 1) as signals:
      summary = _loop(exp, start, inputs, writer, signals, evaluators)
  finally:
    writer.close()
  if exp.is_chief:
    files.write_json(os.path.join(exp.workdir, 'summary.json'), summary)
  return summary


def finished_summary(exp, step: int) -> Dict[str, Any]:
  """The summary of a run whose last checkpoint is its last step.

  Nothing in the workdir changes: the summary.json of the run that finished
  stays as it was (rewriting it here would replace its final losses with
  nothing). Only where that run was stopped between its last checkpoint and
  its summary is one written, from the checkpoint and the log's record of
  that step.

  Returns:
    The summary, with `finished_before=True`.
  """
  path = os.path.join(exp.workdir, 'summary.json')
  try:
    summary = files.read_json(path, 'delete it to have it written again from '
                                    'the last checkpoint')
  except FileNotFoundError:
    summary = None
  if not isinstance(summary, dict) or summary.get('step') != step:
    summary = dict(exp.summary(), total_steps=exp.total_steps)
    try:
      records = metrics_lib.read_metrics(
          os.path.join(exp.workdir, 'metrics.jsonl'))
    except UserError:
      records = []  # the summary is then written without the final losses
    record = next((r for r in records if r['step'] == step), {})
    summary.update({k: v for k, v in record.items() if k != 'step'})
    if exp.is_chief:
      files.write_json(path, summary)
  return dict(summary, finished_before=True)


def _stop_signal(signals: StopSignals, step: int) -> Optional[int]:
  """The signal after which the run must checkpoint `step` and stop."""
  if jax.process_count() == 1:
    return signals.signum
  try:
    if multihost_utils.reached_preemption_sync_point(step):
      return signal.SIGTERM
  except RuntimeError:  # jax_enable_preemption_service is off
    pass
  return None


def progress_line(method: str, step: int, total: int, scalars: Dict[str, float],
                  rate: float, eta: float) -> str:
  """One line of training progress: the losses apart, collapse, speed, ETA.

  The representation loss is shown on its own: the online classifier's
  cross-entropy (~2.3 on ten classes) would otherwise hide it.
  """
  parts = [f'[train] step {step}/{total}',
           f'{"byol" if method == "byol" else "nt_xent"} '
           f'{scalars["repr_loss"]:.4f}',
           f'classif {scalars["classif_loss"]:.3f}',
           f'proj_std {scalars["proj_std"]:.4f}']
  if 'rankme_proj' in scalars:
    parts.append(f'rankme {scalars["rankme_proj"]:.1f}')
  if 'eval_top1_accuracy' in scalars:
    parts.append(f'test top1 {scalars["eval_top1_accuracy"]:.3f}')
  parts.append(f'{rate:.0f} img/s  ETA {metrics_lib.format_duration(eta)}')
  return '  '.join(parts)


def check_finite(scalars, step: int, checkpointer) -> None:
  """Raises `NonFiniteLossError` when the loss or the parameters' norm is not
  finite. Called before any checkpoint is written, so that a checkpoint never
  holds non-finite parameters."""
  for name, what in (('loss', 'the loss'),
                     ('param_norm', "the parameters' norm")):
    if not np.isfinite(scalars[name]):
      last = checkpointer.latest_step()
      kept = (f'the last good checkpoint (step {last}) is kept in '
              f'{checkpointer.directory}' if last is not None
              else 'no checkpoint was written')
      raise NonFiniteLossError(
          f'{what} became {scalars[name]} by step {step}; {kept}')


def _due(every: int, done: int, total: int) -> bool:
  """Whether something run every `every` steps runs after step `done`."""
  return done % every == 0 or done == total


def _loop(exp, start: int, inputs: Iterator,
          writer: metrics_lib.MetricsWriter, signals: StopSignals,
          evaluators: List[Tuple[int, str, Any]]) -> Dict[str, Any]:
  c = exp.config.training
  total = exp.total_steps
  global_batch = c.batch_size
  exp.print(f'[train] {exp.config.method} on {exp.config.data.dataset}: '
            f'{total} steps of {global_batch} images, '
            f'{exp.local_devices * jax.process_count()} device(s), '
            f'from step {start}')
  t_start = t_last = time.time()
  last_step = start
  logs = None
  for step in range(start, total):
    logs = exp.step(next(inputs), step)
    done = step + 1
    due = [e for every, _, e in evaluators if _due(every, done, total)]
    is_log = _due(c.log_every_steps, done, total) or bool(due)
    is_ckpt = done % c.checkpoint_every_steps == 0 or done == total
    stop = _stop_signal(signals, done)
    if is_log or is_ckpt or stop:
      scalars = devices.unreplicate(logs)
      check_finite(scalars, done, exp.checkpointer)
    if is_log:
      now = time.time()
      rate = (done - last_step) * global_batch / max(now - t_last, 1e-9)
      scalars = {k: float(v) for k, v in scalars.items()}
      scalars['images_per_sec'] = rate
      if due:
        params, state = devices.unreplicate(
            (exp.state.online_params, exp.state.online_state))
        for evaluator in due:
          scalars.update(evaluator.run(params, state))
      writer.write(done, scalars)
      eta = (total - done) * global_batch / max(rate, 1e-9)
      exp.print(progress_line(exp.config.method, done, total, scalars, rate,
                              eta))
      # The rate counts training steps only, not the time spent measuring.
      t_last, last_step = time.time(), done
    if is_ckpt or stop:
      exp.save(done)
    if stop and done < total:
      raise Preempted(f'{signal.Signals(stop).name}: saved the checkpoint '
                      f'of step {done}; rerun the same command to resume',
                      stop)
  summary = dict(exp.summary(), total_steps=total,
                 wall_time_sec=time.time() - t_start)
  if logs is not None:
    summary.update(
        {k: float(v) for k, v in devices.unreplicate(logs).items()})
  return summary
