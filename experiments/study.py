"""Running a study: config overrides of the local preset, a table and a plot.

A study is a list of `Row`s (norm choices per component plus further config
overrides), each pretrained for the same number of epochs with one or more
seeds (`<root>/<row>` for seed 0, `<root>/<row>_seed<k>`), then probed: the
fast linear probe and kNN of the trained encoder and of the same encoder at
initialisation, proj_std and RankMe at step 0 and at the end. A finished run
leaves `row_summary.json` and is skipped by a rerun; an interrupted one
resumes from its last checkpoint. `run_study` then writes the markdown table
(mean and spread over seeds) and the plot from every finished run;
`report_study` (a study's `--report_only`) writes them without training, from
whatever the workdir root holds, and lists the runs not finished yet.

The ablation table (`experiments/ablation.py`) and the collapse study
(`experiments/collapse_study.py`) are two such lists, the batch-size study
(`experiments/batch_study.py`) a third. This module runs them and keeps their
records; `experiments/study_report.py` writes the table and the plot. Log
lines are tagged with the study's own name (`[ablation]`, `[collapse]`,
`[batch]`).
"""

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

from absl import flags
import jax
import ml_collections

from byol import devices
from byol import diagnostics
from byol import distributed
from byol import experiment
from byol import files
from byol import metrics as metrics_lib
from byol import model
from byol import train_loop
from byol.errors import UserError
from byol.evaluation import collapse
from byol.evaluation import probe
from configs import byol as byol_config
from experiments import study_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_SUMMARY = 'row_summary.json'
# For the ETA before any run has finished: the median pretraining rate
# (evaluations included) and probe time of the 42 runs of the full ablation
# table on 2 CPU cores with oneDNN (2026-12-06; less on a shared machine).
LOCAL_IMAGES_PER_SEC = 490.0
PROBE_SECONDS = 55.0

# Per component: (norm, weight standardization).
NORM_CHOICES = {'bn': ('bn', False), 'none': ('none', False),
                'gnws': ('gn', True)}


@dataclasses.dataclass(frozen=True)
class Row:
  """One row of the table.

  Attributes:
    name: the row's workdir name.
    method: byol | simclr.
    encoder, projector, predictor: a key of NORM_CHOICES (the predictor is
      unused by SimCLR).
    init: default | bn_init.
    paper: the paper's ImageNet linear top-1 for this configuration, where
      the paper gives it ('' otherwise).
    quick: part of the quick subset.
    extra: further (dotted field, value) overrides (used by the collapse
      study, whose rows differ in training settings, not in norms).
  """
  name: str
  method: str
  encoder: str
  projector: str
  predictor: str = 'none'
  init: str = 'default'
  paper: str = ''
  quick: bool = False
  extra: Tuple[Tuple[str, object], ...] = ()

  def overrides(self) -> Dict[str, object]:
    """Config fields (dotted) that make this row from the local preset."""
    out = {'method': self.method, 'model.init': self.init}
    for part in ('encoder', 'projector', 'predictor'):
      norm, ws = NORM_CHOICES[getattr(self, part)]
      out[f'model.{part}.norm'] = norm
      out[f'model.{part}.weight_standardization'] = ws
    out.update(dict(self.extra))
    return out

  def label(self) -> str:
    parts = [f'enc {self.encoder}', f'proj {self.projector}']
    if self.method == 'byol':
      parts.append(f'pred {self.predictor}')
    text = f'{self.method}: ' + ', '.join(parts)
    return text + (', BN-init' if self.init == 'bn_init' else '')



