r"""Does BYOL's accuracy depend on the batch size without batch statistics?

The BYOL paper's own ablation (BatchNorm BYOL, ResNet-50, 300 epochs) loses
accuracy as the batch shrinks: 72.4% at batch 2048, 71.8% at 256, 69.6% at
128, 59.7% at 64. Its authors place the whole dependence in the BatchNorm
layers; Richemond et al. (2020) remove them. This study trains the `local`
preset with GN+WS everywhere and with BatchNorm everywhere at several batch
sizes for the same number of epochs, the learning rate scaled as the paper
scales it (base x batch / 256, which the config does for every batch), and
reports each normalization's fast-probe gain over its initialisation per
batch size.

Two more rows pin down where the dependence sits: batch 256 taken as 8
accumulated micro-batches of 32. For GN+WS this is the batch-256 update up
to float rounding (the step averages the micro-batches' gradients; nothing
in the network sees more than one example at a time); for BatchNorm it is a
batch-256 optimizer step whose normalization statistics come from 32
examples.

Runs are resumable and skipped once finished, like the ablation's (same
runner, `experiments/study.py`). Outputs: `batch_study_<dataset>.md` (the
study's full table, then the gain per batch size and normalization beside
the paper's BatchNorm figures), `batch_study_<dataset>.png` (every row:
top-1, proj_std and RankMe curves) and `batch_study_<dataset>_by_batch.png`
(the gains by batch size and their change from batch 256).

Commands:

  python -m experiments.batch_study                       # 4 sizes x 2 norms x 2 seeds + pairs
  python -m experiments.batch_study --batches=32,64,128,256,512 --seeds=0,1,2
  python -m experiments.batch_study --smoke --workdir_root=/tmp/bs  # plumbing
  python -m experiments.batch_study --workdir_root=DIR --report_only \
      --results_dir=/tmp/report   # the tables and plots so far, no training
"""

import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from absl import flags
import numpy as np

from byol import dataset as dataset_lib
from byol import metrics
from byol.errors import UserError
from experiments import study
from experiments import study_report

DEFAULT_EPOCHS = 1.25
DEFAULT_BATCHES = (32, 64, 128, 256)
ACCUMULATION = 8  # the accumulation pair: batch 256 as 8 x 32
NORMS = ('gnws', 'bn')
NORM_LABELS = {'gnws': 'GN+WS', 'bn': 'BatchNorm'}
# The BYOL paper (Grill et al., 2020, Fig. 3a): BatchNorm BYOL, ResNet-50,
# 300 epochs, ImageNet linear top-1 by batch size.
PAPER_BN = {2048: 72.4, 1024: 72.2, 512: 72.2, 256: 71.8, 128: 69.6,
            64: 59.7}
# Its spreads over seeds, where it gives them.
PAPER_BN_STD = {128: 0.5, 64: 1.5}


def make_row(norm: str, batch: int, accumulation: int = 1) -> study.Row:
  """The row of `norm` everywhere at `batch` (in `accumulation` parts)."""
  extra = [('training.batch_size', batch)]
  name = f'{norm}_b{batch}'
  if accumulation > 1:
    extra.append(('training.accumulation_steps', accumulation))
    name += f'_acc{accumulation}'
  return study.Row(name, 'byol', norm, norm, norm, extra=tuple(extra))


def rows_for(batches: Sequence[int]) -> List[study.Row]:
  """Every norm at every batch, then the accumulation pair."""
  rows = [make_row(n, b) for n in NORMS for b in batches]
  return rows + [make_row(n, 256, ACCUMULATION) for n in NORMS]


ALL_ROWS = rows_for((32, 64, 128, 256, 512))


def label(row: study.Row) -> str:
  extra = dict(row.extra)
  text = f'{NORM_LABELS[row.encoder]}, batch {extra["training.batch_size"]}'
  accum = extra.get('training.accumulation_steps', 1)
  if accum > 1:
    text += f' as {accum} x {extra["training.batch_size"] // accum}'
  return text


