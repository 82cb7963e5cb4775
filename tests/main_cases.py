"""Runs main.py on many command lines in one process start, for the tests.

Each `main.py` run in a subprocess pays for importing JAX and TensorFlow
(seconds on a loaded machine). The runs of bad input end before any
computation, so this helper imports once and then forks one child per
command line: each child runs main.py's `main` exactly as `python main.py`
would (its own argv, stdout and stderr, exit status). The parent never
starts a JAX backend, so the children may.

  python tests/main_cases.py CASES.json RESULTS.json

CASES.json: a list of cases, each an argument list (without the program
name) or {"args": [...], "full_disk": true}: the latter's writes of
checkpoint data fail with ENOSPC, as on a full disk.
RESULTS.json: a list of {"returncode", "stdout", "stderr"}, in order.
"""

import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
from absl import app
import main as main_lib
# What every run imports anyway; imported once here, before the forks.
import jax
from byol import dm_checkpoint
from byol import experiment
from byol import train_loop
# pylint: enable=g-import-not-at-top,wrong-import-position,unused-import


def _fill_the_disk():
  """Every checkpoint member written from now on fails as on a full disk."""
  import errno  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top

  def writestr(*args, **kwargs):
    del args, kwargs
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  zipfile.ZipFile.writestr = writestr


def _child(case, out_path, err_path):
  args = case['args'] if isinstance(case, dict) else case
  if isinstance(case, dict) and case.get('full_disk'):
    _fill_the_disk()
  with open(out_path, 'wb') as out, open(err_path, 'wb') as err:
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
  sys.argv = ['main.py', *args]
  status = 0
  try:
    parse = main_lib._parse_flags  # pylint: disable=protected-access
    app.run(main_lib.main, flags_parser=parse)
  except SystemExit as e:
    status = e.code if isinstance(e.code, int) else (0 if e.code is None
                                                     else 1)
  except BaseException:  # pylint: disable=broad-except
    import traceback  # pylint: disable=g-import-not-at-top
    traceback.print_exc()
    status = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def main(cases_path, results_path):
  with open(cases_path) as f:
    cases = json.load(f)
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, case in enumerate(cases):
      out_path = os.path.join(tmp, f'{i}.out')
      err_path = os.path.join(tmp, f'{i}.err')
      sys.stdout.flush()
      sys.stderr.flush()
      pid = os.fork()
      if pid == 0:
        _child(case, out_path, err_path)
      _, status = os.waitpid(pid, 0)
      code = (os.WEXITSTATUS(status) if os.WIFEXITED(status)
              else -os.WTERMSIG(status))
      with open(out_path, errors='replace') as out, \
          open(err_path, errors='replace') as err:
        results.append({'returncode': code, 'stdout': out.read(),
                        'stderr': err.read()})
  with open(results_path, 'w') as f:
    json.dump(results, f)


if __name__ == '__main__':
  main(*sys.argv[1:])
