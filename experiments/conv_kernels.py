r"""One convolution at a time: XLA's, `fast_conv`'s and oneDNN's, interleaved.

For each convolution of the `local` network (the shapes of one pass of
`--batch` images), each kind (`forward`, `input_grad`, `weight_grad`) and
each implementation, a jitted function of that one convolution is compiled;
then every round calls each implementation `--calls` times in turn (the
order rotating), so that all see the same load. Reported per shape: the
median wall time of a call, the CPU time of the process per call (user +
system, which counts every thread), and the median over rounds of the ratio
of each implementation's time to XLA's (`lax`) in the same round.

  python -m experiments.conv_kernels --kinds=weight_grad --batch=64
  taskset -c 0 python -m experiments.conv_kernels --kinds=weight_grad

Implementations: `lax` (lax.conv and its autodiff), `fast_conv` (the weight
gradient of byol/fast_conv.py), `onednn1` / `onednn2` (byol/onednn_conv.py
with 1 or 2 OpenMP threads per call).
"""

import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from byol import fast_conv
from byol import host_memory
from byol import onednn_conv

_KINDS = flags.DEFINE_list('kinds', ['weight_grad'],
                           'forward, input_grad, weight_grad.')
_IMPLS = flags.DEFINE_list('impls', ['lax', 'fast_conv', 'onednn1', 'onednn2'],
                           'Implementations; ratios are to the first.')
_BATCH = flags.DEFINE_integer('batch', 64, 'Images per convolution.')
_ROUNDS = flags.DEFINE_integer('rounds', 20, 'Timed rounds.')
_CALLS = flags.DEFINE_integer('calls', 5, 'Calls per implementation a round.')

# (H=W, C, kernel, O, stride) of every convolution of the `local` encoder
# (ResNet-18 at width 0.25, one block per group, small stem, 24 px), SAME.
LOCAL_SHAPES = (
    (24, 3, 3, 16, 1),
    (24, 16, 1, 16, 1),
    (24, 16, 3, 16, 1),
    (24, 16, 1, 32, 2),
    (24, 16, 3, 32, 2),
    (12, 32, 3, 32, 1),
    (12, 32, 1, 64, 2),
    (12, 32, 3, 64, 2),
    (6, 64, 3, 64, 1),
    (6, 64, 1, 128, 2),
    (6, 64, 3, 128, 2),
    (3, 128, 3, 128, 1),
)


def _lax(x, w, stride):
  return jax.lax.conv_general_dilated(
      x, w, (stride, stride), 'SAME',
      dimension_numbers=fast_conv.DIMENSION_NUMBERS)


def make(kind, impl, x, w, dy, stride):
  """(jitted function, its arguments) of one convolution."""
  s = (stride, stride)
  pads = onednn_conv.explicit_padding(x.shape[1:3], w.shape[:2], s, 'SAME')
  threads = {'onednn1': 1, 'onednn2': 2}.get(impl)
  if kind == 'forward':
    if impl in ('lax', 'fast_conv'):
      fn = lambda x, w: _lax(x, w, stride)
    else:
      fn = lambda x, w: onednn_conv.forward(x, w, s, pads, threads)
    return jax.jit(fn), (x, w)
  if kind == 'input_grad':
    if impl in ('lax', 'fast_conv'):
      fn = lambda dy, w: jax.vjp(lambda x: _lax(x, w, stride), x)[1](dy)[0]
    else:
      fn = lambda dy, w: onednn_conv.input_grad(dy, w, x.shape, s, pads,
                                                threads)
    return jax.jit(fn), (dy, w)
  if impl == 'lax':
    fn = lambda x, dy: jax.vjp(lambda w: _lax(x, w, stride), w)[1](dy)[0]
  elif impl == 'fast_conv':
    def fn(x, dy):
      if w.shape[:2] == (1, 1):
        return fast_conv.pointwise_weight_gradient(x, dy, s, 'SAME')
      return fast_conv.chunked_weight_gradient(x, dy, w.shape[:2], s, 'SAME')
  else:
    fn = lambda x, dy: onednn_conv.weight_grad(x, dy, w.shape[:2], s, pads,
                                               threads)
  return jax.jit(fn), (x, dy)


def _cpu():
  t = os.times()
  return t.user + t.system


def main(argv):
  del argv
  host_memory.keep_freed_memory()
  impls = _IMPLS.value
  rng = np.random.RandomState(0)
  print(f'| kind | input | kernel | ' + ' | '.join(
      f'{i} ms (CPU ms)' for i in impls) + ' | ' + ' | '.join(
          f'{i} / {impls[0]}' for i in impls[1:]) + ' |')
  print('|---|---|---|' + '---:|' * (2 * len(impls) - 1))
  for kind in _KINDS.value:
    for size, c, k, o, stride in LOCAL_SHAPES:
      x = jnp.asarray(rng.randn(_BATCH.value, size, size, c), jnp.float32)
      w = jnp.asarray(rng.randn(k, k, c, o), jnp.float32) * 0.1
      y = _lax(x, w, stride)
      dy = jnp.asarray(rng.randn(*y.shape), jnp.float32)
      runs = []
      for impl in impls:
        fn, args = make(kind, impl, x, w, dy, stride)
        jax.block_until_ready(fn(*args))
        runs.append(dict(fn=fn, args=args, wall=[], cpu=0.0))
      for a, b in zip(runs[1:], [runs[0]] * len(runs)):
        ref = np.asarray(b['fn'](*b['args']))
        out = np.asarray(a['fn'](*a['args']))
        scale = np.abs(ref).max()
        assert np.abs(out - ref).max() <= 1e-4 * scale, (kind, size, c, k, o)
      for r in range(_ROUNDS.value):
        order = runs[r % len(runs):] + runs[:r % len(runs)]
        for run in order:
          t, p = time.perf_counter(), _cpu()
          for _ in range(_CALLS.value):
            out = run['fn'](*run['args'])
          jax.block_until_ready(out)
          run['cpu'] += _cpu() - p
          run['wall'].append((time.perf_counter() - t) / _CALLS.value)
      n = _ROUNDS.value * _CALLS.value
      cells = [f'{1e3 * statistics.median(r["wall"]):.2f} '
               f'({1e3 * r["cpu"] / n:.2f})' for r in runs]
      ratios = [statistics.median(a / b for a, b in
                                  zip(r['wall'], runs[0]['wall']))
                for r in runs[1:]]
      print(f'| {kind} | {_BATCH.value}x{size}x{size}x{c} | {k}x{k}x{o} '
            f's{stride} | ' + ' | '.join(cells) + ' | ' +
            ' | '.join(f'{q:.2f}' for q in ratios) + ' |', flush=True)


if __name__ == '__main__':
  app.run(main)
