"""The studies' reports rebuilt from records: tables, plots, missing runs.

The records here are made by the test (row summaries and metrics with known
values, the row's real config): what is tested is the report code -- mean ±
std (n), the change from batch 256, the accumulation comparison, the list
of unfinished runs, the plot's one entry per row -- not a training.
"""

import json
import os

import numpy as np
import pytest

from experiments import ablation
from experiments import batch_study
from experiments import collapse_study
from experiments import study
from experiments import study_report


def _write_run(root, row, seed, *, linear, init=0.70, knn=0.75,
               init_knn=0.72, proj_rel=0.8, rank_rel=0.5, epochs=1.25,
               losses=(2.0, 1.0), collapse='no', final_loss=None):
  """A finished run's row summary and metrics.jsonl under `root`."""
  config = study.row_config(row, dataset='fashion_mnist', epochs=epochs,
                            smoke=False, seed=seed)
  run = study.run_name(row, seed)
  steps = 10
  summary = {
      'row': row.name, 'run': run, 'label': row.label(),
      'overrides': row.overrides(), 'status': 'finished',
      'diverged_by_step': None, 'steps': steps, 'epochs': epochs,
      'linear_top1': linear, 'linear_top5': 0.99, 'knn_top1': knn,
      'init_linear_top1': init, 'init_knn_top1': init_knn,
      'gain_over_init': linear - init,
      'proj_std_step0': 0.1, 'proj_std_final': 0.1 * proj_rel,
      'proj_std_relative': proj_rel, 'rankme_proj_step0': 50.0,
      'rankme_proj_final': 50.0 * rank_rel, 'rankme_proj_relative': rank_rel,
      'rankme_emb_step0': 60.0, 'rankme_emb_final': 30.0,
      'collapse': collapse, 'collapsed': collapse == 'yes', 'seed': seed,
      'final_loss': losses[-1] if final_loss is None else final_loss,
      'pretrain_time_sec': 60.0, 'wall_time_sec': 90.0,
      'resumed_from_step': 0, 'paper': row.paper,
      'config': json.loads(config.to_json_best_effort()),
  }
  folder = os.path.join(root, run)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, study.ROW_SUMMARY), 'w') as f:
    json.dump(summary, f)
  with open(os.path.join(folder, 'metrics.jsonl'), 'w') as f:
    for i, loss in enumerate(losses):
      f.write(json.dumps({
          'step': 5 * (i + 1), 'loss': loss,
          'proj_std': 0.1 * proj_rel, 'rankme_proj': 50.0 * rank_rel}) + '\n')
  return summary


def _cells(table, row):
  line = next(l for l in table.splitlines() if l.startswith(f'| {row} |'))
  return [c.strip() for c in line.strip('|').split('|')]


def _snapshot(root):
  """Every file under `root` with its size and mtime."""
  out = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      out[path] = (os.path.getsize(path), os.path.getmtime(path))
  return out


def test_mean_std_and_difference_of_known_values():
  assert study_report.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
  assert study_report.mean_std([4.0]) == (4.0, 0.0, 1)
  assert study_report.mean_spread([0.80, 0.82, 0.84], 100) == (
      '82.00 ± 2.00 (n=3)')
  assert study_report.mean_spread([0.1], 100, sign=True) == '+10.00'
  # Means 2 and 5, sample variances 1 and 10/3 over 3 and 4 values:
  # sqrt(1/3 + (10/3)/4) = 1.0801.
  assert study_report.difference([1, 2, 3], [3, 4, 6, 7]) == '-3.00 ± 1.08'
  assert study_report.difference([1.0], [3, 4, 6, 7]) == '-4.00'


def test_geometric_mean_curve_over_seeds_at_common_steps():
  a = (np.array([0.0, 1.0, 2.0]), np.array([1.0, 1e-4, 1.0]))
  b = (np.array([0.0, 1.0]), np.array([100.0, 1e-2]))
  x, y = study_report.geometric_mean_curve([a, b])
  np.testing.assert_array_equal(x, [0.0, 1.0])
  np.testing.assert_allclose(y, [10.0, 1e-3])