SMOKE_OVERRIDES = {
    'model.encoder.width_multiplier': 0.125,
    'model.encoder.num_groups': 4,
    'model.projector.hidden_size': 32,
    'model.projector.output_size': 16,
    'model.projector.num_groups': 4,
    'model.predictor.hidden_size': 32,
    'model.predictor.output_size': 16,
    'model.predictor.num_groups': 4,
    'model.bn_init_batch_size': 32,
    'data.image_size': 16,
    'training.batch_size': 32,
    'training.max_steps': 3,
    'training.warmup_epochs': 0.0,
    'training.log_every_steps': 1,
    'training.checkpoint_every_steps': 3,
    # The collapse measures that the table reads, at the last step; not the
    # online classifier, which no study reads and which would put every TEST
    # image through the network (a third of a smoke row's time).
    'evaluators.schedule': ((20, 'collapse'),),
}
SMOKE_PROBE_EXAMPLES = 1000


def define_output_flags(flag_values: flags.FlagValues, workdirs: str):
  """A study's --workdir_root (its runs; default `workdirs`) and --results_dir
  (its tables and records; default experiments/results) flag holders."""
  return (flags.DEFINE_string('workdir_root', '', f'Default: {workdirs}.',
                              flag_values=flag_values),
          flags.DEFINE_string('results_dir', '',
                              'Default: experiments/results.',
                              flag_values=flag_values))


def exits_as_cli(*user_errors: type) -> Callable:
  """Decorates a study's `main(argv, printer=print) -> int`, as main.py ends.

  Bad input (a flag error, a `UserError`, or one of `user_errors`) becomes
  one `error:` line on stderr and status 2, no traceback; a run preempted by
  a signal (checkpointed first) says so and exits with the signal's status.
  Any other exception is a bug and keeps its traceback.
  """
  bad_input = (flags.Error, UserError, *user_errors)

  def wrap(main):

    @functools.wraps(main)
    def run(argv: Sequence[str], printer=print) -> int:
      try:
        return main(argv, printer)
      except bad_input as e:
        print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
        return 2
      except train_loop.Preempted as e:
        print(f'preempted: {e}', file=sys.stderr)
        return e.exit_status

    return run

  return wrap


def row_config(row: Row, *, dataset: str, epochs: float, smoke: bool,
               seed: int = 0) -> ml_collections.ConfigDict:
  """The locked pretraining config of `row` (with `seed`)."""
  config = byol_config.get_config('local')
  config.unlock()
  config.update_from_flattened_dict(row.overrides())
  config.update_from_flattened_dict({
      'seed': seed,
      'data.dataset': dataset,
      'training.epochs': float(epochs),
      # Checkpoints are cheap at this scale; an interrupted row loses little.
      'training.checkpoint_every_steps': 100,
  })
  if smoke:
    # The tiny network and run length, except what the row itself studies
    # (e.g. the batch study's batch sizes).
    config.update_from_flattened_dict(
        {k: v for k, v in SMOKE_OVERRIDES.items() if k not in dict(row.extra)})
  config.lock()
  return config


def initial_proj_std(config: ml_collections.ConfigDict, state) -> float:
  """proj_std of the initial online network on the first training batch.

  The same statistic as the logged `proj_std` (std over the batch of the
  L2-normalised projections of view 1, averaged over dimensions), on the
  same kind of batch: the first `training.batch_size` pretraining examples,
  augmented, network in training mode.
  """
  c = config
  forward = model.Network(c, axis_name=None).forward
  aug_rng, fwd_rng = jax.random.split(jax.random.PRNGKey(c.seed))
  images = experiment.augmented_batch(c, c.training.batch_size,
                                      data_seed=c.seed, rng=aug_rng)

  @jax.jit
  def proj_std(params, net_state, images, rng):
    out, _ = forward.apply(params, net_state, rng, images, True)
    return diagnostics.proj_std(out['projection'], None)

  return float(proj_std(state.online_params, state.online_state, images,
                        fwd_rng))