def _norm_of(result: dict) -> str:
  """'gnws' or 'bn': the encoder's normalization (a key of NORM_LABELS)."""
  norm = result['overrides']['model.encoder.norm']
  return 'gnws' if norm == 'gn' else norm


def _batch_of(result: dict) -> int:
  return int(result['config']['training']['batch_size'])


def _accum_of(result: dict) -> int:
  return int(result['config']['training']['accumulation_steps'])


def images_per_sec(result: dict) -> float:
  """Training images/s of the run that finished it (probes excluded)."""
  steps = result['steps'] - result.get('resumed_from_step', 0)
  return steps * _batch_of(result) / max(result['pretrain_time_sec'], 1e-9)


def _cells(results: Dict[str, dict]) -> Dict[tuple, List[dict]]:
  """The runs by (norm, batch, accumulation steps)."""
  cells: Dict[tuple, List[dict]] = {}
  for r in results.values():
    cells.setdefault((_norm_of(r), _batch_of(r), _accum_of(r)), []).append(r)
  return cells


def _gains(runs: Sequence[dict], key: str = 'linear') -> List[float]:
  if key == 'linear':
    return [r['gain_over_init'] for r in runs]
  return [r['knn_top1'] - r['init_knn_top1'] for r in runs]


def paper_text(batch: int) -> str:
  """The paper's BN figure at `batch` with its spread and its change from
  batch 256, e.g. '69.6 ± 0.5 [-2.2]'; '-' where it gives none."""
  if batch not in PAPER_BN:
    return '-'
  text = f'{PAPER_BN[batch]:.1f}'
  if batch in PAPER_BN_STD:
    text += f' ± {PAPER_BN_STD[batch]:.1f}'
  return text + f' [{PAPER_BN[batch] - PAPER_BN[256]:+.1f}]'


def accumulation_match(full: Sequence[dict], accumulated: Sequence[dict],
                       key: str = 'loss') -> Optional[Tuple[int, float]]:
  """How closely an accumulated run follows the one-batch run of its seed.

  Args:
    full, accumulated: the two runs' metrics.jsonl records.
    key: a logged value that does not depend on how the batch was split
      (the loss is a mean over examples; the RankMe of the fixed
      diagnostics batch depends on the parameters only. proj_std does
      depend on it: it is a std over each micro-batch, then averaged).

  Returns:
    (number of logged steps compared, largest relative difference), or
    None when the runs share no logged step.
  """
  a = {m['step']: m.get(key) for m in full}
  b = {m['step']: m.get(key) for m in accumulated}
  steps = [k for k in sorted(set(a) & set(b))
           if a[k] is not None and b[k] is not None]
  if not steps:
    return None
  worst = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in steps)
  return len(steps), float(worst)


