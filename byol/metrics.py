"""metrics.jsonl: the one writer and the one reader of a run's records.

A record is one JSON object per line with an integer `step` and scalars.
Pretraining (`train_loop`), the evaluations (`eval_experiment`) and the
studies (`experiments/`) write and read them through this module only. Also
the duration format of the progress lines that go with them.
"""

import json
import os
from typing import Dict, List, Optional, Tuple

from byol import files
from byol.errors import UserError

REMEDY = 'move it aside to start a new log, or use another --workdir'


def format_duration(seconds: float) -> str:
  """'1h05m' or '4m07s': a duration for progress lines."""
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def _read_lines(path: str) -> Tuple[List[Tuple[str, dict]], bool]:
  """(line, record) pairs of a metrics.jsonl, and whether its last line was
  cut short (a kill mid-write; that line is left out).

  Raises:
    FileNotFoundError: there is no such file.
    UserError: the file cannot be read, or a line other than the last is not
      a record: a damaged log, which a rewrite would silently shorten.
  """
  try:
    with open(path, encoding='utf-8') as f:
      lines = f.readlines()
  except FileNotFoundError:
    raise
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror or e}; {REMEDY}'
                    ) from None
  except UnicodeDecodeError:
    raise UserError(f'{path} is not text (damaged?); {REMEDY}') from None
  out, cut_short = [], False
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
      if not isinstance(record['step'], int):
        raise TypeError(record['step'])
    except (ValueError, KeyError, TypeError, IndexError):
      if number == len(lines) and not line.endswith('\n'):
        cut_short = True
        continue
      raise UserError(f'{path} is garbled at line {number}; {REMEDY}'
                      ) from None
    out.append((line, record))
  return out, cut_short


def read_metrics(path: str) -> List[dict]:
  """The records of a metrics.jsonl by step, one per step, the last written
  winning (a resumed run's repeats dropped); [] when there is no file.

  Raises:
    UserError: the file is unreadable or garbled (see `_read_lines`).
  """
  try:
    pairs, _ = _read_lines(path)
  except FileNotFoundError:
    return []
  by_step = {record['step']: record for _, record in pairs}
  return [by_step[s] for s in sorted(by_step)]


def metrics_to_keep(path: str, step: int) -> Optional[list]:
  """The lines of a metrics.jsonl to keep when resuming from `step`.

  Records of steps after `step` (left by a run killed after its last
  checkpoint) go, so that the resumed run's records replace them instead of
  repeating them; so does a last line cut short by a kill mid-write.

  Returns:
    The lines to keep, or None when the file is absent or keeps every line
    (it is then left untouched).

  Raises:
    UserError: the file cannot be read, or is garbled.
  """
  try:
    pairs, cut_short = _read_lines(path)
  except FileNotFoundError:
    return None
  keep = [line for line, record in pairs if record['step'] <= step]
  return None if len(keep) == len(pairs) and not cut_short else keep


class MetricsWriter:
  """metrics.jsonl (+ TensorBoard events); a no-op where not `enabled`.

  Args:
    directory: where metrics.jsonl (and the events) go.
    enabled: False on processes other than 0.
    keep: the lines an existing metrics.jsonl is cut down to before new
      records are appended (see `metrics_to_keep`; [] starts it afresh);
      None leaves it as it is.
    tensorboard: also write TensorBoard events.
  """

  def __init__(self, directory: str, enabled: bool = True,
               keep: Optional[list] = None, tensorboard: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    path = os.path.join(directory, 'metrics.jsonl')
    if keep is not None:
      files.write_text(path, ''.join(keep))
    self._jsonl = open(path, 'a')
    if tensorboard:
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        self._tb = tf.summary.create_file_writer(directory)
      except Exception:  # pylint: disable=broad-except
        self._tb = None  # TensorBoard is a convenience; metrics.jsonl is not.

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    """Appends the record of `step`."""
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._tb.as_default():
        for k, v in scalars.items():
          tf.summary.scalar(k, float(v), step=int(step))
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