def _config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def run_row(row: Row, config: ml_collections.ConfigDict, workdir: str, *,
            max_train_examples: int, max_test_examples: int,
            tag: str = 'ablation', printer=print) -> dict:
  """Pretrains (or resumes) one row, probes it, writes its row summary."""
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  exp = experiment.PretrainExperiment(config, workdir, printer=printer)
  resumed_from = exp.checkpointer.latest_step() or 0
  status, diverged_at = 'finished', None
  trained = None
  try:
    train_loop.train(exp)
  except train_loop.NonFiniteLossError as e:
    # A row without normalization may diverge: that is a result, not a bug.
    # Its last good checkpoint (or its initialisation) is probed instead.
    printer(f'[{tag}] {row.name}: {e}')
    status = 'diverged'
    # Finiteness is checked at logged steps: the first check after the last
    # logged record failed.
    metrics = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
    last = int(metrics[-1]['step']) if metrics else 0
    diverged_at = min(last + config.training.log_every_steps,
                      experiment.num_steps(config))
  train_time = time.time() - t0
  init_state = devices.unreplicate(exp.initial_state())
  if status == 'diverged':
    step = exp.checkpointer.latest_step()
    trained = (exp.checkpointer.restore(step, target=exp.state_template())[0]
               if step is not None else init_state)
  if trained is None:
    trained = devices.unreplicate(exp.state)
  proj_std0 = initial_proj_std(config, init_state)
  probed = probe.probe_report(
      exp.network, (trained.online_params, trained.online_state),
      (init_state.online_params, init_state.online_state), workdir,
      printer=printer, max_train_examples=max_train_examples,
      max_test_examples=max_test_examples)
  # The probe measured the initial network on the fixed diagnostics batch
  # when the run's schedule has the collapse evaluator.
  diag0 = (probed['init'] if 'rankme_proj' in probed['init'] else
           collapse.CollapseEvaluator(
               exp.network, batch_size=config.evaluators.collapse.batch_size
           ).run(init_state.online_params, init_state.online_state))
  metrics = metrics_lib.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  final_proj_std = float(metrics[-1]['proj_std']) if metrics else float('nan')
  relative = final_proj_std / max(proj_std0, 1e-12)
  rank_final = float(metrics[-1]['rankme_proj']) if metrics else float('nan')
  rank_relative = rank_final / diag0['rankme_proj']
  result = {
      'row': row.name,
      'run': os.path.basename(os.path.normpath(workdir)),
      'label': row.label(),
      'overrides': row.overrides(),
      'status': status,
      'diverged_by_step': diverged_at,
      'steps': experiment.num_steps(config),
      'epochs': config.training.epochs,
      'linear_top1': probed['trained']['top1_accuracy'],
      'linear_top5': probed['trained']['top5_accuracy'],
      'knn_top1': probed['trained']['knn_top1_accuracy'],
      'init_linear_top1': probed['init']['top1_accuracy'],
      'init_knn_top1': probed['init']['knn_top1_accuracy'],
      'gain_over_init': (probed['trained']['top1_accuracy'] -
                         probed['init']['top1_accuracy']),
      'proj_std_step0': proj_std0,
      'proj_std_final': final_proj_std,
      'proj_std_relative': relative,
      'rankme_proj_step0': diag0['rankme_proj'],
      'rankme_proj_final': rank_final,
      'rankme_proj_relative': rank_relative,
      'rankme_emb_step0': diag0['rankme_emb'],
      'rankme_emb_final': (float(metrics[-1]['rankme_emb']) if metrics
                           else float('nan')),
      'collapse': study_report.collapse_verdict(status, relative,
                                                rank_relative),
      'collapsed': study_report.collapse_verdict(
          status, relative, rank_relative) == 'yes',
      'seed': int(config.seed),
      'final_loss': float(metrics[-1]['loss']) if metrics else float('nan'),
      'pretrain_time_sec': train_time,
      'wall_time_sec': time.time() - t0,
      'resumed_from_step': int(resumed_from),
      'paper': row.paper,
      'config': _config_dict(config),
  }
  files.write_json(os.path.join(workdir, ROW_SUMMARY), result)
  return result


def run_name(row: Row, seed: int) -> str:
  """The workdir name of `row` run with `seed` (seed 0: the row's name)."""
  return row.name if seed == 0 else f'{row.name}_seed{seed}'