def summary_section(results: Dict[str, dict],
                    folder: Optional[Callable[[str], str]] = None) -> str:
  """The gain per batch size and normalization, against batch 256.

  `folder(run)` is where a run's metrics.jsonl is; with it the accumulation
  pairs are compared step by step, seed by seed.
  """
  cells = _cells(results)
  batches = sorted({k[1] for k in cells if k[2] == 1})
  lines = [
      '## Gain over initialisation by batch size',
      '',
      'Fast-probe linear top-1 minus that of the same encoder at '
      'initialisation (pp), mean ± sample std over seeds (n); in brackets the '
      'change from batch 256: the difference of the means ± its standard '
      'error (sqrt(s1²/n1 + s2²/n2); none with one seed). Last column: the '
      'BYOL paper\'s BatchNorm ResNet-50 on ImageNet (300 epochs; ± its '
      'spread where it gives one) and its change from batch 256, for the '
      'trend only. images/s: training throughput of the run that finished '
      'the row, on whatever else shared the machine then (indicative only; '
      '`experiments/benchmark.py` measures speed).',
      '',
      '| batch | ' + ' | '.join(
          f'{NORM_LABELS[n]} gain (pp) | {NORM_LABELS[n]} kNN gain (pp) | '
          f'{NORM_LABELS[n]} images/s' for n in NORMS) +
      ' | paper, BN BYOL (%) |',
      '|---:|' + '---:|---:|---:|' * len(NORMS) + '---:|',
  ]
  for b in batches:
    row = [str(b)]
    for n in NORMS:
      runs = cells.get((n, b, 1))
      if not runs:
        row += ['-', '-', '-']
        continue
      base = cells.get((n, 256, 1))
      texts = []
      for key in ('linear', 'knn'):
        text = study_report.mean_spread(_gains(runs, key), 100, sign=True)
        if base and b != 256:
          change = study_report.difference(_gains(runs, key),
                                           _gains(base, key), 100)
          text += f' [{change}]'
        texts.append(text)
      row += texts + [f'{np.mean([images_per_sec(r) for r in runs]):.0f}']
    row.append(paper_text(b))
    lines.append('| ' + ' | '.join(row) + ' |')
  lines += ['', '### Change of the linear gain from batch 256', '']
  for n in NORMS:
    base = cells.get((n, 256, 1))
    changes = []
    for b in sorted(batches, reverse=True):
      runs = cells.get((n, b, 1))
      if base and runs and b != 256:
        change = study_report.difference(_gains(runs), _gains(base), 100)
        changes.append(f'batch {b}: {change} pp (n={len(runs)} vs '
                       f'{len(base)})')
    lines.append(f'- {NORM_LABELS[n]}: ' + (
        '; '.join(changes) if changes else
        'no runs at batch 256 and below it yet') + '.')
  lines.append(
      '- BYOL paper, BatchNorm (ImageNet top-1, 300 epochs): ' + '; '.join(
          f'batch {b}: {PAPER_BN[b] - PAPER_BN[256]:+.1f}' +
          (f' ± {PAPER_BN_STD[b]:.1f}' if b in PAPER_BN_STD else '') + ' pp'
          for b in sorted(PAPER_BN, reverse=True) if b != 256) +
      ' (± the spread the paper gives for that batch).')
  pairs = []
  for n in NORMS:
    acc = cells.get((n, 256, ACCUMULATION))
    full = cells.get((n, 256, 1))
    if not acc:
      continue
    text = (f'- {NORM_LABELS[n]}, batch 256 as {ACCUMULATION} accumulated '
            f'micro-batches of {256 // ACCUMULATION}: gain '
            f'{study_report.mean_spread(_gains(acc), 100, sign=True)}')
    if full:
      text += (f' (one batch of 256: '
               f'{study_report.mean_spread(_gains(full), 100, sign=True)})')
    pairs.append(text + '.')
    full_by_seed = {r.get('seed', 0): r for r in full or ()}
    for r in acc:
      twin = full_by_seed.get(r.get('seed', 0))
      if twin is None:
        continue
      diff = (f'linear top-1 {study_report.pct(r["linear_top1"])}% vs '
              f'{study_report.pct(twin["linear_top1"])}%, final loss '
              f'{r["final_loss"]:.5f} vs {twin["final_loss"]:.5f}')
      if folder is not None:
        read = lambda run: metrics.read_metrics(
            os.path.join(folder(run), 'metrics.jsonl'))
        a, b = read(twin.get('run', twin['row'])), read(r.get('run', r['row']))
        for key in ('loss', 'rankme_proj'):
          match = accumulation_match(a, b, key)
          if match:
            diff += (f'; {key} at {match[0]} logged steps: largest relative '
                     f'difference {match[1]:.1e}')
      pairs.append(f'  - seed {r.get("seed", 0)}, accumulated vs one batch: '
                   f'{diff}.')
  if pairs:
    lines += ['', '### Accumulation pairs', '',
              'GN+WS has no statistic across examples, so 8 accumulated '
              'micro-batches of 32 (each example with the augmentations it '
              'has in the batch of 256) give the batch-256 step up to float '
              'rounding; BatchNorm normalizes each micro-batch by its own 32 '
              'examples. A whole run amplifies any difference, rounding '
              'included, so the logged steps below differ about as much as '
              'two seeds do; `python -m experiments.accumulation_check` '
              'compares the two step by step from the first step '
              '(`accumulation_check_<dataset>.md`).', '']
    lines += pairs
  return '\n'.join(lines) + '\n'


