"""The ablation study's plumbing: --smoke on two rows, then a rerun."""

import json
import os
import re

import pytest

from experiments import ablation
from experiments import collapse_study
from experiments import study


def test_rows_are_the_papers_table():
  names = [r.name for r in ablation.ROWS]
  assert len(names) == len(set(names)) == 14
  byol = [r for r in ablation.ROWS if r.method == 'byol' and r.init == 'default'
          and 'gnws' not in (r.encoder, r.projector, r.predictor)]
  # Every on/off combination of BN in the three BYOL components, once.
  assert sorted((r.encoder, r.projector, r.predictor) for r in byol) == sorted(
      (e, p, q) for e in ('bn', 'none') for p in ('bn', 'none')
      for q in ('bn', 'none'))
  simclr = [r for r in ablation.ROWS if r.method == 'simclr']
  assert sorted((r.encoder, r.projector) for r in simclr) == sorted(
      (e, p) for e in ('bn', 'none') for p in ('bn', 'none'))
  quick = {r.name for r in ablation.ROWS if r.quick}
  assert quick == {'byol_bn_all', 'byol_bn_none', 'byol_bn_enc', 'byol_gnws',
                   'byol_bn_init', 'simclr_bn_none'}
  config = study.row_config(ablation.ROWS_BY_NAME['byol_bn_init'],
                               dataset='fashion_mnist', epochs=1.25,
                               smoke=False)
  assert config.model.init == 'bn_init'
  assert config.model.encoder.norm == 'bn'
  assert not config.model.encoder.weight_standardization
  assert config.training.epochs == 1.25
  assert config.model.encoder.width_multiplier == 0.25  # the local preset


def _numeric_cells(table, row):
  line = next(l for l in table.splitlines() if l.startswith(f'| {row} |'))
  cells = [c.strip() for c in line.strip('|').split('|')]
  # linear top-1, gain, kNN top-1, kNN gain, proj_std and rank / step 0;
  # with several seeds each cell reads 'mean ± std (n=k)'.
  return [float(c.split()[0]) for c in cells[2:8]], cells


