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

Scale. On 2 CPU cores the local preset trains at about 130 images/s, and the
two probes of a row are estimated at about 3 minutes, so a row of E epochs of the
60,000 Fashion-MNIST images costs about 60000*E/130 s + 3 min: with the
default E = 1.25, about 12.5 minutes; the quick subset (6 rows) about 75
minutes and the full table (14 rows) about 3 hours. `--epochs` changes E for
every row (rows already finished with another E are refused: use another
--workdir_root).

Commands:

  ./run.sh ablation                       # the quick subset (6 rows)
  ./run.sh ablation --full                # all 14 rows
  python -m experiments.ablation --rows=byol_bn_all,byol_bn_none --epochs=0.5
  python -m experiments.ablation --smoke --workdir_root=/tmp/abl   # plumbing

`--smoke` runs a tiny network (width 0.125, 16 px) for 3 steps per row and
probes on 1,000 train / 1,000 test images: it checks the plumbing, its
numbers mean nothing.
"""

import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Dict, List, Sequence

from absl import flags
import jax
import ml_collections
import numpy as np

from byol import dataset as dataset_lib
from byol import devices
from byol import diagnostics
from byol import eval_experiment
from byol import experiment
from byol import files
from byol import model
from byol import train_loop
from byol.errors import UserError
from configs import byol as byol_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_SUMMARY = 'row_summary.json'
DEFAULT_EPOCHS = 1.25
# A row has collapsed when its final proj_std is below this fraction of its
# proj_std at step 0 (a collapsed network maps every image to one point).
COLLAPSE_RATIO = 0.1
# For the ETA before any row has finished: measured on 2 CPU cores.
LOCAL_IMAGES_PER_SEC = 130.0
PROBE_SECONDS = 180.0

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
  """
  name: str
  method: str
  encoder: str
  projector: str
  predictor: str = 'none'
  init: str = 'default'
  paper: str = ''
  quick: bool = False

  def overrides(self) -> Dict[str, object]:
    """Config fields (dotted) that make this row from the local preset."""
    out = {'method': self.method, 'model.init': self.init}
    for part in ('encoder', 'projector', 'predictor'):
      norm, ws = NORM_CHOICES[getattr(self, part)]
      out[f'model.{part}.norm'] = norm
      out[f'model.{part}.weight_standardization'] = ws
    return out

  def label(self) -> str:
    parts = [f'enc {self.encoder}', f'proj {self.projector}']
    if self.method == 'byol':
      parts.append(f'pred {self.predictor}')
    text = f'{self.method}: ' + ', '.join(parts)
    return text + (', BN-init' if self.init == 'bn_init' else '')


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
}
SMOKE_PROBE_EXAMPLES = 1000


def row_config(row: Row, *, dataset: str, epochs: float,
               smoke: bool) -> ml_collections.ConfigDict:
  """The locked pretraining config of `row`."""
  config = byol_config.get_config('local')
  config.unlock()
  config.update_from_flattened_dict(row.overrides())
  config.update_from_flattened_dict({
      'data.dataset': dataset,
      'training.epochs': float(epochs),
      # Checkpoints are cheap at this scale; an interrupted row loses little.
      'training.checkpoint_every_steps': 100,
  })
  if smoke:
    config.update_from_flattened_dict(SMOKE_OVERRIDES)
  config.lock()
  return config