def record_dir(results_dir: str, name: str, dataset: str,
               epochs: float) -> str:
  """Where a study keeps the records of its finished runs, in the repo.

  `<results_dir>/runs/<name>_<dataset>_<epochs>ep/<run>/` holds each finished
  run's row summary and metrics (kilobytes, no checkpoints), so that the
  table and plot can be rebuilt, and finished runs skipped, on a machine that
  never had the run's workdir.
  """
  return os.path.join(results_dir, 'runs', f'{name}_{dataset}_{epochs:g}ep')


def run_dir(run: str, root: str, record: str = '') -> str:
  """The folder holding `run`'s summary: its workdir, else its record."""
  workdir = os.path.join(root, run)
  if record and not os.path.exists(os.path.join(workdir, ROW_SUMMARY)):
    kept = os.path.join(record, run)
    if os.path.exists(os.path.join(kept, ROW_SUMMARY)):
      return kept
  return workdir


def _copy_text(source: str, target: str) -> None:
  if os.path.exists(source):
    with open(source) as f:
      files.write_text(target, f.read())


def keep_record(run: str, root: str, record: str) -> None:
  """Copies `run`'s summary and metrics from its workdir to `record`."""
  target = os.path.join(record, run)
  os.makedirs(target, exist_ok=True)
  for name in (ROW_SUMMARY, 'metrics.jsonl'):
    _copy_text(os.path.join(root, run, name), os.path.join(target, name))


def keep_baseline(root: str, record: str) -> None:
  """Copies the root's raw-pixel baseline (if fitted) beside the records, so
  that a report rebuilt from the records alone still shows it."""
  if record:
    os.makedirs(record, exist_ok=True)
    name = study_report.BASELINE_FILE
    _copy_text(os.path.join(root, name), os.path.join(record, name))


def load_finished(root: str, rows: Sequence[Row],
                  seeds: Sequence[int] = range(10),
                  record: str = '') -> Dict[str, dict]:
  """Row summaries found under `root` (or `record`), by run name."""
  out = {}
  for row in rows:
    for seed in seeds:
      run = run_name(row, seed)
      path = os.path.join(run_dir(run, root, record), ROW_SUMMARY)
      if os.path.exists(path):
        with open(path) as f:
          out[run] = json.load(f)
  return out


def parse_seeds(values: Sequence[str]) -> List[int]:
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    raise UserError(f'--seeds must be integers, got {",".join(values)}'
                    ) from None
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise UserError(f'--seeds must be distinct non-negative integers, got '
                    f'{",".join(values)}')
  return seeds


