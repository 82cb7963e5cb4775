r"""Why GN+WS BYOL collapses at CPU scale, and what keeps it from collapsing.

Every variant is the paper's GN+WS network (GroupNorm + weight
standardization in the encoder, projector and predictor) on the `local`
preset, with one training setting changed; the rows with BatchNorm everywhere
and with no normalization give the two ends. The variants start from
DeepMind's settings (`dm`: predictor learning rate x1, biases and norm
parameters outside LARS' trust ratio and weight decay, tau_base 0.99), which
is what the project's `local` preset was before this study; the preset now
carries the winner (`pred_lr_x10`).

For each run: proj_std and the effective rank (RankMe) of the projections
and embeddings over training (metrics.jsonl, fixed diagnostics batch), and
the fast linear probe and kNN of the trained encoder against the same
encoder at initialisation. The table and plot go to
`experiments/results/collapse_study_<dataset>.{md,png}`. Runs are resumable
and skipped once finished, like the ablation's (same runner).

Commands:

  python -m experiments.collapse_study                      # 0.5 epoch each
  python -m experiments.collapse_study --epochs=1.5 --workdir_root=workdirs/collapse_1.5
  python -m experiments.collapse_study --rows=dm,pred_lr_x10 --epochs=5 \
      --workdir_root=workdirs/collapse_5
  python -m experiments.collapse_study --rows=dm,pred_lr_x10 --epochs=5 \
      --seeds=0,1 --workdir_root=workdirs/collapse_5 --report_only
"""

import os
import sys
from typing import Sequence

from absl import flags

from byol import dataset as dataset_lib
from byol.errors import UserError
from experiments import study

# DeepMind's settings on the GN+WS network: the starting point.
DM = (('training.predictor_lr_multiplier', 1.0),)
NORM_IN_LARS = (('training.trust_ratio_on_norm_and_bias', True),
                ('training.weight_decay_on_norm_and_bias', True))


def _gnws(name, *extra, quick=True):
  return study.Row(name, 'byol', 'gnws', 'gnws', 'gnws', quick=quick,
                      extra=DM + tuple(extra))


ROWS = (
    # In the order they run: the most telling first.
    _gnws('dm'),
    _gnws('pred_lr_x10', ('training.predictor_lr_multiplier', 10.0)),
    study.Row('bn_all_pred_lr_x10', 'byol', 'bn', 'bn', 'bn',
              extra=(('training.predictor_lr_multiplier', 10.0),)),
    _gnws('tau_0.996', ('training.tau_base', 0.996)),
    _gnws('norm_in_lars', *NORM_IN_LARS),
    study.Row('none_pred_lr_x10', 'byol', 'none', 'none', 'none',
              extra=(('training.predictor_lr_multiplier', 10.0),)),
    _gnws('pred_x10_tau_norm', ('training.predictor_lr_multiplier', 10.0),
          ('training.tau_base', 0.996), *NORM_IN_LARS),
    _gnws('pred_lr_x3', ('training.predictor_lr_multiplier', 3.0)),
    study.Row('bn_all_dm', 'byol', 'bn', 'bn', 'bn', extra=DM),
    _gnws('heads_1024_g16', ('model.projector.hidden_size', 1024),
          ('model.projector.num_groups', 16),
          ('model.predictor.hidden_size', 1024),
          ('model.predictor.num_groups', 16)),
    _gnws('lr_0.3_warmup_0.5', ('training.base_lr', 0.3),
          ('training.warmup_epochs', 0.5)),
    _gnws('wd_1e-4', ('training.weight_decay', 1e-4)),
)


def label(row: study.Row) -> str:
  """The variant's overrides beyond its norms, e.g. `tau_base=0.996`."""
  norms = ('GN+WS' if row.encoder == 'gnws' else
           'BN' if row.encoder == 'bn' else 'no norm')
  changes = [f'{k.split(".")[-1]}={v:g}' if isinstance(v, float)
             and not isinstance(v, bool) else f'{k.split(".")[-1]}={v}'
             for k, v in dict(row.extra).items()]
  return f'{norms}: ' + ', '.join(changes)


# Its own flag namespace: importable beside experiments.ablation.
FLAGS = flags.FlagValues()
_ROWS = flags.DEFINE_list('rows', [], 'Variants to run (default: all): ' +
                          ', '.join(r.name for r in ROWS), flag_values=FLAGS)
_EPOCHS = flags.DEFINE_float('epochs', 0.5, 'Pretraining epochs per run.', flag_values=FLAGS)
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds of every variant.', flag_values=FLAGS)
_DATASET = flags.DEFINE_enum('dataset', 'fashion_mnist', dataset_lib.DATASETS,
                             'Dataset.', flag_values=FLAGS)
_WORKDIR_ROOT, _RESULTS_DIR = study.define_output_flags(
    FLAGS, 'workdirs/collapse_<dataset>_<epochs>ep')
_PROBE_TRAIN = flags.DEFINE_integer(
    'probe_train_examples', 20000, 'Fit the probes on the first N train '
    'examples (-1: all).', flag_values=FLAGS)
_REPORT_ONLY = flags.DEFINE_bool(
    'report_only', False, 'Train nothing: rewrite the table and plot from '
    'the runs finished under the workdir root, listing those of --rows x '
    '--seeds not finished yet.', flag_values=FLAGS)
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny network, 3 steps per run.', flag_values=FLAGS)


@study.exits_as_cli()
def main(argv: Sequence[str], printer=print) -> int:
  """Runs the study; returns the exit status (2: bad input, one line)."""
  FLAGS.unparse_flags()
  FLAGS(['collapse_study', *argv])
  by_name = {r.name: r for r in ROWS}
  unknown = [n for n in _ROWS.value if n not in by_name]
  if unknown:
    raise UserError(f'unknown variant(s) {", ".join(unknown)}; choose from '
                    f'{", ".join(by_name)}')
  rows = [by_name[n] for n in _ROWS.value] or list(ROWS)
  epochs, dataset = _EPOCHS.value, _DATASET.value
  root = _WORKDIR_ROOT.value or os.path.join(
      study.ROOT, 'workdirs',
      f'collapse_{dataset}_{epochs:g}ep{"_smoke" if _SMOKE.value else ""}')
  run = study.report_study if _REPORT_ONLY.value else study.run_study
  run(
      rows, seeds=study.parse_seeds(_SEEDS.value), epochs=epochs,
      dataset=dataset, smoke=_SMOKE.value, root=root,
      results_dir=_RESULTS_DIR.value or os.path.join(
          study.ROOT, 'experiments', 'results'),
      max_train=_PROBE_TRAIN.value, max_test=-1,
      command='python -m experiments.collapse_study ' + ' '.join(argv),
      printer=printer, name=f'collapse_study_{epochs:g}ep', tag='collapse',
      title=f'# Collapse study: GN+WS BYOL at CPU scale ({epochs:g} epochs '
      f'per run, {dataset})', label=label, all_rows=ROWS)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
