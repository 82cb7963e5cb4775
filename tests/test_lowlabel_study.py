"""experiments/lowlabel_study.py --smoke: runs, records, resumes, refuses bad rows."""

import json
import os

import pytest

from experiments import lowlabel_study

# The rows that need no pretraining (the initial networks): the study's code
# paths without its cost; pretraining is tested elsewhere.
ROWS = 'scratch_finetune_1pct,transfer_init_linear'


@pytest.mark.slow
def test_smoke_study_writes_table_records_and_resumes(tmp_path, capsys):
  args = ['--smoke', f'--only={ROWS}', f'--workdir_root={tmp_path / "w"}',
          f'--results_dir={tmp_path / "r"}']
  lines = []
  assert lowlabel_study.main(args, printer=lines.append) == 0
  table = tmp_path / 'r' / 'lowlabel_study_5ep_smoke_fashion_mnist.md'
  text = table.read_text()
  for row in ROWS.split(','):
    assert f'| {row} |' in text
  assert (tmp_path / 'r' / 'lowlabel_study_5ep_smoke_fashion_mnist.png'
          ).stat().st_size > 1000
  record = (tmp_path / 'r' / 'runs' / 'lowlabel_study_smoke_fashion_mnist_5ep')
  summaries = {row: json.loads((record / row / 'summary.json').read_text())
               for row in ROWS.split(',')}
  finetune = summaries['scratch_finetune_1pct']
  assert finetune['selected_on'] == 'VALID' and len(finetune['grid']) == 2
  best = max(finetune['grid'], key=lambda g: g['valid_top1_accuracy'])
  assert finetune['top1_accuracy'] == best['top1_accuracy']
  # The 1% subset: at least one image of each of the 10 classes.
  subset = json.loads((tmp_path / 'w' / 'init' /
                       'study_scratch_finetune_1pct' / 'subset.json'
                       ).read_text())
  assert sorted(set(subset['labels'])) == list(range(10))
  assert finetune['num_train_examples'] == len(subset['positions'])
  transfer = summaries['transfer_init_linear']
  assert transfer['num_test_examples'] == 20  # the folder rule: 10% of 200
  assert transfer['num_valid_examples'] == 18  # 10% of the other 180
  # Nothing was pretrained: only the initial networks were written.
  assert not (tmp_path / 'w' / 'byol').exists()
  assert not (tmp_path / 'w' / 'folder_byol').exists()
  # A rerun finds every row finished and trains nothing.
  lines = []
  assert lowlabel_study.main(args, printer=lines.append) == 0
  assert not any(l.startswith('[lowlabel-study]') for l in lines)
  assert table.read_text().split('\n')[4:] == text.split('\n')[4:]


def test_unknown_row_is_one_error_line(capsys, tmp_path):
  assert lowlabel_study.main(['--only=nope', f'--workdir_root={tmp_path}'],
                             printer=lambda _: None) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: unknown row(s) nope')
  assert not os.listdir(tmp_path)