def run_study(rows: Sequence[Row], *, seeds: Sequence[int], epochs: float,
              dataset: str, smoke: bool, root: str, results_dir: str,
              max_train: int, max_test: int, command: str, printer=print,
              name: str = 'ablation', tag: str = 'ablation', title: str = '',
              label=Row.label, all_rows: Sequence[Row] = ()) -> None:
  """Runs every (row, seed) not finished under `root`, then the outputs.

  Shared by the ablation table and the collapse study: a study is a list of
  rows (config overrides of the local preset) and its table and plot. The
  table and plot show every finished run under `root` of `all_rows` (the
  study's rows; default: `rows`), not only those of this call, so that a
  study run in parts ends with one table. `name` names its record folder,
  table and plot; `tag` starts its log lines (`[tag] ...`).
  """
  if epochs <= 0:
    raise UserError(f'--epochs must be positive, got {epochs}')
  default_probe = SMOKE_PROBE_EXAMPLES if smoke else -1
  max_train = max_train if max_train != -1 else default_probe
  max_test = max_test if max_test != -1 else default_probe
  os.makedirs(root, exist_ok=True)
  os.makedirs(results_dir, exist_ok=True)
  runs = [(row, seed) for seed in seeds for row in rows]
  configs = {run_name(r, s): row_config(r, dataset=dataset, epochs=epochs,
                                        smoke=smoke, seed=s) for r, s in runs}
  # Before JAX starts: BatchNorm rows take one CPU device per core, the
  # others one of them (byol/distributed.py).
  distributed.start_cpu_devices(list(configs.values()))
  for config in configs.values():
    experiment.validate_config(config)

  def estimate(config):
    steps = experiment.num_steps(config)
    return steps * config.training.batch_size / LOCAL_IMAGES_PER_SEC + (
        PROBE_SECONDS)

  printer(f'[{tag}] {len(rows)} row(s) x {len(seeds)} seed(s) on {dataset}, '
          f'{"smoke (3 steps, tiny network)" if smoke else f"{epochs:g} epoch(s) per run"}; '
          f'workdirs under {root}')
  # Smoke runs measure nothing: their records are not kept.
  record = '' if smoke else record_dir(results_dir, name, dataset, epochs)
  finished = load_finished(root, rows, seeds, record)
  todo = [run_name(r, s) for r, s in runs if run_name(r, s) not in finished]
  remaining = sum(estimate(configs[n]) for n in todo)
  printer(f'[{tag}] {len(runs) - len(todo)} finished earlier, '
          f'{len(todo)} to run; estimated '
          f'{metrics_lib.format_duration(remaining)} at '
          f'{LOCAL_IMAGES_PER_SEC:.0f} images/s')
  durations, estimates = [], []
  for i, (row, seed) in enumerate(runs, 1):
    run = run_name(row, seed)
    config = configs[run]
    workdir = os.path.join(root, run)
    head = f'[{tag}] run {i}/{len(runs)} {run} ({label(row)})'
    if run in finished:
      diff = train_loop.config_differences(finished[run]['config'],
                                           _config_dict(config))
      if diff:
        raise UserError(
            f'run {run} in {workdir} was made with another config '
            f'({", ".join(diff[:4])}); use another --workdir_root')
      printer(f'{head}: finished earlier, skipped')
      if record and os.path.exists(os.path.join(workdir, ROW_SUMMARY)):
        keep_record(run, root, record)
      continue
    printer(f'{head}: {experiment.num_steps(config)} steps')
    t0 = time.time()
    result = run_row(row, config, workdir, max_train_examples=max_train,
                     max_test_examples=max_test, tag=tag, printer=printer)
    durations.append(time.time() - t0)
    estimates.append(estimate(config))
    finished[run] = result
    if record:
      keep_record(run, root, record)
    # Compiled programs of this run are not needed again.
    jax.clear_caches()
    left = [n for n in todo if n not in finished]
    if left:
      # The a-priori estimates, rescaled by how long the runs here took.
      ratio = sum(durations) / sum(estimates)
      eta = ratio * sum(estimate(configs[n]) for n in left)
      eta_text = (f'ETA for the {len(left)} run(s) left '
                  f'{metrics_lib.format_duration(eta)}')
    else:
      eta_text = 'last run'
    printer(f'{head}: linear top-1 {study_report.pct(result["linear_top1"])}% '
            f'(init {study_report.pct(result["init_linear_top1"])}%), kNN '
            f'{study_report.pct(result["knn_top1"])}%, proj_std '
            f'{result["proj_std_final"]:.4f} ({result["proj_std_relative"]:.2f}'
            f' x step 0), rank {result["rankme_proj_final"]:.1f} '
            f'({result["rankme_proj_relative"]:.2f} x step 0), collapsed: '
            f'{result["collapse"]}; '
            f'{metrics_lib.format_duration(durations[-1])}; {eta_text}')

  image_size = next(iter(configs.values())).data.image_size
  baseline = study_report.raw_pixel_baseline(
      root, dataset=dataset, image_size=image_size,
      max_train_examples=max_train, max_test_examples=max_test,
      tag=tag, printer=printer)
  keep_baseline(root, record)
  write_report(
      list(all_rows) or list(rows), root=root, results_dir=results_dir,
      record=record, baseline=baseline, dataset=dataset, command=command,
      max_train=max_train, max_test=max_test, title=title, label=label,
      expected=list(configs), printer=printer, name=name, tag=tag)