@pytest.mark.slow
@pytest.mark.usefixtures('persistent_compilation_cache')  # seed 1 reuses 0's
def test_smoke_run_writes_the_table_and_skips_finished_rows(tmp_path):
  rows = 'byol_bn_enc,simclr_bn_none'
  argv = ['--smoke', f'--rows={rows}', f'--workdir_root={tmp_path}',
          f'--results_dir={tmp_path}']
  lines = []
  assert ablation.main(argv, printer=lines.append) == 0
  table_path = tmp_path / 'ablation_fashion_mnist.md'
  plot_path = tmp_path / 'ablation_fashion_mnist.png'
  assert plot_path.stat().st_size > 10_000
  with open(plot_path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  table = table_path.read_text()
  for row in rows.split(','):
    values, cells = _numeric_cells(table, row)
    top1, gain, knn, knn_gain, rel, rank_rel = values
    assert 0 <= top1 <= 100 and 0 <= knn <= 100
    assert rel >= 0 and rank_rel > 0
    assert cells[8].split()[0].strip(',') in ('yes', 'no', 'partial')
    summary = json.loads((tmp_path / row / 'row_summary.json').read_text())
    assert summary['steps'] == 3 and summary['status'] == 'finished'
    assert summary['proj_std_step0'] > 0
    assert 1.0 <= summary['rankme_proj_step0'] <= 16.0  # 16-d projections
    assert abs(100 * summary['gain_over_init'] - gain) < 0.01
    assert abs(100 * (summary['knn_top1'] - summary['init_knn_top1'])
               - knn_gain) < 0.01
  assert re.search(r'Raw-pixel baseline .* linear top-1 \d+\.\d\d%', table)
  assert '72.1 (300 ep)' in table  # the paper's figure for encoder-only BN
  assert any('run 2/2 simclr_bn_none' in l and 'ETA' not in l
             for l in lines if 'linear top-1' in l)
  # The probe's table has the collapse measures of both networks beside it.
  probe_rows = [l for l in lines if l.startswith(('| at initialisation',
                                                  '| after '))]
  assert len(probe_rows) == 4
  for l in probe_rows:
    proj_std, rank = (float(x) for x in l.strip('|').split('|')[3:5])
    assert proj_std >= 0 and 1.0 <= rank <= 16.0

  # A rerun skips both rows and rewrites the outputs from their summaries.
  mtimes = {r: os.path.getmtime(tmp_path / r / 'row_summary.json')
            for r in rows.split(',')}
  lines = []
  assert ablation.main(argv, printer=lines.append) == 0
  assert sum('finished earlier, skipped' in l for l in lines) == 2
  assert not any('[train]' in l for l in lines)
  for r, t in mtimes.items():
    assert os.path.getmtime(tmp_path / r / 'row_summary.json') == t
  assert _numeric_cells(table_path.read_text(), 'byol_bn_enc')[0] == (
      _numeric_cells(table, 'byol_bn_enc')[0])

  # A second seed of one row runs beside the first; the table shows both.
  lines = []
  assert ablation.main(['--smoke', '--rows=byol_bn_enc', '--seeds=0,1',
                        f'--workdir_root={tmp_path}',
                        f'--results_dir={tmp_path}'],
                       printer=lines.append) == 0
  assert sum('finished earlier, skipped' in l for l in lines) == 1
  seeded = json.loads(
      (tmp_path / 'byol_bn_enc_seed1' / 'row_summary.json').read_text())
  assert seeded['seed'] == 1
  first = json.loads((tmp_path / 'byol_bn_enc' / 'row_summary.json'
                      ).read_text())
  _, cells = _numeric_cells(table_path.read_text(), 'byol_bn_enc')
  assert cells[2].endswith('(n=2)')
  mean = 100 * (seeded['linear_top1'] + first['linear_top1']) / 2
  assert abs(float(cells[2].split()[0]) - mean) < 0.01
  # The table is of every finished row under the root, not only this call's.
  assert '| simclr_bn_none |' in table_path.read_text()

  # The same root with another length is refused, not mixed into the table.
  assert ablation.main(argv + ['--epochs=2'], printer=lines.append) == 2


def test_unknown_row_is_a_user_error(tmp_path, capsys):
  assert ablation.main(['--rows=byol_banana', f'--workdir_root={tmp_path}',
                        f'--results_dir={tmp_path}']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ')
  assert 'byol_banana' in err[0]


def test_collapse_study_rows_differ_from_dms_settings_by_their_overrides():
  rows = {r.name: r for r in collapse_study.ROWS}
  dm = study.row_config(rows['dm'], dataset='fashion_mnist', epochs=0.5,
                        smoke=False)
  # The starting point: DeepMind's rules on the paper's GN+WS network.
  assert dm.training.predictor_lr_multiplier == 1.0
  assert not dm.training.trust_ratio_on_norm_and_bias
  assert dm.training.tau_base == 0.99
  assert dm.model.projector.norm == 'gn' and (
      dm.model.predictor.weight_standardization)
  fast = study.row_config(rows['pred_lr_x10'], dataset='fashion_mnist',
                          epochs=0.5, smoke=False)
  assert fast.training.predictor_lr_multiplier == 10.0
  # Nothing else differs from the dm row.
  from byol import train_loop  # pylint: disable=g-import-not-at-top
  assert train_loop.config_differences(
      json.loads(dm.to_json_best_effort()),
      json.loads(fast.to_json_best_effort())) == [
          'training.predictor_lr_multiplier']
  assert collapse_study.label(rows['pred_x10_tau_norm']).startswith('GN+WS: ')


def test_collapse_study_refuses_an_unknown_variant(capsys):
  # Its runs go through study.run_study, which the ablation smoke test runs.
  assert collapse_study.main(['--rows=nope']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and 'nope' in err[0]
