"""Running a study: config overrides of the local preset, a table and a plot.

A study is a list of `Row`s (norm choices per component plus further config
overrides), each pretrained for the same number of epochs with one or more
seeds (`<root>/<row>` for seed 0, `<root>/<row>_seed<k>`), then probed: the
fast linear probe and kNN of the trained encoder and of the same encoder at
initialisation, proj_std and RankMe at step 0 and at the end. A finished run
leaves `row_summary.json` and is skipped by a rerun; an interrupted one
resumes from its last checkpoint. `run_study` then writes the markdown table
(mean and spread over seeds) and the plot from every finished run.

The ablation table (`experiments/ablation.py`) and the collapse study
(`experiments/collapse_study.py`) are two such lists.
"""

import dataclasses
import datetime
import json
import os
import time
from typing import Dict, List, Sequence, Tuple
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
# The collapse rule (README, "Collapse"): a row has collapsed when, at its
# last logged step, its projections' proj_std is below COLLAPSE_RATIO of its
# value at step 0 AND their effective rank (RankMe, on the fixed diagnostics
# batch) is below RANK_COLLAPSE_RATIO of its value at step 0 -- the images
# map to (nearly) one point, by both measures. One measure alone is reported
# as 'partial'.
COLLAPSE_RATIO = 0.1
RANK_COLLAPSE_RATIO = 0.25
# For the ETA before any row has finished: the `local` step on 2 idle CPU
# cores (~480 images/s between evaluations with GN+WS, ~400 with BatchNorm;
# less on a shared machine).
LOCAL_IMAGES_PER_SEC = 400.0
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
}
SMOKE_PROBE_EXAMPLES = 1000


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
  # The probe measured the initial network on the fixed diagnostics batch.
  diag0 = (probe['init'] if 'rankme_proj' in probe['init'] else
           exp.diagnostics(devices.replicate(init_state)))
  metrics = read_metrics(workdir)
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
      'rankme_proj_step0': diag0['rankme_proj'],
      'rankme_proj_final': rank_final,
      'rankme_proj_relative': rank_relative,
      'rankme_emb_step0': diag0['rankme_emb'],
      'rankme_emb_final': (float(metrics[-1]['rankme_emb']) if metrics
                           else float('nan')),
      'collapse': collapse_verdict(status, relative, rank_relative),
      'collapsed': collapse_verdict(status, relative, rank_relative) == 'yes',
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


def collapse_verdict(status: str, proj_std_relative: float,
                     rank_relative: float) -> str:
  """'yes', 'partial' (one measure only) or 'no'; see COLLAPSE_RATIO."""
  if status == 'diverged':
    return 'yes'
  low_std = not proj_std_relative >= COLLAPSE_RATIO
  low_rank = not rank_relative >= RANK_COLLAPSE_RATIO
  if low_std and low_rank:
    return 'yes'
  return 'partial' if low_std or low_rank else 'no'


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


def keep_record(run: str, root: str, record: str) -> None:
  """Copies `run`'s summary and metrics from its workdir to `record`."""
  target = os.path.join(record, run)
  os.makedirs(target, exist_ok=True)
  for name in (ROW_SUMMARY, 'metrics.jsonl'):
    source = os.path.join(root, run, name)
    if os.path.exists(source):
      with open(source) as f:
        files.write_text(os.path.join(target, name), f.read())


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


def by_row(results: Dict[str, dict], rows: Sequence[Row]
           ) -> Dict[str, List[dict]]:
  """The finished runs of each row (its seeds), in the order of `rows`."""
  out = {}
  for row in rows:
    runs = [r for r in results.values() if r['row'] == row.name]
    if runs:
      out[row.name] = sorted(runs, key=lambda r: r.get('seed', 0))
  return out