def read_metrics(workdir: str) -> List[dict]:
  """metrics.jsonl, one record per step (a resumed run's repeats dropped)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        by_step[record['step']] = record
  return [by_step[s] for s in sorted(by_step)]


def initial_proj_std(config: ml_collections.ConfigDict, state) -> float:
  """proj_std of the initial online network on the first training batch.

  The same statistic as the logged `proj_std` (std over the batch of the
  L2-normalised projections of view 1, averaged over dimensions), on the
  same kind of batch: the first `training.batch_size` pretraining examples,
  augmented, network in training mode.
  """
  c = config
  forward = model.make_forward(
      c, dataset_lib.num_classes(c.data.dataset), axis_name=None)
  aug_rng, fwd_rng = jax.random.split(jax.random.PRNGKey(c.seed))
  images = experiment.augmented_batch(c, c.training.batch_size,
                                      data_seed=c.seed, rng=aug_rng)

  @jax.jit
  def proj_std(params, net_state, images, rng):
    out, _ = forward.apply(params, net_state, rng, images, True)
    return diagnostics.proj_std(out['projection'], None)

  return float(proj_std(state.online_params, state.online_state, images,
                        fwd_rng))


def raw_pixel_baseline(root: str, *, dataset: str, image_size: int,
                       max_train_examples: int, max_test_examples: int,
                       printer=print) -> dict:
  """Logistic regression on the raw pixels (cached in <root>/raw_pixels.json)."""
  path = os.path.join(root, 'raw_pixels.json')
  key = dict(dataset=dataset, image_size=image_size,
             max_train_examples=max_train_examples,
             max_test_examples=max_test_examples)
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get('key') == key:
      return cached['result']
  printer(f'[ablation] raw-pixel baseline: logistic regression on the '
          f'{image_size}x{image_size} pixels')
  result = eval_experiment.feature_probe(
      eval_experiment.pixels_embed, None, None, dataset=dataset,
      image_size=image_size, max_train_examples=max_train_examples,
      max_test_examples=max_test_examples)
  files.write_json(path, {'key': key, 'result': result})
  return result


def _config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def run_row(row: Row, config: ml_collections.ConfigDict, workdir: str, *,
            max_train_examples: int, max_test_examples: int,
            printer=print) -> dict:
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
    printer(f'[ablation] {row.name}: {e}')
    status = 'diverged'
    # Finiteness is checked at logged steps: the first check after the last
    # logged record failed.
    metrics = read_metrics(workdir)
    last = int(metrics[-1]['step']) if metrics else 0
    diverged_at = min(last + config.training.log_every_steps,
                      experiment.num_steps(config))
  train_time = time.time() - t0
  init_state = devices.unreplicate(exp.initial_state())
  if status == 'diverged':
    step = exp.checkpointer.latest_step()
    trained = (exp.checkpointer.restore(step, target=exp.state_template())[0]
               if step is not None else init_state)
  proj_std0 = initial_proj_std(config, init_state)
  probe = eval_experiment.probe_report(
      exp, workdir, printer=printer, max_train_examples=max_train_examples,
      max_test_examples=max_test_examples, initial_state=init_state,
      trained_state=trained)
  metrics = read_metrics(workdir)
  final_proj_std = float(metrics[-1]['proj_std']) if metrics else float('nan')
  relative = final_proj_std / max(proj_std0, 1e-12)
  result = {
      'row': row.name,
      'label': row.label(),
      'overrides': row.overrides(),
      'status': status,
      'diverged_by_step': diverged_at,
      'steps': experiment.num_steps(config),
      'epochs': config.training.epochs,
      'linear_top1': probe['trained']['top1_accuracy'],
      'linear_top5': probe['trained']['top5_accuracy'],
      'knn_top1': probe['trained']['knn_top1_accuracy'],
      'init_linear_top1': probe['init']['top1_accuracy'],
      'init_knn_top1': probe['init']['knn_top1_accuracy'],
      'gain_over_init': (probe['trained']['top1_accuracy'] -
                         probe['init']['top1_accuracy']),
      'proj_std_step0': proj_std0,
      'proj_std_final': final_proj_std,
      'proj_std_relative': relative,
      'collapsed': bool(status == 'diverged' or not relative >= COLLAPSE_RATIO),
      'final_loss': float(metrics[-1]['loss']) if metrics else float('nan'),
      'pretrain_time_sec': train_time,
      'wall_time_sec': time.time() - t0,
      'resumed_from_step': int(resumed_from),
      'paper': row.paper,
      'config': _config_dict(config),
  }
  files.write_json(os.path.join(workdir, ROW_SUMMARY), result)
  return result


def load_finished(root: str) -> Dict[str, dict]:
  """Row summaries found under `root`, by row name."""
  out = {}
  for row in ROWS:
    path = os.path.join(root, row.name, ROW_SUMMARY)
    if os.path.exists(path):
      with open(path) as f:
        out[row.name] = json.load(f)
  return out


# ---------------------------------------------------------------------------
# Outputs.


def _pct(x) -> str:
  return 'n/a' if x is None or not np.isfinite(x) else f'{100 * x:.2f}'


def _length(config: dict) -> str:
  """'E epochs (N steps of B images)' of a resolved config dict."""
  t = config['training']
  steps = experiment.num_steps(ml_collections.ConfigDict(config))
  text = f'{steps} steps of {t["batch_size"]} images'
  return text if t['max_steps'] > 0 else f'{t["epochs"]:g} epochs ({text})'


def _duration(seconds: float) -> str:
  return train_loop.format_duration(seconds)


def write_table(path: str, results: Dict[str, dict], baseline: dict, *,
                dataset: str, command: str, max_train_examples: int = -1,
                max_test_examples: int = -1) -> str:
  """Writes the markdown table of every finished row; returns its text."""
  subset = ''
  if max_train_examples > 0 or max_test_examples > 0:
    subset = (' Probes fitted on the first '
              f'{max_train_examples if max_train_examples > 0 else "all"} '
              'train examples and scored on the first '
              f'{max_test_examples if max_test_examples > 0 else "all"} test '
              'examples only.')
  lengths = sorted({_length(r['config']) for r in results.values()})
  lines = [
      f'# BYOL without batch statistics: the ablation table on {dataset}',
      '',
      f'Written by `{command}` on '
      f'{datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}, from the '
      f'finished rows of its workdir root. Every row is '
      '`configs/byol.py:local` plus its overrides (bn = BatchNorm without '
      'WS, none = no normalization, gnws = GroupNorm(8)+WS), pretrained for '
      f'{"; ".join(lengths)}.{subset}',
      '',
      '- **linear top-1**: the fast probe (multinomial logistic regression, '
      'L-BFGS, on frozen, unaugmented, standardized features; TEST split). '
      'This is not DeepMind\'s linear protocol (`configs/eval.py`), which is '
      'too slow for a CPU table.',
      '- **gain**: linear top-1 minus that of the same encoder at '
      'initialisation, probed the same way.',
      '- **kNN top-1**: cosine kNN, k=200, votes weighted by '
      'exp(similarity/0.07).',
      '- **proj_std**: std over the batch of the L2-normalised projections '
      '(last logged step); **rel.**: divided by its value at step 0; '
      f'**collapsed** when rel. < {COLLAPSE_RATIO:g} (or the loss diverged).',
      '- **wall time**: pretraining and probes, in the run that finished the '
      'row (the part before an interruption is not counted).',
      '- **paper**: the paper\'s ResNet-50 ImageNet linear top-1 for the '
      'configuration, where it gives one; a different scale entirely, for '
      'the ordering only.',
      '',
      '| row | overrides | linear top-1 (%) | gain over init (pp) | '
      'kNN top-1 (%) | proj_std | rel. to step 0 | collapsed | wall time | '
      'paper, ImageNet (%) |',
      '|---|---|---:|---:|---:|---:|---:|---|---:|---|',
  ]
  for row in ROWS:
    r = results.get(row.name)
    if r is None:
      continue
    collapsed = 'yes' if r['collapsed'] else 'no'
    if r['status'] == 'diverged':
      collapsed += f' (diverged by step {r["diverged_by_step"]})'
    lines.append(
        f'| {row.name} | {row.label()} | {_pct(r["linear_top1"])} | '
        f'{100 * r["gain_over_init"]:+.2f} | {_pct(r["knn_top1"])} | '
        f'{r["proj_std_final"]:.4f} | {r["proj_std_relative"]:.3f} | '
        f'{collapsed} | {_duration(r["wall_time_sec"])} | '
        f'{row.paper or "-"} |')
  lines += [
      '',
      f'Raw-pixel baseline (the same logistic regression on the '
      f'{baseline["feature_dim"]} pixel values): linear top-1 '
      f'{_pct(baseline["top1_accuracy"])}%, kNN top-1 '
      f'{_pct(baseline["knn_top1_accuracy"])}%.',
      '',
      'Rows at initialisation (the same probe): ' + ', '.join(
          f'{name} {_pct(results[name]["init_linear_top1"])}%'
          for name in (r.name for r in ROWS) if name in results) + '.',
      '',
  ]
  text = '\n'.join(lines)
  with open(path, 'w') as f:
    f.write(text)
  return text


def write_plot(path: str, results: Dict[str, dict], baseline: dict,
               root: str) -> None:
  """Bar chart of top-1 per row, and proj_std over training per row."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  names = [r.name for r in ROWS if r.name in results]
  fig, (ax_bar, ax_std) = plt.subplots(1, 2, figsize=(14, 0.45 * len(names) + 3))
  y = np.arange(len(names))
  trained = [100 * results[n]['linear_top1'] for n in names]
  init = [100 * results[n]['init_linear_top1'] for n in names]
  colors = ['tab:red' if results[n]['collapsed'] else 'tab:blue'
            for n in names]
  bars = ax_bar.barh(y - 0.2, trained, height=0.4, color=colors,
                     label='after pretraining (red: collapsed)')
  ax_bar.bar_label(bars, fmt='%.1f', fontsize=7, padding=2)
  ax_bar.barh(y + 0.2, init, height=0.4, color='tab:gray', alpha=0.6,
              label='same encoder at initialisation')
  ax_bar.axvline(100 * baseline['top1_accuracy'], color='k', ls='--', lw=1,
                 label='raw pixels')
  ax_bar.set_yticks(y, names)
  ax_bar.invert_yaxis()
  ax_bar.set_xlabel('linear top-1 (%), fast probe')
  ax_bar.set_xlim(0, 100)
  ax_bar.set_title('Fast linear probe, TEST split')
  ax_bar.legend(loc='upper center', bbox_to_anchor=(0.5, -0.2), ncol=3,
                fontsize=8)

  cmap = plt.get_cmap('tab20')
  for i, n in enumerate(names):
    records = read_metrics(os.path.join(root, n))
    steps = [0] + [r['step'] for r in records]
    stds = [results[n]['proj_std_step0']] + [r['proj_std'] for r in records]
    ax_std.plot(steps, np.maximum(stds, 1e-8), color=cmap(i % 20),
                ls='--' if results[n]['collapsed'] else '-', label=n)
  ax_std.set_yscale('log')
  ax_std.set_xlabel('step')
  ax_std.set_ylabel('proj_std (dashed: collapsed)')
  ax_std.set_title('proj_std during pretraining (step 0: initial network)')
  ax_std.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)


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
_PROBE_TRAIN = flags.DEFINE_integer(
    'probe_train_examples', -1, 'Fit the probes on the first N train '
    'examples (-1: all; --smoke: 1000).')
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


