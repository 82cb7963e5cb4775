"""A study's report: the collapse rule, the markdown table, the plot, mean and
spread over seeds, and the raw-pixel baseline (cached as JSON).

Everything here reads finished runs' row summaries (`experiments/study.py`
runs the rows and writes them) and their metrics.jsonl; nothing trains.
"""

import datetime
import json
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
# The raw-pixel baseline's cache, in a study's root and beside its records.
BASELINE_FILE = 'raw_pixels.json'


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
  path = os.path.join(root, BASELINE_FILE)
  key = dict(dataset=dataset, image_size=image_size,
             max_train_examples=max_train_examples,
             max_test_examples=max_test_examples)
  cached = cached_baseline(root, key)
  if cached is not None:
    return cached
  printer(f'[{tag}] raw-pixel baseline: logistic regression on the '
          f'{image_size}x{image_size} pixels')
  result = probe.feature_probe(
      features.pixels_embed, None, None, dataset=dataset,
      image_size=image_size, max_train_examples=max_train_examples,
      max_test_examples=max_test_examples)
  files.write_json(path, {'key': key, 'result': result})
  return result


def cached_baseline(root: str, key: dict, record: str = '') -> Optional[dict]:
  """The raw-pixel baseline cached under `root` (else kept in the study's
  `record` folder) for the probe settings `key` (see `raw_pixel_baseline`),
  or None: a report never fits it itself."""
  for folder in (root, record):
    path = os.path.join(folder, BASELINE_FILE) if folder else ''
    if path and os.path.exists(path):
      with open(path) as f:
        cached = json.load(f)
      if cached.get('key') == key:
        return cached['result']
  return None


def by_row(results: Dict[str, dict], rows: Sequence[Any]
           ) -> Dict[str, List[dict]]:
  """The finished runs of each row (its seeds), in the order of `rows`."""
  out = {}
  for row in rows:
    runs = [r for r in results.values() if r['row'] == row.name]
    if runs:
      out[row.name] = sorted(runs, key=lambda r: r.get('seed', 0))
  return out


def mean_std(values: Sequence[float]) -> Tuple[float, float, int]:
  """Mean, sample standard deviation (0 for one value) and count."""
  v = np.asarray(values, np.float64)
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def mean_spread(values: Sequence[float], scale: float = 1.0,
                fmt: str = '.2f', sign: bool = False) -> str:
  """'m' for one value, 'm ± s (n=k)' (sample std) for several."""
  mean, std, n = mean_std(np.asarray(values, np.float64) * scale)
  head = f'{mean:{"+" if sign else ""}{fmt}}'
  if n == 1:
    return head
  return f'{head} ± {std:{fmt}} (n={n})'


def difference(values: Sequence[float], reference: Sequence[float],
               scale: float = 1.0) -> str:
  """The difference of two means, '+d ± e', with e the standard error of
  that difference (sqrt(s1^2/n1 + s2^2/n2), sample stds); '+d' alone when
  either side has a single value (no spread to speak of)."""
  m1, s1, n1 = mean_std(np.asarray(values, np.float64) * scale)
  m2, s2, n2 = mean_std(np.asarray(reference, np.float64) * scale)
  head = f'{m1 - m2:+.2f}'
  if n1 < 2 or n2 < 2:
    return head
  return f'{head} ± {np.sqrt(s1 ** 2 / n1 + s2 ** 2 / n2):.2f}'


def missing_runs(root: str, expected: Sequence[str],
                 finished: Dict[str, dict]) -> Tuple[List[str], List[str]]:
  """The runs of `expected` not finished: (started, not started).

  A started run has a workdir under `root` with metrics or checkpoints (it
  is running now, or was interrupted and resumes); the others have none.
  """
  started, waiting = [], []
  for run in expected:
    if run in finished:
      continue
    workdir = os.path.join(root, run)
    begun = (os.path.exists(os.path.join(workdir, 'metrics.jsonl')) or
             os.path.isdir(os.path.join(workdir, 'checkpoints')))
    (started if begun else waiting).append(run)
  return started, waiting