def mean_spread(values: Sequence[float], scale: float = 1.0,
                fmt: str = '.2f', sign: bool = False) -> str:
  """'m' for one value, 'm ± s (n=k)' (sample std) for several."""
  v = np.asarray(values, np.float64) * scale
  head = f'{v.mean():{"+" if sign else ""}{fmt}}'
  if len(v) == 1:
    return head
  return f'{head} ± {v.std(ddof=1):{fmt}} (n={len(v)})'


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
                max_test_examples: int = -1, rows: Sequence[Row] = (),
                title: str = '', label=Row.label) -> str:
  """Writes the markdown table of every finished run; returns its text."""
  subset = ''
  if max_train_examples > 0 or max_test_examples > 0:
    subset = (' Probes fitted on the first '
              f'{max_train_examples if max_train_examples > 0 else "all"} '
              'train examples and scored on the first '
              f'{max_test_examples if max_test_examples > 0 else "all"} test '
              'examples.')
  lengths = sorted({_length(r['config']) for r in results.values()})
  lines = [
      title or f'# BYOL without batch statistics: the ablation table on '
      f'{dataset}',
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
      '(last logged step), divided by its value at step 0; **rank**: '
      'RankMe (effective rank) of the projections on the fixed diagnostics '
      'batch, divided by its value at step 0 (last logged step).',
      f'- **collapsed**: yes when proj_std < {COLLAPSE_RATIO:g} x step 0 '
      f'and rank < {RANK_COLLAPSE_RATIO:g} x step 0 (or the loss '
      'diverged); partial when only one of the two holds.',
      '- Several seeds: mean ± sample std over them (n = number of seeds).',
      '- **wall time**: pretraining and probes, in the run that finished the '
      'row (the part before an interruption is not counted); summed over '
      'seeds.',
      '- **paper**: the paper\'s ResNet-50 ImageNet linear top-1 for the '
      'configuration, where it gives one; a different scale entirely, for '
      'the ordering only.',
      '',
      '| row | overrides | linear top-1 (%) | gain over init (pp) | '
      'kNN top-1 (%) | kNN gain (pp) | proj_std / step 0 | rank / step 0 | '
      'collapsed | wall time | paper, ImageNet (%) |',
      '|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|',
  ]
  for name, runs in by_row(results, rows).items():
    row = next(r for r in rows if r.name == name)
    verdicts = [r.get('collapse', 'yes' if r['collapsed'] else 'no')
                for r in runs]
    collapsed = ', '.join(sorted(set(verdicts)))
    diverged = [r for r in runs if r['status'] == 'diverged']
    if diverged:
      collapsed += (f' (diverged by step '
                    f'{", ".join(str(r["diverged_by_step"]) for r in diverged)})')
    lines.append(
        f'| {name} | {label(row)} | '
        f'{mean_spread([r["linear_top1"] for r in runs], 100)} | '
        f'{mean_spread([r["gain_over_init"] for r in runs], 100, sign=True)} | '
        f'{mean_spread([r["knn_top1"] for r in runs], 100)} | '
        f'{mean_spread([r["knn_top1"] - r["init_knn_top1"] for r in runs], 100, sign=True)} | '
        f'{mean_spread([r["proj_std_relative"] for r in runs], fmt=".3f")} | '
        f'{mean_spread([r.get("rankme_proj_relative", float("nan")) for r in runs], fmt=".3f")} | '
        f'{collapsed} | {_duration(sum(r["wall_time_sec"] for r in runs))} | '
        f'{row.paper or "-"} |')
  lines += [
      '',
      f'Raw-pixel baseline (the same logistic regression on the '
      f'{baseline["feature_dim"]} pixel values): linear top-1 '
      f'{_pct(baseline["top1_accuracy"])}%, kNN top-1 '
      f'{_pct(baseline["knn_top1_accuracy"])}%.',
      '',
      'Rows at initialisation (the same probe): ' + ', '.join(
          f'{name} {_pct(runs[0]["init_linear_top1"])}%'
          for name, runs in by_row(results, rows).items()) + '.',
      '',
  ]
  text = '\n'.join(lines)
  with open(path, 'w') as f:
    f.write(text)
  return text


