"""The batch-size study: its rows, its summary table and its run records."""

import json

import chex
import numpy as np
import pytest

from byol import experiment
from byol import metrics
from experiments import accumulation_check
from experiments import batch_study
from experiments import study


def test_rows_scale_the_batch_and_keep_everything_else():
  rows = {r.name: r for r in batch_study.select(['32', '256'], pairs=True)}
  assert sorted(rows) == ['bn_b256', 'bn_b256_acc8', 'bn_b32', 'gnws_b256',
                          'gnws_b256_acc8', 'gnws_b32']
  small = study.row_config(rows['gnws_b32'], dataset='fashion_mnist',
                           epochs=1.25, smoke=False)
  full = study.row_config(rows['gnws_b256'], dataset='fashion_mnist',
                          epochs=1.25, smoke=False)
  acc = study.row_config(rows['bn_b256_acc8'], dataset='fashion_mnist',
                         epochs=1.25, smoke=False)
  assert small.training.batch_size == 32 and full.training.batch_size == 256
  # The same base rate: the schedule scales it by batch / 256 (the paper's).
  assert small.training.base_lr == full.training.base_lr
  assert small.model.encoder.norm == 'gn'
  assert small.model.encoder.weight_standardization
  assert acc.model.predictor.norm == 'bn'
  assert (acc.training.batch_size, acc.training.accumulation_steps) == (256, 8)
  # Same epochs of 60,000 images: 2343 steps at batch 32, 292 at 256.
  assert experiment.num_steps(small) == 2343
  assert experiment.num_steps(full) == 292
  # A smoke run keeps the batch the row studies (and shrinks the rest).
  smoke = study.row_config(rows['bn_b256_acc8'], dataset='fashion_mnist',
                           epochs=1.25, smoke=True)
  assert smoke.training.batch_size == 256
  assert smoke.training.accumulation_steps == 8
  assert smoke.data.image_size == study.SMOKE_OVERRIDES['data.image_size']
  assert batch_study.label(rows['bn_b256_acc8']) == 'BatchNorm, batch 256 as 8 x 32'


def _result(norm, batch, seed, gain, accum=1, knn_gain=0.01):
  return {
      'row': f'{norm}_b{batch}', 'seed': seed,
      'overrides': {'model.encoder.norm': 'gn' if norm == 'gnws' else norm},
      'config': {'training': {'batch_size': batch,
                              'accumulation_steps': accum}},
      'gain_over_init': gain, 'linear_top1': 0.7 + gain, 'knn_top1': 0.5 + knn_gain, 'init_knn_top1': 0.5,
      'steps': 100, 'resumed_from_step': 20, 'pretrain_time_sec': 40.0,
      'final_loss': 0.5 + gain,
  }


def test_summary_section_reports_gains_spreads_and_change_from_256():
  results = {
      'a': _result('gnws', 256, 0, 0.10), 'b': _result('gnws', 256, 1, 0.12),
      'c': _result('gnws', 32, 0, 0.09), 'd': _result('gnws', 32, 1, 0.11),
      'e': _result('bn', 256, 0, 0.08), 'f': _result('bn', 32, 0, 0.02),
      'g': _result('gnws', 256, 0, 0.105, accum=8),
  }
  text = batch_study.summary_section(results)
  line32 = next(l for l in text.splitlines() if l.startswith('| 32 |'))
  cells = [c.strip() for c in line32.strip('|').split('|')]
  # GN+WS at 32: mean 10.00 ± 1.41 (n=2), 1 pp below its batch-256 mean
  # (± the standard error of that difference, sqrt(2/2 + 2/2)).
  assert cells[1] == '+10.00 ± 1.41 (n=2) [-1.00 ± 1.41]'
  assert cells[2] == '+1.00 ± 0.00 (n=2) [+0.00 ± 0.00]'
  # (100 - 20) steps x 32 images in 40 s.
  assert cells[3] == '64'
  assert cells[4] == '+2.00 [-6.00]'  # BN, one seed
  assert cells[7] == '-'  # the paper has no batch-32 figure
  line64 = [l for l in text.splitlines() if l.startswith('| 64 |')]
  assert not line64  # no run at 64
  line256 = next(l for l in text.splitlines() if l.startswith('| 256 |'))
  assert '71.8 [+0.0]' in line256
  assert 'batch 256 as 8 accumulated micro-batches of 32: gain +10.50' in text
  assert '(one batch of 256: +11.00 ± 1.41 (n=2)' in text
  assert ('seed 0, accumulated vs one batch: linear top-1 80.50% vs 80.00%, '
          'final loss 0.60500 vs 0.60000.') in text