def missing_text(started: Sequence[str], waiting: Sequence[str]) -> str:
  """One line naming the unfinished runs, '' when there are none."""
  if not started and not waiting:
    return ''
  parts = []
  if started:
    parts.append(f'started, not finished: {", ".join(started)}')
  if waiting:
    parts.append(f'not started: {", ".join(waiting)}')
  return (f'Not finished yet ({len(started) + len(waiting)} run(s)): ' +
          '; '.join(parts) + '.')


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
                title: str = '', label: Callable[[Any], str],
                missing: str = '') -> str:
  """Writes the markdown table of every finished run; returns its text.

  `baseline` may be None (not measured under this root); `missing` is the
  line naming the runs not finished yet (see `missing_text`).
  """
  subset = ''
  if max_train_examples > 0 or max_test_examples > 0:
    subset = (' Probes fitted on ' + (
        f'the first {max_train_examples}' if max_train_examples > 0 else
        'all') + ' train examples and scored on ' + (
            f'the first {max_test_examples}' if max_test_examples > 0 else
            'all') + ' test examples.')
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
    collapsed = verdict_counts(runs)
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
      (f'Raw-pixel baseline (the same logistic regression on the '
       f'{baseline["feature_dim"]} pixel values): linear top-1 '
       f'{pct(baseline["top1_accuracy"])}%, kNN top-1 '
       f'{pct(baseline["knn_top1_accuracy"])}%.' if baseline else
       'Raw-pixel baseline: not measured under this workdir root with '
       'these probe settings.'),
      '',
      'Rows at initialisation (the same probe): ' + ', '.join(
          f'{name} {pct(runs[0]["init_linear_top1"])}%'
          for name, runs in by_row(results, rows).items()) + '.',
      '',
  ]
  if missing:
    lines += [missing, '']
  text = '\n'.join(lines)
  with open(path, 'w') as f:
    f.write(text)
  return text


def verdict_counts(runs: Sequence[dict]) -> str:
  """The collapse verdicts of a row's seeds: 'no', 'partial 2/3', ..."""
  verdicts = [r.get('collapse', 'yes' if r['collapsed'] else 'no')
              for r in runs]
  if len(set(verdicts)) == 1:
    return verdicts[0] if len(runs) == 1 else f'{verdicts[0]} ({len(runs)}/{len(runs)})'
  order = ('yes', 'partial', 'no')
  return ', '.join(f'{v} {verdicts.count(v)}/{len(runs)}' for v in order
                   if v in verdicts)


def worst_verdict(runs: Sequence[dict]) -> str:
  """'yes' if a seed collapsed, else 'partial' if one did partly, else 'no'."""
  verdicts = {r.get('collapse', 'yes' if r['collapsed'] else 'no')
              for r in runs}
  return next(v for v in ('yes', 'partial', 'no') if v in verdicts)