def write_plot(path: str, results: Dict[str, dict], baseline: dict,
               root: str, rows: Sequence[Row] = (), record: str = '') -> None:
  """Top-1 per row (mean and spread over seeds); proj_std and RankMe curves.

  Each row appears once: its bar is the mean over its seeds, the whisker the
  sample std, the dots the seeds; its curves (one per seed) share its colour
  and its legend entry.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  grouped = by_row(results, rows)
  names = list(grouped)
  fig, (ax_bar, ax_std, ax_rank) = plt.subplots(
      1, 3, figsize=(20, 0.45 * len(names) + 3))
  y = np.arange(len(names))

  def spread(values):
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

  trained = [[100 * r['linear_top1'] for r in grouped[n]] for n in names]
  init = [[100 * r['init_linear_top1'] for r in grouped[n]] for n in names]
  colors = ['tab:red' if any(r['collapsed'] for r in grouped[n]) else
            'tab:blue' for n in names]
  bars = ax_bar.barh(y - 0.2, [np.mean(v) for v in trained], height=0.4,
                     xerr=[spread(v) for v in trained], color=colors,
                     capsize=2, label='after pretraining, mean ± std over '
                     'seeds (red: a seed collapsed)')
  ax_bar.bar_label(bars, fmt='%.1f', fontsize=7, padding=6)
  for i, v in enumerate(trained):
    ax_bar.scatter(v, [y[i] - 0.2] * len(v), color='k', s=6, zorder=3)
  ax_bar.barh(y + 0.2, [np.mean(v) for v in init], height=0.4,
              xerr=[spread(v) for v in init], color='tab:gray', alpha=0.6,
              capsize=2, label='same encoder at initialisation')
  ax_bar.axvline(100 * baseline['top1_accuracy'], color='k', ls='--', lw=1,
                 label='raw pixels')
  ax_bar.set_yticks(y, [f'{n} (n={len(grouped[n])})' for n in names])
  ax_bar.invert_yaxis()
  ax_bar.set_xlabel('linear top-1 (%), fast probe')
  ax_bar.set_xlim(0, 100)
  ax_bar.set_title('Fast linear probe, TEST split')
  ax_bar.legend(loc='upper center', bbox_to_anchor=(0.5, -0.2), ncol=2,
                fontsize=8)

  cmap = plt.get_cmap('tab20')
  for i, n in enumerate(names):
    # The strong shades of tab20 first, then the light ones: neighbours
    # in the legend never share a hue.
    color = cmap((2 * i) % 20 + (i // 10) % 2)
    collapsed = any(r['collapsed'] for r in grouped[n])
    style = '--' if collapsed else '-'
    for j, r in enumerate(grouped[n]):
      records = read_metrics(run_dir(r.get('run', r['row']), root, record))
      steps = [0] + [m['step'] for m in records]
      stds = [r['proj_std_step0']] + [m['proj_std'] for m in records]
      label = n if j == 0 else None
      ax_std.plot(steps, np.maximum(stds, 1e-8), color=color, ls=style,
                  lw=1, alpha=0.8, label=label)
      if 'rankme_proj_step0' in r:
        ranks = [r['rankme_proj_step0']] + [
            m.get('rankme_proj', np.nan) for m in records]
        ax_rank.plot(steps, ranks, color=color, ls=style, lw=1, alpha=0.8,
                     label=label)
  ax_std.set_yscale('log')
  ax_std.set_xlabel('step')
  ax_std.set_ylabel('proj_std (dashed: collapsed)')
  ax_std.set_title('proj_std during pretraining (one colour per row, '
                   'a line per seed)')
  ax_std.legend(fontsize=7, ncol=2)
  ax_rank.set_yscale('log')
  ax_rank.set_xlabel('step')
  ax_rank.set_ylabel('RankMe of the projections, fixed batch')
  ax_rank.set_title('Effective rank during pretraining')
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)


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
              name: str = 'ablation', title: str = '', label=Row.label,
              all_rows: Sequence[Row] = ()) -> None:
  """Runs every (row, seed) not finished under `root`, then the outputs.

  Shared by the ablation table and the collapse study: a study is a list of
  rows (config overrides of the local preset) and its table and plot. The
  table and plot show every finished run under `root` of `all_rows` (the
  study's rows; default: `rows`), not only those of this call, so that a
  study run in parts ends with one table.
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
  for config in configs.values():
    experiment.validate_config(config)

  def estimate(config):
    steps = experiment.num_steps(config)
    return steps * config.training.batch_size / LOCAL_IMAGES_PER_SEC + (
        PROBE_SECONDS)

  printer(f'[{name}] {len(rows)} row(s) x {len(seeds)} seed(s) on {dataset}, '
          f'{"smoke (3 steps, tiny network)" if smoke else f"{epochs:g} epoch(s) per run"}; '
          f'workdirs under {root}')
  # Smoke runs measure nothing: their records are not kept.
  record = '' if smoke else record_dir(results_dir, name, dataset, epochs)
  finished = load_finished(root, rows, seeds, record)
  todo = [run_name(r, s) for r, s in runs if run_name(r, s) not in finished]
  remaining = sum(estimate(configs[n]) for n in todo)
  printer(f'[{name}] {len(runs) - len(todo)} finished earlier, '
          f'{len(todo)} to run; estimated {_duration(remaining)} at '
          f'{LOCAL_IMAGES_PER_SEC:.0f} images/s')
  durations, estimates = [], []
  for i, (row, seed) in enumerate(runs, 1):
    run = run_name(row, seed)
    config = configs[run]
    workdir = os.path.join(root, run)
    head = f'[{name}] run {i}/{len(runs)} {run} ({label(row)})'
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
                     max_test_examples=max_test, printer=printer)
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
      eta_text = f'ETA for the {len(left)} run(s) left {_duration(eta)}'
    else:
      eta_text = 'last run'
    printer(f'{head}: linear top-1 {_pct(result["linear_top1"])}% '
            f'(init {_pct(result["init_linear_top1"])}%), kNN '
            f'{_pct(result["knn_top1"])}%, proj_std '
            f'{result["proj_std_final"]:.4f} ({result["proj_std_relative"]:.2f}'
            f' x step 0), rank {result["rankme_proj_final"]:.1f} '
            f'({result["rankme_proj_relative"]:.2f} x step 0), collapsed: '
            f'{result["collapse"]}; {_duration(durations[-1])}; {eta_text}')

  image_size = next(iter(configs.values())).data.image_size
  baseline = raw_pixel_baseline(
      root, dataset=dataset, image_size=image_size,
      max_train_examples=max_train, max_test_examples=max_test,
      printer=printer)
  shown = list(all_rows) or list(rows)
  everything = load_finished(root, shown, record=record)
  table_path = os.path.join(results_dir, f'{name}_{dataset}.md')
  plot_path = os.path.join(results_dir, f'{name}_{dataset}.png')
  text = write_table(table_path, everything, baseline, dataset=dataset,
                     command=command.strip(), max_train_examples=max_train,
                     max_test_examples=max_test, rows=shown, title=title,
                     label=label)
  write_plot(plot_path, everything, baseline, root, rows=shown,
             record=record)
  printer('')
  printer(text)
  printer(f'[{name}] wrote {table_path} and {plot_path}')