def test_ablation_report_only_rebuilds_the_table_without_training(
    tmp_path, capsys):
  root, results = str(tmp_path / 'root'), str(tmp_path / 'results')
  rows = ablation.ROWS_BY_NAME
  # byol_gnws: three seeds with known linear top-1, init and kNN.
  for seed, (lin, init, knn) in enumerate([(0.80, 0.70, 0.74),
                                           (0.82, 0.71, 0.76),
                                           (0.84, 0.69, 0.78)]):
    _write_run(root, rows['byol_gnws'], seed, linear=lin, init=init, knn=knn,
               init_knn=0.72, collapse='partial' if seed else 'no')
  # byol_bn_none: seed 0 finished (collapsed), seed 1 started, 2 not.
  _write_run(root, rows['byol_bn_none'], 0, linear=0.76, init=0.78,
             proj_rel=0.01, rank_rel=0.05, collapse='yes')
  os.makedirs(os.path.join(root, 'byol_bn_none_seed1', 'checkpoints'))
  with open(os.path.join(root, 'raw_pixels.json'), 'w') as f:
    json.dump({'key': dict(dataset='fashion_mnist', image_size=24,
                           max_train_examples=-1, max_test_examples=-1),
               'result': {'feature_dim': 576, 'top1_accuracy': 0.8436,
                          'knn_top1_accuracy': 0.7981}}, f)
  before = _snapshot(root)
  lines = []
  argv = ['--rows=byol_gnws,byol_bn_none', '--seeds=0,1,2', '--report_only',
          f'--workdir_root={root}', f'--results_dir={results}']
  assert ablation.main(argv, printer=lines.append) == 0
  assert capsys.readouterr().err == ''
  # Nothing trained, nothing under the root touched.
  assert not any('[train]' in l or 'raw-pixel baseline:' in l for l in lines)
  assert _snapshot(root) == before

  table = open(os.path.join(results, 'ablation_fashion_mnist.md')).read()
  cells = _cells(table, 'byol_gnws')
  assert cells[2] == '82.00 ± 2.00 (n=3)'
  # Gains 10, 11, 15: mean 12, sample std sqrt(7) = 2.65.
  assert cells[3] == '+12.00 ± 2.65 (n=3)'
  assert cells[4] == '76.00 ± 2.00 (n=3)'
  assert cells[5] == '+4.00 ± 2.00 (n=3)'
  assert cells[8] == 'partial 2/3, no 1/3'
  cells = _cells(table, 'byol_bn_none')
  assert cells[2] == '76.00' and cells[3] == '-2.00' and cells[8] == 'yes'
  assert 'linear top-1 84.36%' in table
  assert ('Not finished yet (2 run(s)): started, not finished: '
          'byol_bn_none_seed1; not started: byol_bn_none_seed2.') in table
  assert any('not started: byol_bn_none_seed2' in l for l in lines)
  with open(os.path.join(results, 'ablation_fashion_mnist.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  # The finished runs' records are kept beside the results, as a run keeps
  # them, so that the table can be rebuilt where the root is gone.
  record = study.record_dir(results, 'ablation', 'fashion_mnist', 1.25)
  assert sorted(os.listdir(record)) == [
      'byol_bn_none', 'byol_gnws', 'byol_gnws_seed1', 'byol_gnws_seed2',
      'raw_pixels.json']
  empty = str(tmp_path / 'empty')
  os.makedirs(empty)
  assert ablation.main(argv[:3] + [f'--workdir_root={empty}',
                                   f'--results_dir={results}'],
                       printer=lines.append) == 0
  assert _cells(open(os.path.join(results, 'ablation_fashion_mnist.md')
                     ).read(), 'byol_gnws')[2] == '82.00 ± 2.00 (n=3)'
  # No root at all (a fresh clone of the repository): the records suffice.
  os.remove(os.path.join(results, 'ablation_fashion_mnist.md'))
  assert ablation.main(argv[:3] + [f'--workdir_root={tmp_path / "gone"}',
                                   f'--results_dir={results}'],
                       printer=lines.append) == 0
  table = open(os.path.join(results, 'ablation_fashion_mnist.md')).read()
  assert _cells(table, 'byol_gnws')[2] == '82.00 ± 2.00 (n=3)'
  # The raw-pixel baseline came with the records.
  assert 'linear top-1 84.36%' in table
  assert not (tmp_path / 'gone').exists()


@pytest.mark.parametrize('argv, message', [
    (['--workdir_root={missing}'], 'no workdir root'),
    (['--workdir_root={root}', '--epochs=5'], 'is 1.25 epochs long'),
])
def test_report_only_bad_input_is_one_error_line(tmp_path, capsys, argv,
                                                 message):
  root = tmp_path / 'root'
  _write_run(str(root), collapse_study.ROWS[0], 0, linear=0.8)
  argv = [a.format(missing=tmp_path / 'nope', root=root) for a in argv]
  assert collapse_study.main(
      ['--report_only', '--rows=dm', f'--results_dir={tmp_path / "out"}']
      + argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and message in err[0]
  assert not (tmp_path / 'out').exists()


def test_plot_has_one_legend_entry_per_row_with_fourteen_rows(tmp_path):
  root = str(tmp_path)
  results = {}
  for i, row in enumerate(ablation.ROWS):
    for seed in range(3 if i % 2 else 1):
      r = _write_run(root, row, seed, linear=0.7 + 0.01 * i + 0.005 * seed,
                     collapse='yes' if 'none' in row.name else 'no')
      results[r['run']] = r
  path = str(tmp_path / 'plot.png')
  labels = study_report.write_plot(path, results, None,
                                   lambda run: os.path.join(root, run),
                                   rows=ablation.ROWS)
  assert labels == [f'{r.name} (n={3 if i % 2 else 1})'
                    for i, r in enumerate(ablation.ROWS)]
  assert os.path.getsize(path) > 20_000


def test_batch_report_only_states_changes_and_compares_accumulation(tmp_path):
  root, results = str(tmp_path / 'root'), str(tmp_path / 'results')
  gains = {('gnws', 256): (0.10, 0.12), ('gnws', 64): (0.09, 0.11),
           ('gnws', 32): (0.08, 0.12), ('bn', 256): (0.08, 0.10),
           ('bn', 32): (0.02, 0.04)}
  losses = (2.0, 1.5, 1.0)
  for (norm, batch), values in gains.items():
    for seed, gain in enumerate(values):
      _write_run(root, batch_study.make_row(norm, batch), seed,
                 linear=0.7 + gain, init=0.7, losses=losses)
  # GN+WS 256 as 8 x 32 follows the batch-256 run to float rounding; BN's
  # per-micro-batch statistics make another run.
  _write_run(root, batch_study.make_row('gnws', 256, 8), 0, linear=0.80,
             init=0.7, losses=(2.0, 1.5 * (1 + 2e-7), 1.0))
  _write_run(root, batch_study.make_row('bn', 256, 8), 0, linear=0.75,
             init=0.7, losses=(2.0, 1.8, 1.4))
  lines = []
  assert batch_study.main(['--report_only', f'--workdir_root={root}',
                           f'--results_dir={results}'],
                          printer=lines.append) == 0
  text = open(os.path.join(results, 'batch_study_fashion_mnist.md')).read()
  line32 = next(l for l in text.splitlines() if l.startswith('| 32 |'))
  cells = [c.strip() for c in line32.strip('|').split('|')]
  # GN+WS at 32: gains 8, 12 (mean 10, std 2.83) against 10, 12 (mean 11,
  # std 1.41): change -1.00 ± sqrt(8/2 + 2/2) = 2.24.
  assert cells[1] == '+10.00 ± 2.83 (n=2) [-1.00 ± 2.24]'
  assert cells[4] == '+3.00 ± 1.41 (n=2) [-6.00 ± 1.41]'
  assert '| 64 |' in text and '59.7 ± 1.5 [-12.1]' in text
  assert ('- GN+WS: batch 64: -1.00 ± 1.41 pp (n=2 vs 2); batch 32: '
          '-1.00 ± 2.24 pp (n=2 vs 2).') in text
  assert '- BatchNorm: batch 32: -6.00 ± 1.41 pp (n=2 vs 2).' in text
  assert 'batch 128: -2.2 ± 0.5 pp; batch 64: -12.1 ± 1.5 pp' in text
  pairs = text[text.index('### Accumulation pairs'):].splitlines()
  gnws = pairs.index('- GN+WS, batch 256 as 8 accumulated micro-batches of '
                     '32: gain +10.00 (one batch of 256: +11.00 ± 1.41 '
                     '(n=2)).')
  # Seed 0 of each pair against seed 0 of batch 256, logged step by step.
  assert pairs[gnws + 1] == (
      '  - seed 0, accumulated vs one batch: linear top-1 80.00% vs 80.00%, '
      'final loss 1.00000 vs 1.00000; loss at 3 logged steps: largest '
      'relative difference 2.0e-07; rankme_proj at 3 logged steps: largest '
      'relative difference 0.0e+00.')
  assert pairs[gnws + 3].startswith(
      '  - seed 0, accumulated vs one batch: linear top-1 75.00% vs 78.00%, '
      'final loss 1.40000 vs 1.00000; loss at 3 logged steps: largest '
      'relative difference 4.0e-01')
  assert ('Not finished yet (8 run(s)): not started: gnws_b128, bn_b64, '
          'bn_b128, gnws_b128_seed1, bn_b64_seed1, bn_b128_seed1, '
          'gnws_b256_acc8_seed1, bn_b256_acc8_seed1.') in text
  for name in ('batch_study_fashion_mnist.png',
               'batch_study_fashion_mnist_by_batch.png'):
    with open(os.path.join(results, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