def test_finished_runs_are_kept_as_records_and_read_back(tmp_path):
  row = batch_study.make_row('gnws', 32)
  root, record = tmp_path / 'root', tmp_path / 'record'
  run = study.run_name(row, 1)
  (root / run).mkdir(parents=True)
  summary = {'row': row.name, 'run': run, 'seed': 1, 'linear_top1': 0.8}
  (root / run / study.ROW_SUMMARY).write_text(json.dumps(summary))
  (root / run / 'metrics.jsonl').write_text('{"step": 1, "loss": 1.0}\n')
  study.keep_record(run, str(root), str(record))
  assert json.loads((record / run / study.ROW_SUMMARY).read_text()) == summary
  assert metrics.read_metrics(str(record / run / 'metrics.jsonl'))[0][
      'loss'] == 1.0
  # With the workdir gone (another machine), the record answers.
  (root / run / study.ROW_SUMMARY).unlink()
  found = study.load_finished(str(root), [row], seeds=[0, 1],
                              record=str(record))
  assert found == {run: summary}
  assert study.run_dir(run, str(root), str(record)) == str(record / run)
  assert study.load_finished(str(root), [row], seeds=[0, 1]) == {}


@pytest.mark.parametrize('argv', [['--batches=48'], ['--batches=x'],
                                  ['--seeds=-1'], ['--nope']])
def test_bad_input_is_one_error_line(argv, capsys):
  assert batch_study.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ')


def test_accumulation_check_measures_the_gap_relative_to_the_distance_moved(
    tmp_path):
  p0 = np.zeros(4)
  one = {'params': [p0, np.array([3., 4., 0., 0.]), np.array([6., 8., 0., 0.])],
         'losses': [2.0, 1.0]}
  acc = {'params': [p0, np.array([3., 4., 1e-6, 0.]),
                    np.array([6., 8., 0., 1.])],
         'losses': [2.0, 1.5]}
  g = accumulation_check.gaps(one, acc)
  # Step 1: 1e-6 apart after moving 5; step 2: 1 apart after moving 10.
  chex.assert_trees_all_close(g, {'param_gap': [2e-7, 0.1],
                                  'loss_gap': [0.0, 0.5]}, rtol=1e-12)
  with pytest.raises(AssertionError, match='same parameters'):
    accumulation_check.gaps(one, {**acc, 'params': [p0 + 1] + acc['params'][1:]})
  assert accumulation_check.shown_steps(30) == [1, 2, 3, 5, 10, 20, 30]
  assert accumulation_check.shown_steps(3) == [1, 2, 3]
  assert accumulation_check.shown_steps(25) == [1, 2, 3, 5, 10, 20, 25]
  text = accumulation_check.write_table(
      str(tmp_path / 't.md'), {'gnws': g}, batch=256, accumulation=8,
      command='cmd')
  assert '| GN+WS, parameter gap | 2.0e-07 | 1.0e-01 |' in text
  # Parameters that have not moved (learning rate 0) have no relative gap.
  still = accumulation_check.gaps({'params': [p0, p0], 'losses': [1.0]},
                                  {'params': [p0, p0], 'losses': [1.0]})
  assert np.isnan(still['param_gap'][0]) and still['loss_gap'] == [0.0]
  text = accumulation_check.write_table(
      str(tmp_path / 't.md'), {'bn': still}, batch=8, accumulation=2,
      command='cmd')
  assert '| BatchNorm, parameter gap | - |' in text


@pytest.mark.parametrize('argv', [['--batch=256', '--accumulation=7'],
                                  ['--accumulation=1'], ['--steps=0'],
                                  ['--norms=ln']])
def test_accumulation_check_bad_input_is_one_error_line(argv, capsys):
  assert accumulation_check.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ')
