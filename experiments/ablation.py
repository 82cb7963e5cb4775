r"""The paper's ablation table at CPU scale: which normalization BYOL needs.

Richemond et al. (2020) remove BatchNorm from BYOL's encoder, projector and
predictor one combination at a time (and from SimCLR's encoder and
projector), then replace it by GroupNorm + weight standardization, or by the
BN-init protocol. Here every row of that table is a set of config overrides
over `configs/byol.py:local` (a width-0.25 small-stem ResNet on 24 px
Fashion-MNIST crops, batch 256, LARS base lr 1.0), run in turn:

  1. pretraining in `<workdir_root>/<row>` (an interrupted row resumes from
     its last checkpoint);
  2. proj_std of the row's network at step 0 (the initial online network on
     the first training batch), to judge collapse relative to it;
  3. the fast probe (L-BFGS logistic regression on frozen, unaugmented
     features) and kNN of the trained encoder, and of the same encoder at
     initialisation: GroupNorm and un-normalized networks start as much
     weaker feature extractors than BatchNorm ones, so the gain over the
     row's own initialisation is reported beside the accuracy;
  4. `<workdir_root>/<row>/row_summary.json`. A row with that file is
     finished: a rerun skips it.

Then `experiments/results/ablation_<dataset>.md` (the table, the raw-pixel
logistic-regression baseline, the paper's ImageNet figures where known) and
`ablation_<dataset>.png` (top-1 per row; proj_std over training per row) are
written from every finished row of `<workdir_root>`.

Scale. On 2 CPU cores (oneDNN convolutions) the local preset pretrains at a
median 490 images/s (evaluations included) and the two probes of a run take
about 55 s, so a run of E epochs of the 60,000 Fashion-MNIST images costs
about 60000*E/490 s + 1 min: with the default E = 1.25, a median 3m20s
(2m20s-6m over the 42 runs of the full table with 3 seeds); the quick subset
(6 rows) about 21 minutes per seed and the full table (14 rows) about 48.
`--epochs` changes E for every row (rows already finished with another E are
refused: use another --workdir_root).

Commands:

  ./run.sh ablation                       # the quick subset (6 rows)
  ./run.sh ablation --full                # all 14 rows
  python -m experiments.ablation --rows=byol_bn_all,byol_bn_none --epochs=0.5
  python -m experiments.ablation --smoke --workdir_root=/tmp/abl   # plumbing
  python -m experiments.ablation --full --seeds=0,1,2 --report_only \
      --workdir_root=DIR --results_dir=/tmp/report  # table + plot, no training

`--smoke` runs a tiny network (width 0.125, 16 px) for 3 steps per row and
probes on 1,000 train / 1,000 test images: it checks the plumbing, its
numbers mean nothing.
"""

import os
import sys
from typing import List, Sequence

from absl import flags

from byol import dataset as dataset_lib
from byol import host_memory
from byol.errors import UserError
from experiments import study
from experiments.study import Row

DEFAULT_EPOCHS = 1.25

ROWS = (
    # BYOL: BatchNorm (no WS) or nothing in each of the three components.
    Row('byol_bn_all', 'byol', 'bn', 'bn', 'bn', quick=True,
        paper='72.5 (300 ep); 74.3 (1000 ep)'),
    Row('byol_bn_enc_proj', 'byol', 'bn', 'bn', 'none'),
    Row('byol_bn_enc_pred', 'byol', 'bn', 'none', 'bn'),
    Row('byol_bn_enc', 'byol', 'bn', 'none', 'none', quick=True,
        paper='72.1 (300 ep)'),
    Row('byol_bn_proj_pred', 'byol', 'none', 'bn', 'bn'),
    Row('byol_bn_proj', 'byol', 'none', 'bn', 'none'),
    Row('byol_bn_pred', 'byol', 'none', 'none', 'bn'),
    Row('byol_bn_none', 'byol', 'none', 'none', 'none', quick=True,
        paper='0.1 (300 ep)'),
    # The paper's answers: GN+WS everywhere; BN folded into affines at init.
    Row('byol_gnws', 'byol', 'gnws', 'gnws', 'gnws', quick=True,
        paper='73.9 (1000 ep)'),
    Row('byol_bn_init', 'byol', 'bn', 'bn', 'bn', init='bn_init', quick=True,
        paper='65.7 (1000 ep)'),
    # SimCLR: BatchNorm or nothing in the encoder and the projector.
    Row('simclr_bn_all', 'simclr', 'bn', 'bn'),
    Row('simclr_bn_enc', 'simclr', 'bn', 'none'),
    Row('simclr_bn_proj', 'simclr', 'none', 'bn'),
    Row('simclr_bn_none', 'simclr', 'none', 'none', quick=True),
)
ROWS_BY_NAME = {r.name: r for r in ROWS}