def row_colors(n: int) -> List[tuple]:
  """`n` distinguishable colours: tab10, then Dark2 (14 rows need both),
  without their greys, which the initialisation bars use."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  palette = [c for name in ('tab10', 'Dark2', 'Set1')
             for c in matplotlib.colormaps[name].colors
             if max(c[:3]) - min(c[:3]) > 0.05]
  return [palette[i % len(palette)] for i in range(n)]


def label_line_ends(ax, ends: Sequence[Tuple[str, float, float, tuple]],
                    fontsize: float = 7) -> None:
  """Writes each row's name at the end of its curve on a log-y axis, nudged
  apart vertically so that rows ending close together stay readable.

  Args:
    ax: the axis (log y scale, limits already final).
    ends: (text, last x, last y, colour) per curve.
    fontsize: of the labels.
  """
  ends = [e for e in ends if np.isfinite(e[2]) and e[2] > 0]
  if not ends:
    return
  lo, hi = (np.log10(v) for v in ax.get_ylim())
  height = ax.get_window_extent().height or 300.0
  # One label height in decades: fontsize points at 100 dpi over the axis.
  gap = (hi - lo) * 1.15 * fontsize * 100 / 72 / height
  order = sorted(ends, key=lambda e: e[2])
  placed = []
  for text, x, y, color in order:
    pos = np.log10(y)
    if placed and pos < placed[-1] + gap:
      pos = placed[-1] + gap
    placed.append(pos)
  # Pushed past the top: shift the whole stack down, keeping the gaps.
  excess = placed[-1] - (hi - gap / 2)
  if excess > 0:
    placed = [p - excess for p in placed]
  x_end = max(e[1] for e in ends)
  for (text, _, _, color), pos in zip(order, placed):
    ax.annotate(text, (x_end, 10 ** pos), xytext=(4, 0),
                textcoords='offset points', va='center', fontsize=fontsize,
                color=color, annotation_clip=False)


# Line style per collapse verdict (the worst over a row's seeds).
VERDICT_STYLE = {'no': '-', 'partial': '-.', 'yes': '--'}


def curve(result: dict, records: Sequence[dict], key: str, step0: str
          ) -> Tuple[np.ndarray, np.ndarray]:
  """(epochs, values) of one run's logged `key`, its step-0 value first.

  The x axis is epochs, not steps, so that runs of different batch sizes
  (the batch study's) line up.
  """
  config = result.get('config', {}).get('training', {})
  steps_total = result.get('steps') or 0
  epochs_total = config.get('epochs', 0) if config.get(
      'max_steps', -1) <= 0 else 0
  per_step = (epochs_total / steps_total if steps_total and epochs_total
              else 1.0)
  steps = [0] + [m['step'] for m in records]
  values = [result.get(step0, np.nan)] + [m.get(key, np.nan) for m in records]
  return (np.asarray(steps, np.float64) * per_step,
          np.asarray(values, np.float64))


def geometric_mean_curve(curves: Sequence[Tuple[np.ndarray, np.ndarray]]
                         ) -> Tuple[np.ndarray, np.ndarray]:
  """The geometric mean over seeds at the x values every seed logged (the
  curves are drawn on log axes, where a collapse spans decades)."""
  common = curves[0][0]
  for x, _ in curves[1:]:
    common = np.intersect1d(common, x)
  stacked = []
  for x, y in curves:
    index = {v: i for i, v in enumerate(x)}
    stacked.append([y[index[v]] for v in common])
  logs = np.log(np.maximum(np.asarray(stacked, np.float64), 1e-12))
  with warnings.catch_warnings():
    # A step where every seed logged NaN (a diverged run) stays NaN.
    warnings.simplefilter('ignore', category=RuntimeWarning)
    return common, np.exp(np.nanmean(logs, axis=0))


def write_plot(path: str, results: Dict[str, dict], baseline: Optional[dict],
               folder: Callable[[str], str], rows: Sequence[Any] = (),
               title: str = '') -> List[str]:
  """Top-1 per row (mean and spread over seeds); proj_std and RankMe curves.

  Each row appears once, in one colour throughout: its bar is the mean over
  its seeds with the sample std as whisker, its seeds are dots, the same
  encoder at initialisation is the grey bar beside it, and its tick label
  gives n and the collapse verdicts. Its curves are one thin line per seed
  and a thick geometric mean over seeds, dashed when a seed collapsed and
  dash-dotted when one collapsed partly. One legend, outside the panels,
  names the rows.

  Returns:
    The rows' legend entries, one per row shown.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top

  grouped = by_row(results, rows)
  names = list(grouped)
  colors = dict(zip(names, row_colors(len(names))))
  height = max(5.5, 0.42 * len(names) + 2.5)
  fig, (ax_bar, ax_std, ax_rank) = plt.subplots(
      1, 3, figsize=(21, height), gridspec_kw={'width_ratios': [1.2, 1, 1]})
  y = np.arange(len(names))

  trained = [[100 * r['linear_top1'] for r in grouped[n]] for n in names]
  init = [[100 * r['init_linear_top1'] for r in grouped[n]] for n in names]
  t_stats = [mean_std(v) for v in trained]
  i_stats = [mean_std(v) for v in init]
  verdicts = {n: worst_verdict(grouped[n]) for n in names}
  ax_bar.barh(y - 0.2, [s[0] for s in t_stats], height=0.4,
              xerr=[s[1] for s in t_stats], capsize=3,
              color=[colors[n] for n in names],
              hatch=['//' if verdicts[n] == 'yes' else '' for n in names],
              edgecolor='k', linewidth=0.5)
  ax_bar.barh(y + 0.2, [s[0] for s in i_stats], height=0.4,
              xerr=[s[1] for s in i_stats], capsize=3, color='0.75',
              edgecolor='0.5', linewidth=0.5)
  for i, v in enumerate(trained):
    ax_bar.scatter(v, [y[i] - 0.2] * len(v), color='k', s=8, zorder=3)
    mean, std, n = t_stats[i]
    ax_bar.annotate(f'{mean:.1f}' + (f' ± {std:.1f}' if n > 1 else ''),
                    (max(max(v), mean + std), y[i] - 0.2),
                    xytext=(4, 0), textcoords='offset points', va='center',
                    fontsize=7)
  if baseline:
    ax_bar.axvline(100 * baseline['top1_accuracy'], color='k', ls=':', lw=1)
  def tick(n):
    runs = grouped[n]
    verdict = (verdicts[n] if len({r.get('collapse') for r in runs}) == 1
               else verdict_counts(runs))
    return f'{n} (n={len(runs)}; collapsed: {verdict})'

  ax_bar.set_yticks(y, [tick(n) for n in names], fontsize=8)
  for tick, n in zip(ax_bar.get_yticklabels(), names):
    tick.set_color({'yes': 'tab:red', 'partial': 'tab:brown'}.get(
        verdicts[n], 'k'))
  ax_bar.invert_yaxis()
  # Zoomed on the data: at this scale every row sits between ~65% and ~85%,
  # and an axis from 0 would hide the differences the table is about.
  values = [x for v in trained + init for x in v] + (
      [100 * baseline['top1_accuracy']] if baseline else [])
  lo = max(0.0, np.floor(min(values) / 5) * 5 - 5) if values else 0.0
  hi = min(100.0, np.ceil(max(values) / 5) * 5 + 5) if values else 100.0
  ax_bar.set_xlim(lo, hi)
  ax_bar.set_xlabel(f'linear top-1 (%), fast probe, TEST (axis from {lo:g})')
  ax_bar.set_title('Per row: mean ± std over seeds (dots: seeds)')
  bar_key = [
      plt.Rectangle((0, 0), 1, 1, facecolor='0.5', edgecolor='k',
                    label='after pretraining (row colour)'),
      plt.Rectangle((0, 0), 1, 1, facecolor='0.5', edgecolor='k', hatch='//',
                    label='a seed collapsed'),
      plt.Rectangle((0, 0), 1, 1, facecolor='0.75', edgecolor='0.5',
                    label='same encoder at initialisation')]
  if baseline:
    bar_key.append(Line2D([], [], color='k', ls=':', label='raw pixels'))
  ax_bar.legend(handles=bar_key, loc='upper center',
                bbox_to_anchor=(0.5, -0.12 - 0.6 / height), ncol=2,
                fontsize=8)

  ends = {}
  for n in names:
    style = VERDICT_STYLE[verdicts[n]]
    for ax, key, step0 in ((ax_std, 'proj_std', 'proj_std_step0'),
                           (ax_rank, 'rankme_proj', 'rankme_proj_step0')):
      curves = []
      for r in grouped[n]:
        records = metrics.read_metrics(os.path.join(
            folder(r.get('run', r['row'])), 'metrics.jsonl'))
        x, values = curve(r, records, key, step0)
        if np.isfinite(values).any():
          curves.append((x, values))
          ax.plot(x, np.maximum(values, 1e-8), color=colors[n], ls=style,
                  lw=0.7, alpha=0.45)
      if curves:
        x, mean = geometric_mean_curve(curves)
        ax.plot(x, np.maximum(mean, 1e-8), color=colors[n], ls=style,
                lw=2.0)
        if len(x):
          ends.setdefault(ax, []).append((n, x[-1], mean[-1], colors[n]))
  for ax in (ax_std, ax_rank):
    ax.set_yscale('log')
    # Plain numbers at 1, 2 and 5 times the decades: the default minor
    # labels ('6x10^0') overlap on a short axis, none leave a decade bare.
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter('%g'))
    ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter('%g'))
    ax.tick_params(axis='y', which='minor', labelsize=7)
    ax.set_xlabel('epoch')
    ax.grid(True, which='major', alpha=0.3)
  ax_std.set_ylabel('proj_std of the projections (training batch)')
  ax_std.set_title('proj_std (thin: seeds; thick: their geometric mean)')
  ax_rank.set_ylabel('RankMe of the projections (fixed batch)')
  # The layout first, then the labels: their spacing needs the final axes.
  fig.tight_layout()
  for ax, items in ends.items():
    label_line_ends(ax, items)
  ax_rank.set_title('Effective rank (thin: seeds; thick: geometric mean)')
  row_key = [Line2D([], [], color=colors[n], lw=2, ls=VERDICT_STYLE[verdicts[n]],
                    label=f'{n} (n={len(grouped[n])})') for n in names]
  row_key += [Line2D([], [], color='k', ls=VERDICT_STYLE[v], label=text)
              for v, text in (('no', 'not collapsed'),
                              ('partial', 'partial (a seed)'),
                              ('yes', 'collapsed (a seed)'))]
  fig.legend(handles=row_key, loc='center left', bbox_to_anchor=(1.0, 0.5),
             fontsize=8, frameon=False)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)
  return [h.get_label() for h in row_key[:len(names)]]
