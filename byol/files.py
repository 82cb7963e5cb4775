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