# --smoke: the network and run length of the unit tests.
_FULL = flags.DEFINE_bool('full', False,
                          'Every row (default: the quick subset).')
_ROWS = flags.DEFINE_list(
    'rows', [], 'Row names (overrides --full), from: ' + ', '.join(
        f'{r.name}{"*" if r.quick else ""}' for r in ROWS) +
    ' (* = quick subset).')
_EPOCHS = flags.DEFINE_float('epochs', DEFAULT_EPOCHS,
                             'Pretraining epochs per row.')
_DATASET = flags.DEFINE_enum('dataset', 'fashion_mnist', dataset_lib.DATASETS,
                             'Dataset of every row.')
_WORKDIR_ROOT = flags.DEFINE_string(
    'workdir_root', '', 'Default: workdirs/ablation_<dataset>[_smoke].')
_RESULTS_DIR = flags.DEFINE_string(
    'results_dir', '', 'Default: experiments/results (with --smoke: the '
    'workdir root).')
_SMOKE = flags.DEFINE_bool('smoke', False,
                           'Tiny network, 3 steps per row (plumbing only).')
_SEEDS = flags.DEFINE_list(
    'seeds', ['0'], 'Seeds to run every row with (e.g. 0,1,2 for the spread '
    'over seeds); seed 0 runs in <root>/<row>, seed k in <root>/<row>_seedk.')
_PROBE_TRAIN = flags.DEFINE_integer(
    'probe_train_examples', -1, 'Fit the probes on the first N train '
    'examples (-1: all; --smoke: 1000).')
_REPORT_ONLY = flags.DEFINE_bool(
    'report_only', False, 'Train nothing: rewrite the table and plot from '
    'the runs finished under the workdir root, listing those of --rows/--full '
    'x --seeds not finished yet.')
_PROBE_TEST = flags.DEFINE_integer(
    'probe_test_examples', -1, 'Score the probes on the first N test '
    'examples (-1: all; --smoke: 1000).')


def select_rows(names: Sequence[str], full: bool) -> List[Row]:
  """The rows named (all of them known), else the quick subset or all."""
  if names:
    unknown = [n for n in names if n not in ROWS_BY_NAME]
    if unknown:
      raise UserError(f'unknown row(s) {", ".join(unknown)}; choose from '
                      f'{", ".join(ROWS_BY_NAME)}')
    return [ROWS_BY_NAME[n] for n in names]
  return [r for r in ROWS if full or r.quick]


@study.exits_as_cli()
def main(argv: Sequence[str], printer=print) -> int:
  """Parses the flags in `argv` (without the program name) and runs.

  Returns the exit status: 0, 2 for bad input (one `error:` line on
  stderr), 128 + the signal that stopped a row.
  """
  flags.FLAGS.unparse_flags()  # each call parses afresh (tests call main)
  flags.FLAGS(['ablation', *argv])
  epochs, dataset, smoke = _EPOCHS.value, _DATASET.value, _SMOKE.value
  rows = select_rows(_ROWS.value, _FULL.value)
  suffix = '_smoke' if smoke else ''
  root = _WORKDIR_ROOT.value or os.path.join(
      study.ROOT, 'workdirs', f'ablation_{dataset}{suffix}')
  results_dir = _RESULTS_DIR.value or (
      root if smoke else os.path.join(study.ROOT, 'experiments', 'results'))
  run = study.report_study if _REPORT_ONLY.value else study.run_study
  run(rows, seeds=study.parse_seeds(_SEEDS.value), epochs=epochs,
      dataset=dataset, smoke=smoke, root=root, results_dir=results_dir,
      max_train=_PROBE_TRAIN.value, max_test=_PROBE_TEST.value,
      command='./run.sh ablation ' + ' '.join(argv), printer=printer,
      tag='ablation', all_rows=ROWS)
  return 0


if __name__ == '__main__':
  host_memory.keep_freed_memory()  # as main.py, before JAX starts
  sys.exit(main(sys.argv[1:]))

