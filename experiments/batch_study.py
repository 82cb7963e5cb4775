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
the paper's BatchNorm figures) and `batch_study_<dataset>.png`.

Commands:

  python -m experiments.batch_study                       # 4 sizes x 2 norms x 2 seeds + pairs
  python -m experiments.batch_study --batches=32,64,128,256,512 --seeds=0,1,2
  python -m experiments.batch_study --smoke --workdir_root=/tmp/bs  # plumbing
"""

import os
import sys
from typing import Dict, List, Sequence

from absl import flags
import numpy as np

from byol import dataset as dataset_lib
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


def summary_section(results: Dict[str, dict]) -> str:
  """The gain per batch size and normalization, against batch 256."""
  cells: Dict[tuple, List[dict]] = {}
  for r in results.values():
    key = (_norm_of(r), _batch_of(r), _accum_of(r))
    cells.setdefault(key, []).append(r)
  batches = sorted({k[1] for k in cells if k[2] == 1})
  lines = [
      '## Gain over initialisation by batch size',
      '',
      'Fast-probe linear top-1 minus that of the same encoder at '
      'initialisation (pp), mean ± sample std over seeds (n); in brackets the '
      'change of the mean from batch 256. Last column: the BYOL paper\'s '
      'BatchNorm ResNet-50 on ImageNet (300 epochs) and its change from '
      'batch 256, for the trend only. images/s: training throughput of the '
      'run that finished the row, on whatever else shared the machine then '
      '(indicative only; `experiments/benchmark.py` measures speed).',
      '',
      '| batch | ' + ' | '.join(
          f'{NORM_LABELS[n]} gain (pp) | {NORM_LABELS[n]} kNN gain (pp) | '
          f'{NORM_LABELS[n]} images/s' for n in NORMS) +
      ' | paper, BN BYOL (%) |',
      '|---:|' + '---:|---:|---:|' * len(NORMS) + '---:|',
  ]

  def gain(runs):
    return np.mean([r['gain_over_init'] for r in runs]) * 100

  for b in batches:
    row = [str(b)]
    for n in NORMS:
      runs = cells.get((n, b, 1))
      if not runs:
        row += ['-', '-', '-']
        continue
      text = study_report.mean_spread([r['gain_over_init'] for r in runs], 100,
                               sign=True)
      base = cells.get((n, 256, 1))
      if base and b != 256:
        text += f' [{gain(runs) - gain(base):+.2f}]'
      row += [text,
              study_report.mean_spread([r['knn_top1'] - r['init_knn_top1']
                                 for r in runs], 100, sign=True),
              f'{np.mean([images_per_sec(r) for r in runs]):.0f}']
    paper = PAPER_BN.get(b)
    row.append('-' if paper is None else
               f'{paper:.1f} [{paper - PAPER_BN[256]:+.1f}]')
    lines.append('| ' + ' | '.join(row) + ' |')
  pairs = []
  for n in NORMS:
    acc = cells.get((n, 256, ACCUMULATION))
    full = cells.get((n, 256, 1))
    if acc:
      text = (f'- {NORM_LABELS[n]}, batch 256 as {ACCUMULATION} accumulated '
              f'micro-batches of {256 // ACCUMULATION}: gain '
              f'{study_report.mean_spread([r["gain_over_init"] for r in acc], 100, sign=True)}')
      if full:
        text += (f' (one batch of 256: '
                 f'{study_report.mean_spread([r["gain_over_init"] for r in full], 100, sign=True)}'
                 f'; final loss {np.mean([r["final_loss"] for r in acc]):.4f} vs '
                 f'{np.mean([r["final_loss"] for r in full]):.4f})')
      pairs.append(text + '.')
  if pairs:
    lines += ['', '### Accumulation pairs', ''] + pairs
  return '\n'.join(lines) + '\n'


def write_gain_plot(path: str, results: Dict[str, dict]) -> None:
  """Gain over init against batch size, one line per normalization."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, (ax, ax_paper) = plt.subplots(1, 2, figsize=(12, 4.5))
  for n, color in zip(NORMS, ('tab:blue', 'tab:orange')):
    by_batch: Dict[int, List[float]] = {}
    for r in results.values():
      if _norm_of(r) == n and _accum_of(r) == 1:
        by_batch.setdefault(_batch_of(r), []).append(
            100 * r['gain_over_init'])
    if not by_batch:
      continue
    bs = sorted(by_batch)
    means = [np.mean(by_batch[b]) for b in bs]
    stds = [np.std(by_batch[b], ddof=1) if len(by_batch[b]) > 1 else 0.0
            for b in bs]
    ax.errorbar(bs, means, yerr=stds, color=color, marker='o', capsize=3,
                label=NORM_LABELS[n])
    for b in bs:
      ax.scatter([b] * len(by_batch[b]), by_batch[b], color=color, s=10,
                 alpha=0.5)
    for r in results.values():
      if _norm_of(r) == n and _accum_of(r) > 1:
        ax.scatter([_batch_of(r)], [100 * r['gain_over_init']], color=color,
                   marker='x', s=60,
                   label=f'{NORM_LABELS[n]}, 256 as {_accum_of(r)} x '
                   f'{_batch_of(r) // _accum_of(r)}')
  ax.set_xscale('log', base=2)
  ax.set_xlabel('batch size (learning rate base x batch / 256)')
  ax.set_ylabel('fast-probe gain over initialisation (pp)')
  ax.set_title('This study: local preset on Fashion-MNIST')
  handles, names = ax.get_legend_handles_labels()
  unique = dict(zip(names, handles))
  ax.legend(unique.values(), unique.keys(), fontsize=8)
  bs = sorted(PAPER_BN)
  ax_paper.plot(bs, [PAPER_BN[b] for b in bs], color='tab:orange',
                marker='o', label='BatchNorm BYOL (BYOL paper)')
  ax_paper.set_xscale('log', base=2)
  ax_paper.set_xlabel('batch size')
  ax_paper.set_ylabel('ImageNet linear top-1 (%)')
  ax_paper.set_title('BYOL paper, ResNet-50, 300 epochs')
  ax_paper.legend(fontsize=8)
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
  study.run_study(
      rows, seeds=study.parse_seeds(_SEEDS.value), epochs=epochs,
      dataset=dataset, smoke=smoke, root=root, results_dir=results_dir,
      max_train=_PROBE_TRAIN.value, max_test=-1,
      command='python -m experiments.batch_study ' + ' '.join(argv),
      printer=printer, name=name, tag='batch',
      title=f'# BYOL and the batch size: GN+WS against BatchNorm '
      f'({epochs:g} epochs per run, {dataset})', label=label,
      all_rows=ALL_ROWS)
  results = study.load_finished(
      root, ALL_ROWS, record='' if smoke else study.record_dir(
          results_dir, name, dataset, epochs))
  section = summary_section(results)
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