def main(argv: Sequence[str], printer=print) -> int:
  """Parses the flags in `argv` (without the program name) and runs.

  Returns the exit status: 0, 2 for bad input (one `error:` line on
  stderr), 128 + the signal that stopped a row.
  """
  flags.FLAGS.unparse_flags()  # each call parses afresh (tests call main)
  try:
    flags.FLAGS(['ablation', *argv])
    return _main(argv, printer)
  except flags.Error as e:
    print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    return 2
  except UserError as e:
    print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    return 2
  except train_loop.Preempted as e:
    print(f'preempted: {e}', file=sys.stderr)
    return e.exit_status


def _main(argv, printer) -> int:
  epochs, dataset, smoke = _EPOCHS.value, _DATASET.value, _SMOKE.value
  if epochs <= 0:
    raise UserError(f'--epochs must be positive, got {epochs}')
  rows = select_rows(_ROWS.value, _FULL.value)
  suffix = '_smoke' if smoke else ''
  root = _WORKDIR_ROOT.value or os.path.join(
      ROOT, 'workdirs', f'ablation_{dataset}{suffix}')
  results_dir = _RESULTS_DIR.value or (
      root if smoke else os.path.join(ROOT, 'experiments', 'results'))
  default_probe = SMOKE_PROBE_EXAMPLES if smoke else -1
  max_train = (_PROBE_TRAIN.value if _PROBE_TRAIN.value != -1
               else default_probe)
  max_test = (_PROBE_TEST.value if _PROBE_TEST.value != -1
              else default_probe)
  os.makedirs(root, exist_ok=True)
  os.makedirs(results_dir, exist_ok=True)
  configs = {r.name: row_config(r, dataset=dataset, epochs=epochs,
                                smoke=smoke) for r in rows}
  for config in configs.values():
    experiment.validate_config(config)

  def estimate(config):
    steps = experiment.num_steps(config)
    return steps * config.training.batch_size / LOCAL_IMAGES_PER_SEC + (
        PROBE_SECONDS)

  printer(f'[ablation] {len(rows)} row(s) on {dataset}, '
          f'{"smoke (3 steps, tiny network)" if smoke else f"{epochs:g} epoch(s) per row"}; '
          f'workdirs under {root}')
  finished = load_finished(root)
  todo = [r for r in rows if r.name not in finished]
  remaining = sum(estimate(configs[r.name]) for r in todo)
  printer(f'[ablation] {len(rows) - len(todo)} finished earlier, '
          f'{len(todo)} to run; estimated {_duration(remaining)} at '
          f'{LOCAL_IMAGES_PER_SEC:.0f} images/s')
  durations, estimates = [], []
  for i, row in enumerate(rows, 1):
    config = configs[row.name]
    workdir = os.path.join(root, row.name)
    head = f'[ablation] row {i}/{len(rows)} {row.name} ({row.label()})'
    if row.name in finished:
      diff = train_loop.config_differences(finished[row.name]['config'],
                                           _config_dict(config))
      if diff:
        raise UserError(
            f'row {row.name} in {workdir} was run with another config '
            f'({", ".join(diff[:4])}); use another --workdir_root')
      printer(f'{head}: finished earlier, skipped')
      continue
    left = [r for r in rows[i:] if r.name not in finished]
    printer(f'{head}: {experiment.num_steps(config)} steps')
    t0 = time.time()
    result = run_row(row, config, workdir, max_train_examples=max_train,
                     max_test_examples=max_test, printer=printer)
    durations.append(time.time() - t0)
    estimates.append(estimate(config))
    finished[row.name] = result
    # Compiled programs of this row are not needed again.
    jax.clear_caches()
    if left:
      # The a-priori estimates, rescaled by how long the rows run here took.
      ratio = sum(durations) / sum(estimates)
      eta = ratio * sum(estimate(configs[r.name]) for r in left)
      eta_text = f'ETA for the {len(left)} row(s) left {_duration(eta)}'
    else:
      eta_text = 'last row'
    printer(f'{head}: linear top-1 {_pct(result["linear_top1"])}% '
            f'(init {_pct(result["init_linear_top1"])}%), kNN '
            f'{_pct(result["knn_top1"])}%, proj_std '
            f'{result["proj_std_final"]:.4f} ({result["proj_std_relative"]:.2f}'
            f' x step 0){", COLLAPSED" if result["collapsed"] else ""}; '
            f'{_duration(durations[-1])}; {eta_text}')

  image_size = next(iter(configs.values())).data.image_size
  _write_outputs(root, results_dir, dataset=dataset, image_size=image_size,
                 max_train=max_train, max_test=max_test,
                 command='python -m experiments.ablation ' + ' '.join(argv),
                 printer=printer)
  return 0


def _write_outputs(root: str, results_dir: str, *, dataset: str,
                   image_size: int, max_train: int, max_test: int,
                   command: str, printer) -> None:
  """The raw-pixel baseline, then the table and plot of every finished row."""
  baseline = raw_pixel_baseline(
      root, dataset=dataset, image_size=image_size,
      max_train_examples=max_train, max_test_examples=max_test,
      printer=printer)
  all_finished = load_finished(root)
  table_path = os.path.join(results_dir, f'ablation_{dataset}.md')
  plot_path = os.path.join(results_dir, f'ablation_{dataset}.png')
  text = write_table(table_path, all_finished, baseline, dataset=dataset,
                     command=command.strip(), max_train_examples=max_train,
                     max_test_examples=max_test)
  write_plot(plot_path, all_finished, baseline, root)
  printer('')
  printer(text)
  printer(f'[ablation] wrote {table_path} and {plot_path}')

if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
