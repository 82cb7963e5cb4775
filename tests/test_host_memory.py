"""byol/host_memory.py: freed blocks stay in the heap for the next step."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates (malloc, as XLA:CPU; not NumPy, which asks for huge pages),
# writes and frees a 300 MB block three times, as XLA:CPU does with a step's
# temporaries; prints the page faults of the last two rounds.
_SCRIPT = textwrap.dedent('''
    import ctypes, resource, sys
    if sys.argv[1] == 'keep':
      from byol import host_memory
      assert host_memory.keep_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 300 * 2**20
    faults = []
    for _ in range(3):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      block = libc.malloc(size)
      ctypes.memset(block, 1, size)  # written: every page touched
      libc.free(block)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt -
                    before)
    print(sum(faults[1:]))
''')


@pytest.mark.skipif(platform.system() != 'Linux' or
                    platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_a_freed_step_sized_block_is_reused_without_page_faults():
  faults = {}
  for mode in ('default', 'keep'):
    out = subprocess.run([sys.executable, '-c', _SCRIPT, mode], cwd=ROOT,
                         capture_output=True, text=True, timeout=300,
                         check=True)
    faults[mode] = int(out.stdout.split()[-1])
  pages = 2 * 300 * 2**20 // os.sysconf('SC_PAGE_SIZE')
  # glibc's default maps and unmaps the block: every page faults again...
  assert faults['default'] > 0.9 * pages, faults
  # ...kept, the second and third rounds reuse the first one's pages.
  assert faults['keep'] < 0.01 * pages, faults
