"""The workdir's small text files: written atomically, read with one-line errors.

A run killed while writing `config.json`, `summary.json` or a study's JSON
must not leave half a file behind: each is written next to its final name
and renamed over it (`os.replace` is atomic on POSIX). A file that is
nonetheless damaged (edited by hand, cut by a full disk, copied badly) is
bad input, not a bug: reading it raises `UserError` naming the file and what
to do about it, which `main.py` prints as one `error:` line.
"""

import json
import os
from typing import Any

from byol.errors import UserError


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (a temporary file, then a rename)."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented, key-sorted JSON to `path`, atomically."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: str, remedy: str) -> Any:
  """The JSON value in `path`.

  Args:
    path: the file.
    remedy: what the user can do when it is damaged, e.g. 'use another
      --workdir'; ends the error message.

  Raises:
    UserError: the file cannot be read, is not UTF-8 text or not JSON.
    FileNotFoundError: there is no such file (callers decide what that means).
  """
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except FileNotFoundError:
    raise
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror or e}; '
                    f'{remedy}') from None
  except UnicodeDecodeError:
    raise UserError(f'{path} is not text (damaged?); {remedy}') from None
  except json.JSONDecodeError as e:
    raise UserError(f'{path} is not valid JSON ({e.msg} at line {e.lineno}, '
                    f'column {e.colno}); {remedy}') from None


LOCK_NAME = '.lock'


class WorkdirLock:
  """One writer per workdir: an exclusive `flock` on `<workdir>/.lock`.

  The lock file holds the pid of the process that owns the workdir. The
  kernel drops a `flock` when its process ends however it ends (SIGKILL
  included), so a lock file left by a dead process never blocks a new run;
  there is no staleness to guess. The file is removed on release, so a run
  leaves no trace of its lock.

  Removing a lock file races with a process that opened it just before the
  removal and then locks the orphaned inode while a third creates a new file;
  `acquire` therefore checks, once it holds the lock, that the file it holds
  is still the one at the path, and tries again otherwise.

  Usage:
    with WorkdirLock(workdir):
      ...  # the only process writing to workdir
  """

  def __init__(self, workdir: str, name: str = LOCK_NAME):
    self.path = os.path.join(workdir, name)
    self._fd = None

  def acquire(self) -> None:
    """Takes the lock, or raises `UserError` naming the process holding it."""
    import fcntl  # pylint: disable=g-import-not-at-top
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 32).decode('ascii', 'replace').strip()
        os.close(fd)
        who = f'process {holder}' if holder.isdigit() else 'another process'
        raise UserError(
            f'{os.path.dirname(self.path) or "."} is in use by {who} (a run '
            'still writing there); wait for it to end or use another '
            '--workdir') from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)  # released and removed under us: lock the new file
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()}\n'.encode('ascii'))
    self._fd = fd

  def release(self) -> None:
    """Removes the lock file, then drops the lock. A process that opened
    the file just before its removal gets the lock on a file no longer at
    the path, and `acquire` makes it try again on the path's new file."""
    if self._fd is None:
      return
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc_info):
    self.release()
