"""The training loop's machinery: signals, metrics log, resume checks."""

import os
import signal

import pytest

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
  assert train_loop.metrics_to_keep(str(path), 3) is None  # no file
  records = [f'{{"step": {s}, "loss": {s / 10}}}\n' for s in (1, 2, 3, 4)]
  path.write_text(''.join(records))
  assert train_loop.metrics_to_keep(str(path), 4) is None  # nothing to drop
  assert train_loop.metrics_to_keep(str(path), 2) == records[:2]
  path.write_text(''.join(records) + '{"step": 5, "lo')  # killed mid-write
  assert train_loop.metrics_to_keep(str(path), 4) == records
  path.write_text(''.join(records[:2]) + '{"step": 3, "lo\n' + records[3])
  with pytest.raises(train_loop.UserError, match='garbled at line 3'):
    train_loop.metrics_to_keep(str(path), 4)


def test_config_differences_ignore_the_resumable_fields():
  old = {'seed': 0, 'training': {'log_every_steps': 10, 'base_lr': 1.0},
         'distributed': {'coordinator_address': 'a:1'}, 'data': {'x': (1, 2)}}
  new = {'seed': 0, 'training': {'log_every_steps': 20, 'base_lr': 0.5},
         'distributed': {'coordinator_address': 'b:2'}, 'data': {'x': [1, 2]}}
  assert train_loop.config_differences(old, new) == ['training.base_lr']


def test_format_duration():
  assert train_loop.format_duration(247.9) == '4m07s'
  assert train_loop.format_duration(3900) == '1h05m'
  assert train_loop.format_duration(-3) == '0m00s'


def test_a_broken_config_json_is_refused_before_anything_is_written(tmp_path):
  (tmp_path / 'config.json').write_text('{broken')
  with pytest.raises(train_loop.UserError,
                     match='config.json is not valid JSON .*line 1'):
    train_loop.check_workdir(str(tmp_path), None, has_checkpoint=False)
  assert (tmp_path / 'config.json').read_text() == '{broken'
