"""The training loop's machinery: signals, metrics log, resume checks."""

import json
import os
import signal

import pytest

from byol import metrics
from byol import train_loop


def test_stop_signals_note_the_first_and_let_a_second_ctrl_c_through():
  before = signal.getsignal(signal.SIGINT)
  with train_loop.StopSignals() as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signum == signal.SIGTERM
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum == signal.SIGTERM  # the first signal is kept
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(1000):  # the handler runs between bytecodes
        pass
  assert signal.getsignal(signal.SIGINT) is before
  assert train_loop.Preempted('x', signal.SIGINT).exit_status == 130
  assert train_loop.Preempted('x', signal.SIGTERM).exit_status == 143


def test_metrics_to_keep_drops_later_records_and_a_line_cut_short(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  assert metrics.metrics_to_keep(str(path), 3) is None  # no file
  records = [f'{{"step": {s}, "loss": {s / 10}}}\n' for s in (1, 2, 3, 4)]
  path.write_text(''.join(records))
  assert metrics.metrics_to_keep(str(path), 4) is None  # nothing to drop
  assert metrics.metrics_to_keep(str(path), 2) == records[:2]
  path.write_text(''.join(records) + '{"step": 5, "lo')  # killed mid-write
  assert metrics.metrics_to_keep(str(path), 4) == records
  path.write_text(''.join(records[:2]) + '{"step": 3, "lo\n' + records[3])
  with pytest.raises(train_loop.UserError, match='garbled at line 3'):
    metrics.metrics_to_keep(str(path), 4)


def test_config_differences_ignore_the_resumable_fields():
  old = {'seed': 0, 'training': {'log_every_steps': 10, 'base_lr': 1.0},
         'distributed': {'coordinator_address': 'a:1'}, 'data': {'x': (1, 2)}}
  new = {'seed': 0, 'training': {'log_every_steps': 20, 'base_lr': 0.5},
         'distributed': {'coordinator_address': 'b:2'}, 'data': {'x': [1, 2]}}
  assert train_loop.config_differences(old, new) == ['training.base_lr']
  # Arrangements of the same step for the hardware (a run from before they
  # existed lacks them) are not differences either.
  new['model'] = {'encoder': {'fast_conv': True, 'conv_impl': 'onednn',
                             'depth': 18}}
  new['training']['images_per_pass'] = 64
  new['data']['input_threads'] = 1
  old['model'] = {'encoder': {'depth': 18}}
  assert train_loop.config_differences(old, new) == ['training.base_lr']
  # Data fields added later: absent means their default, set does not.
  new['data'].update(pretrain_split='', mean=(), std=())
  assert train_loop.config_differences(old, new) == ['training.base_lr']
  new['data'].update(pretrain_split='unlabelled', std=(0.2, 0.2, 0.2))
  assert train_loop.config_differences(old, new) == [
      'data.pretrain_split', 'data.std', 'training.base_lr']


def test_format_duration():
  assert metrics.format_duration(247.9) == '4m07s'
  assert metrics.format_duration(3900) == '1h05m'
  assert metrics.format_duration(-3) == '0m00s'


def test_a_broken_config_json_is_refused_before_anything_is_written(tmp_path):
  (tmp_path / 'config.json').write_text('{broken')
  with pytest.raises(train_loop.UserError,
                     match='config.json is not valid JSON .*line 1'):
    train_loop.check_workdir(str(tmp_path), None, has_checkpoint=False)
  assert (tmp_path / 'config.json').read_text() == '{broken'


@pytest.mark.slow
@pytest.mark.xdist_group('reference_run')
def test_metrics_hold_collapse_diagnostics_and_the_test_accuracy(
    tmp_path_factory):
  """The TINY run logs RankMe and the fixed-batch stds at every step and the
  online classifier's TEST accuracy at its last step; RankMe is recomputed
  here from the final checkpoint on the first 64 training images."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from byol import checkpointing  # pylint: disable=g-import-not-at-top
  from byol import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  from byol import diagnostics  # pylint: disable=g-import-not-at-top
  from byol import experiment  # pylint: disable=g-import-not-at-top
  from byol import model  # pylint: disable=g-import-not-at-top
  import tiny_runs  # pylint: disable=g-import-not-at-top

  workdir = tiny_runs.reference_run(tmp_path_factory)
  records = [json.loads(line) for line in
             (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  for r in records:
    assert 1.0 <= r['rankme_proj'] <= 16.0  # projections are 16-d
    assert 1.0 <= r['rankme_emb'] <= 64.0  # at most the batch of 64
    assert 0.0 <= r['fixed_proj_std'] <= 0.5
  assert 'eval_top1_accuracy' not in records[0]
  last = records[-1]
  assert 0.0 <= last['eval_top1_accuracy'] <= last['eval_top5_accuracy'] <= 1.0

  with open(workdir / 'config.json') as f:
    config = ml_collections.ConfigDict(json.load(f))
  state, _ = checkpointing.Checkpointer(str(workdir / 'checkpoints')).restore(
      6, target=experiment.state_template(config))
  batch = next(dataset_lib.load(
      dataset_lib.Split.TRAIN_AND_VALID,
      preprocess_mode=dataset_lib.PreprocessMode.EVAL, batch_dims=[64],
      dataset=config.data.dataset, image_size=config.data.image_size))
  forward = model.make_forward(config, 10, axis_name=None)
  out, _ = forward.apply(
      state.online_params, state.online_state, None,
      dataset_lib.normalize(batch['images'], dataset=config.data.dataset), True)
  # BatchNorm heads: statistics of the whole 64-image batch, as the pmapped
  # diagnostics pool them over the 4 devices.
  assert diagnostics.effective_rank(np.asarray(out['projection'])) == (
      pytest.approx(last['rankme_proj'], rel=1e-3))
  assert diagnostics.effective_rank(np.asarray(out['embedding'])) == (
      pytest.approx(last['rankme_emb'], rel=1e-3))