def write_report(shown: Sequence[Row], *, root: str, results_dir: str,
                 record: str, baseline, dataset: str, command: str,
                 max_train: int, max_test: int, title: str, label,
                 expected: Sequence[str], printer=print,
                 name: str = 'ablation', tag: str = 'ablation') -> None:
  """Writes the table and the plot of every finished run of `shown`.

  `expected` names the runs the command asked for; those not finished are
  listed in the table and printed.
  """
  everything = load_finished(root, shown, record=record)
  started, waiting = study_report.missing_runs(root, expected, everything)
  missing = study_report.missing_text(started, waiting)
  table_path = os.path.join(results_dir, f'{name}_{dataset}.md')
  plot_path = os.path.join(results_dir, f'{name}_{dataset}.png')
  text = study_report.write_table(
      table_path, everything, baseline, dataset=dataset,
      command=command.strip(), max_train_examples=max_train,
      max_test_examples=max_test, rows=shown, title=title, label=label,
      missing=missing)
  study_report.write_plot(plot_path, everything, baseline,
                          lambda run: run_dir(run, root, record), rows=shown)
  printer('')
  printer(text)
  printer(f'[{tag}] wrote {table_path} and {plot_path}')


def report_study(rows: Sequence[Row], *, seeds: Sequence[int], epochs: float,
                 dataset: str, smoke: bool, root: str, results_dir: str,
                 max_train: int, max_test: int, command: str, printer=print,
                 name: str = 'ablation', tag: str = 'ablation',
                 title: str = '', label=Row.label,
                 all_rows: Sequence[Row] = ()) -> None:
  """`run_study`'s table and plot from what `root` holds now; trains nothing.

  The same arguments as `run_study` (the same command with --report_only):
  the runs of `rows` x `seeds` not finished yet are listed; the finished
  ones are copied to the study's record folder, as `run_study` does; the
  raw-pixel baseline is read from the root's cache (else the records'),
  never fitted.

  Without the root (a fresh clone), the study's records in `results_dir`
  alone give the table.

  Raises:
    UserError: neither the root nor the study's records, or a finished run of
      another length than `epochs` (its record would be filed under the
      wrong name).
  """
  record = '' if smoke else record_dir(results_dir, name, dataset, epochs)
  if not os.path.isdir(root) and not (record and os.path.isdir(record)):
    raise UserError(f'no workdir root {root}'
                    + (f' and no records in {record}' if record else ''))
  default_probe = SMOKE_PROBE_EXAMPLES if smoke else -1
  max_train = max_train if max_train != -1 else default_probe
  max_test = max_test if max_test != -1 else default_probe
  shown = list(all_rows) or list(rows)
  for run, result in load_finished(root, shown).items():
    length = result['config']['training']['epochs']
    if float(length) != float(epochs):
      raise UserError(f'run {run} in {root} is {length:g} epochs long, not '
                      f'{epochs:g}; pass --epochs={length:g}')
  os.makedirs(results_dir, exist_ok=True)
  if record:
    for run in load_finished(root, shown):
      keep_record(run, root, record)
  config = row_config(rows[0], dataset=dataset, epochs=epochs, smoke=smoke)
  keep_baseline(root, record)
  baseline = study_report.cached_baseline(root, dict(
      dataset=dataset, image_size=config.data.image_size,
      max_train_examples=max_train, max_test_examples=max_test), record)
  printer(f'[{tag}] report only: the finished runs under {root}')
  write_report(shown, root=root, results_dir=results_dir, record=record,
               baseline=baseline, dataset=dataset, command=command,
               max_train=max_train, max_test=max_test, title=title,
               label=label,
               expected=[run_name(r, s) for s in seeds for r in rows],
               printer=printer, name=name, tag=tag)
