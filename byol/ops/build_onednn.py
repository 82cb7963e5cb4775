r"""Builds byol/ops/onednn_conv.cc into build/onednn/ (run.sh's set-up runs it).

  python -m byol.ops.build_onednn            # build when out of date
  python -m byol.ops.build_onednn --check    # only say whether it is current

The library links oneDNN from the PyPI packages `onednn-cpu-gomp` (the
shared library, built for GNU OpenMP) and `onednn-devel-cpu-gomp` (its
headers), pinned in requirements.txt, and includes XLA's FFI headers from
jaxlib (`jax.ffi.include_dir()`). A stamp beside it records the source's
sha256, the jaxlib and oneDNN versions and the compiler; the library is
rebuilt when any of them changes, and `byol.onednn_conv` refuses a library
whose stamp does not match. Exit status 0 when the library is current (or
built), 2 with one `error:` line when it cannot be built (no g++, no oneDNN
package).
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from typing import Dict, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, 'byol', 'ops', 'onednn_conv.cc')
BUILD_DIR = os.path.join(ROOT, 'build', 'onednn')
LIBRARY = os.path.join(BUILD_DIR, 'libbyol_onednn_conv.so')
STAMP = os.path.join(BUILD_DIR, 'stamp.json')
RUNTIME_PACKAGE = 'onednn-cpu-gomp'
DEVEL_PACKAGE = 'onednn-devel-cpu-gomp'
COMPILER = os.environ.get('CXX', 'g++')


class BuildError(Exception):
  """The library cannot be built here (a missing tool or package)."""


def _package_file(package: str, suffix: str) -> str:
  """The installed file of `package` whose path ends with `suffix`."""
  try:
    dist = importlib.metadata.distribution(package)
  except importlib.metadata.PackageNotFoundError:
    raise BuildError(f'the Python package {package} is not installed '
                     '(pip install -r requirements.txt)') from None
  for f in dist.files or ():
    if ('/' + str(f)).endswith('/' + suffix):
      return os.path.realpath(str(dist.locate_file(f)))
  raise BuildError(f'{package} has no file ending {suffix}')


def inputs() -> Tuple[Dict[str, str], str, str]:
  """(stamp of what the library is built from, oneDNN lib dir, include dir)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  library = _package_file(RUNTIME_PACKAGE, 'libdnnl.so.3')
  header = _package_file(DEVEL_PACKAGE, 'oneapi/dnnl/dnnl.hpp')
  with open(SOURCE, 'rb') as f:
    source = hashlib.sha256(f.read()).hexdigest()
  stamp = {'source_sha256': source, 'jaxlib': jaxlib.__version__,
           'onednn': importlib.metadata.version(RUNTIME_PACKAGE),
           'compiler': COMPILER, 'jax_ffi_include': jax.ffi.include_dir()}
  include = os.path.dirname(os.path.dirname(os.path.dirname(header)))
  return stamp, os.path.dirname(library), include


def current_stamp() -> Dict[str, str]:
  """What the library would be built from now (raises BuildError)."""
  return inputs()[0]


def built_stamp() -> Dict[str, str]:
  """The stamp of the library on disk ({} when there is none)."""
  try:
    with open(STAMP) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def up_to_date() -> bool:
  return os.path.exists(LIBRARY) and built_stamp() == current_stamp()


def build() -> str:
  """Compiles the library (into a temporary file, then renamed); its path."""
  stamp, lib_dir, include = inputs()
  if shutil.which(COMPILER) is None:
    raise BuildError(f'no C++ compiler {COMPILER!r} (apt-get install g++)')
  os.makedirs(BUILD_DIR, exist_ok=True)
  tmp = LIBRARY + f'.tmp{os.getpid()}'
  # -fopenmp: the handlers set the OpenMP thread count of their calling
  # thread; -l:libdnnl.so.3 with an rpath to the package's folder, so that
  # nothing needs LD_LIBRARY_PATH.
  command = [COMPILER, '-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp',
             '-w',
             '-I', include, '-I', stamp['jax_ffi_include'], SOURCE,
             '-L', lib_dir, '-l:libdnnl.so.3', f'-Wl,-rpath,{lib_dir}',
             '-o', tmp]
  result = subprocess.run(command, capture_output=True, text=True,
                          check=False)
  if result.returncode != 0:
    # A compiler error in our own source is a bug: show all of it.
    raise RuntimeError(f'{" ".join(command)} failed:\n{result.stderr}')
  os.replace(tmp, LIBRARY)
  with open(STAMP + '.tmp', 'w') as f:
    json.dump(stamp, f, indent=1, sort_keys=True)
  os.replace(STAMP + '.tmp', STAMP)
  return LIBRARY


def main(argv) -> int:
  check = '--check' in argv[1:]
  try:
    if up_to_date():
      if check:
        print(f'oneDNN convolution library is current: {LIBRARY}')
      return 0
    if check:
      print(f'oneDNN convolution library is missing or out of date: {LIBRARY}')
      return 1
    print(f'building {LIBRARY} (oneDNN convolution, a few seconds)',
          flush=True)
    build()
    return 0
  except BuildError as e:
    print(f'error: cannot build the oneDNN convolution: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main(sys.argv))