def write_gain_plot(path: str, results: Dict[str, dict]) -> None:
  """Gain over init against batch size, one line per normalization, and
  its change from batch 256 beside the BYOL paper's BatchNorm figures."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  cells = _cells(results)
  fig, (ax, ax_change) = plt.subplots(1, 2, figsize=(13, 5))
  for n, color in zip(NORMS, ('tab:blue', 'tab:orange')):
    bs = sorted(b for (m, b, k) in cells if m == n and k == 1)
    if not bs:
      continue
    gains = {b: [100 * g for g in _gains(cells[(n, b, 1)])] for b in bs}
    stats = [study_report.mean_std(gains[b]) for b in bs]
    counts = sorted({s[2] for s in stats})
    ax.errorbar(bs, [s[0] for s in stats], yerr=[s[1] for s in stats],
                color=color, marker='o', capsize=3,
                label=f'{NORM_LABELS[n]} (mean ± std over seeds; n='
                f'{"-".join(str(c) for c in counts[::max(len(counts) - 1, 1)])})')
    for b in bs:
      ax.scatter([b] * len(gains[b]), gains[b], color=color, s=12, alpha=0.5)
    acc = cells.get((n, 256, ACCUMULATION))
    if acc:
      ax.scatter([256 * 1.08] * len(acc), [100 * g for g in _gains(acc)],
                 color=color, marker='x', s=60,
                 label=f'{NORM_LABELS[n]}, 256 as {ACCUMULATION} x '
                 f'{256 // ACCUMULATION}')
    if 256 in gains:
      base = gains[256]
      ax_change.errorbar(
          bs, [study_report.mean_std(gains[b])[0] - np.mean(base) for b in bs],
          yerr=[np.sqrt(study_report.mean_std(gains[b])[1] ** 2 / len(gains[b])
                        + study_report.mean_std(base)[1] ** 2 / len(base))
                if b != 256 else 0.0 for b in bs],
          color=color, marker='o', capsize=3,
          label=f'{NORM_LABELS[n]}, this study (gain over init; ± s.e.)')
  pb = sorted(PAPER_BN)
  ax_change.errorbar(pb, [PAPER_BN[b] - PAPER_BN[256] for b in pb],
                     yerr=[PAPER_BN_STD.get(b, 0.0) for b in pb],
                     color='tab:orange', ls='--', marker='s', capsize=3,
                     mfc='none', label='BatchNorm, BYOL paper (ImageNet '
                     'top-1, ResNet-50, 300 ep)')
  ax_change.axhline(0, color='k', lw=0.5)
  for a in (ax, ax_change):
    a.set_xscale('log', base=2)
    a.xaxis.set_major_formatter(ticker.FormatStrFormatter('%d'))
    a.set_xlabel('batch size (learning rate base x batch / 256)')
    a.legend(fontsize=8)
    a.grid(True, alpha=0.3)
  ax.set_ylabel('fast-probe gain over initialisation (pp)')
  ax.set_title('This study: local preset on Fashion-MNIST')
  ax_change.set_ylabel('change from batch 256 (pp)')
  ax_change.set_title('Change from batch 256: this study and the BYOL paper')
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)


FLAGS = flags.FlagValues()
_BATCHES = flags.DEFINE_list('batches', [str(b) for b in DEFAULT_BATCHES],
                             'Batch sizes (from 32, 64, 128, 256, 512).',
                             flag_values=FLAGS)
_PAIRS = flags.DEFINE_bool('accumulation_pairs', True,
                           'Also batch 256 as 8 accumulated x 32.',
                           flag_values=FLAGS)
_EPOCHS = flags.DEFINE_float('epochs', DEFAULT_EPOCHS, 'Epochs per run.',
                             flag_values=FLAGS)
_SEEDS = flags.DEFINE_list('seeds', ['0', '1'], 'Seeds of every row.',
                           flag_values=FLAGS)
_DATASET = flags.DEFINE_enum('dataset', 'fashion_mnist', dataset_lib.DATASETS,
                             'Dataset.', flag_values=FLAGS)
_WORKDIR_ROOT, _RESULTS_DIR = study.define_output_flags(
    FLAGS, 'workdirs/batch_<dataset>_<epochs>ep')
_PROBE_TRAIN = flags.DEFINE_integer(
    'probe_train_examples', -1, 'Fit the probes on the first N train '
    'examples (-1: all).', flag_values=FLAGS)
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny network, 3 steps per run.',
                           flag_values=FLAGS)
_REPORT_ONLY = flags.DEFINE_bool(
    'report_only', False, 'Train nothing: rewrite the tables and plots from '
    'the runs finished under the workdir root, listing those of --batches x '
    '--seeds not finished yet.', flag_values=FLAGS)


def select(batches: Sequence[str], pairs: bool) -> List[study.Row]:
  """The rows of the batch sizes asked for (each one of ALL_ROWS')."""
  try:
    sizes = [int(b) for b in batches]
  except ValueError:
    raise UserError(f'--batches must be integers, got {",".join(batches)}'
                    ) from None
  known = sorted({int(dict(r.extra)['training.batch_size'])
                  for r in ALL_ROWS})
  bad = [b for b in sizes if b not in known]
  if bad or not sizes:
    raise UserError(f'--batches must be some of {",".join(map(str, known))}; '
                    f'got {",".join(batches)}')
  rows = [make_row(n, b) for n in NORMS for b in sizes]
  if pairs:
    rows += [make_row(n, 256, ACCUMULATION) for n in NORMS]
  return rows


@study.exits_as_cli()
def main(argv: Sequence[str], printer=print) -> int:
  """Runs the study; returns the exit status (2: bad input, one line)."""
  FLAGS.unparse_flags()
  FLAGS(['batch_study', *argv])
  rows = select(_BATCHES.value, _PAIRS.value)
  epochs, dataset, smoke = _EPOCHS.value, _DATASET.value, _SMOKE.value
  root = _WORKDIR_ROOT.value or os.path.join(
      study.ROOT, 'workdirs',
      f'batch_{dataset}_{epochs:g}ep{"_smoke" if smoke else ""}')
  results_dir = _RESULTS_DIR.value or (
      root if smoke else os.path.join(study.ROOT, 'experiments', 'results'))
  name = 'batch_study'
  run = study.report_study if _REPORT_ONLY.value else study.run_study
  run(
      rows, seeds=study.parse_seeds(_SEEDS.value), epochs=epochs,
      dataset=dataset, smoke=smoke, root=root, results_dir=results_dir,
      max_train=_PROBE_TRAIN.value, max_test=-1,
      command='python -m experiments.batch_study ' + ' '.join(argv),
      printer=printer, name=name, tag='batch',
      title=f'# BYOL and the batch size: GN+WS against BatchNorm '
      f'({epochs:g} epochs per run, {dataset})', label=label,
      all_rows=ALL_ROWS)
  record = '' if smoke else study.record_dir(results_dir, name, dataset,
                                             epochs)
  results = study.load_finished(root, ALL_ROWS, record=record)
  section = summary_section(
      results, folder=lambda run: study.run_dir(run, root, record))
  table = os.path.join(results_dir, f'{name}_{dataset}.md')
  with open(table, 'a') as f:
    f.write('\n' + section)
  plot = os.path.join(results_dir, f'{name}_{dataset}_by_batch.png')
  write_gain_plot(plot, results)
  printer(section)
  printer(f'[batch] wrote {plot}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
