"""A study's report: the collapse rule, the markdown table, the plot, mean and
spread over seeds, and the raw-pixel baseline (cached as JSON).

Everything here reads finished runs' row summaries (`experiments/study.py`
runs the rows and writes them) and their metrics.jsonl; nothing trains.
"""

import datetime
import json
import os
from typing import Any, Callable, Dict, List, Sequence

import ml_collections
import numpy as np

from byol import experiment
from byol import files
from byol import metrics
from byol.evaluation import features
from byol.evaluation import probe

# The collapse rule (docs/ablation.md): a row has collapsed when, at its
# last logged step, its projections' proj_std is below COLLAPSE_RATIO of its
# value at step 0 AND their effective rank (RankMe, on the fixed diagnostics
# batch) is below RANK_COLLAPSE_RATIO of its value at step 0 -- the images
# map to (nearly) one point, by both measures. One measure alone is reported
# as 'partial'.
COLLAPSE_RATIO = 0.1
RANK_COLLAPSE_RATIO = 0.25


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


def raw_pixel_baseline(root: str, *, dataset: str, image_size: int,
                       max_train_examples: int, max_test_examples: int,
                       tag: str = 'ablation', printer=print) -> dict:
  """Logistic regression on the raw pixels.

  Cached in <root>/raw_pixels.json, keyed by the probe's settings.
  """
  path = os.path.join(root, 'raw_pixels.json')
  key = dict(dataset=dataset, image_size=image_size,
             max_train_examples=max_train_examples,
             max_test_examples=max_test_examples)
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get('key') == key:
      return cached['result']
  printer(f'[{tag}] raw-pixel baseline: logistic regression on the '
          f'{image_size}x{image_size} pixels')
  result = probe.feature_probe(
      features.pixels_embed, None, None, dataset=dataset,
      image_size=image_size, max_train_examples=max_train_examples,
      max_test_examples=max_test_examples)
  files.write_json(path, {'key': key, 'result': result})
  return result


def by_row(results: Dict[str, dict], rows: Sequence[Any]
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


def pct(x) -> str:
  return 'n/a' if x is None or not np.isfinite(x) else f'{100 * x:.2f}'


def run_length(config: dict) -> str:
  """'E epochs (N steps of B images)' of a resolved config dict."""
  t = config['training']
  steps = experiment.num_steps(ml_collections.ConfigDict(config))
  text = f'{steps} steps of {t["batch_size"]} images'
  return text if t['max_steps'] > 0 else f'{t["epochs"]:g} epochs ({text})'


def write_table(path: str, results: Dict[str, dict], baseline: dict, *,
                dataset: str, command: str, max_train_examples: int = -1,
                max_test_examples: int = -1, rows: Sequence[Any] = (),
                title: str = '', label: Callable[[Any], str]) -> str:
  """Writes the markdown table of every finished run; returns its text."""
  subset = ''
  if max_train_examples > 0 or max_test_examples > 0:
    subset = (' Probes fitted on the first '
              f'{max_train_examples if max_train_examples > 0 else "all"} '
              'train examples and scored on the first '
              f'{max_test_examples if max_test_examples > 0 else "all"} test '
              'examples.')
  lengths = sorted({run_length(r['config']) for r in results.values()})
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
        f'{collapsed} | '
        f'{metrics.format_duration(sum(r["wall_time_sec"] for r in runs))} | '
        f'{row.paper or "-"} |')
  lines += [
      '',
      f'Raw-pixel baseline (the same logistic regression on the '
      f'{baseline["feature_dim"]} pixel values): linear top-1 '
      f'{pct(baseline["top1_accuracy"])}%, kNN top-1 '
      f'{pct(baseline["knn_top1_accuracy"])}%.',
      '',
      'Rows at initialisation (the same probe): ' + ', '.join(
          f'{name} {pct(runs[0]["init_linear_top1"])}%'
          for name, runs in by_row(results, rows).items()) + '.',
      '',
  ]
  text = '\n'.join(lines)
  with open(path, 'w') as f:
    f.write(text)
  return text


def write_plot(path: str, results: Dict[str, dict], baseline: dict,
               folder: Callable[[str], str], rows: Sequence[Any] = ()) -> None:
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
      records = metrics.read_metrics(os.path.join(
          folder(r.get('run', r['row'])), 'metrics.jsonl'))
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
