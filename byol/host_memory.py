"""Keeping freed host memory for reuse, so that CPU steps do not fault it in.

XLA:CPU allocates a step's temporaries as one block (263 MB for the `local`
GN+WS step) and frees it when the step ends. glibc's malloc serves a block
that large with a fresh `mmap` (from whichever thread's arena asks) and gives
it back with `munmap`, so every step faults the whole block in again: ~68,000
page faults and ~200 ms of kernel time per `local` step, a sixth of its CPU
time, spent zeroing pages, and more or less of it as the machine's memory
state varies (docs/performance.md, "Stability"). PyTorch's smaller per-op
buffers stay in malloc's heap and do not pay it.

`keep_freed_memory()` makes malloc keep such blocks: one arena for every
thread (a thread arena's heap cannot hold a block over 64 MB and would map it
anyway), no `mmap` for large blocks, and no trimming of the heap's free top.
The cost is that the process keeps its peak heap until it exits.
"""

import ctypes
import platform

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = None


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory; True where it did.

  Call it first thing in a process, before other threads start (JAX's,
  TensorFlow's): arenas made before it stay. A no-op without glibc (e.g.
  macOS, musl) and on a second call.
  """
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  # mallopt returns 1 on success. The trim threshold is an int: 2**31 - 1
  # bytes of free heap top are kept.
  _applied = all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
                  mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)])
  return _applied
