"""2-D convolutions through oneDNN on XLA:CPU, as JAX FFI custom calls.

`byol/ops/onednn_conv.cc` runs oneDNN's convolution primitives (NHWC
activations, HWIO kernels, f32) for the forward pass, the input gradient and
the weight gradient; `byol/ops/build_onednn.py` compiles it into
`build/onednn/` (run.sh does this in its set-up). This module loads that
library when it is there and registers its three handlers with XLA; the
project imports without it, and `available()` says whether it is there.
"""

import ctypes
import functools
import os
from typing import Optional, Sequence, Tuple, Union

import jax
import numpy as np

from byol.ops import build_onednn

Padding = Union[str, Sequence[Sequence[int]]]
_TARGETS = {'forward': 'ByolOnednnConvForward',
            'input_grad': 'ByolOnednnConvInputGrad',
            'weight_grad': 'ByolOnednnConvWeightGrad'}


@functools.lru_cache(maxsize=None)
def _load() -> Optional[str]:
  """Registers the handlers once; None on success, else why not."""
  path = build_onednn.LIBRARY
  if not os.path.exists(path):
    return (f'{path} is not built (./run.sh builds it, or python -m '
            'byol.ops.build_onednn)')
  try:
    stale = build_onednn.built_stamp() != build_onednn.current_stamp()
  except build_onednn.BuildError as e:
    return str(e)
  if stale:
    return (f'{path} was built from another source, jaxlib or oneDNN '
            '(rebuild: python -m byol.ops.build_onednn)')
  try:
    lib = ctypes.cdll.LoadLibrary(path)
  except OSError as e:
    return f'cannot load {path}: {e}'
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(f'byol_onednn_conv_{name}',
                                jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform='cpu')
  return None


def available() -> bool:
  """Whether the oneDNN library is built and loaded."""
  return _load() is None


def unavailable_reason() -> Optional[str]:
  """Why the library cannot be used, or None."""
  return _load()


def explicit_padding(size: Tuple[int, int], kernel: Tuple[int, int],
                     stride: Tuple[int, int],
                     padding: Padding) -> Tuple[Tuple[int, int], ...]:
  """((top, bottom), (left, right)) as lax.conv pads for `padding`."""
  if not isinstance(padding, str):
    return tuple((int(lo), int(hi)) for lo, hi in padding)
  pads = []
  for n, k, s in zip(size, kernel, stride):
    if padding == 'VALID':
      pads.append((0, 0))
    elif padding == 'SAME':
      out = -(-n // s)
      total = max((out - 1) * s + k - n, 0)
      pads.append((total // 2, total - total // 2))
    else:
      raise ValueError(f'unknown padding {padding!r}; use SAME, VALID or pairs')
  return tuple(pads)


def _attrs(stride, pads, threads):
  (pt, pb), (pl, pr) = pads
  return dict(stride_h=np.int64(stride[0]), stride_w=np.int64(stride[1]),
              pad_top=np.int64(pt), pad_bottom=np.int64(pb),
              pad_left=np.int64(pl), pad_right=np.int64(pr),
              threads=np.int64(threads))


def _check():
  reason = _load()
  if reason is not None:
    raise RuntimeError(f'oneDNN convolution unavailable: {reason}')


def forward(x, w, stride, pads, threads=1):
  """y[N, Ho, Wo, O] of x[N, H, W, C] and w[kh, kw, C, O]."""
  _check()
  n, h, wd, _ = x.shape
  kh, kw, _, o = w.shape
  ho = (h + sum(pads[0]) - kh) // stride[0] + 1
  wo = (wd + sum(pads[1]) - kw) // stride[1] + 1
  out = jax.ShapeDtypeStruct((n, ho, wo, o), x.dtype)
  return jax.ffi.ffi_call('byol_onednn_conv_forward', out)(
      x, w, **_attrs(stride, pads, threads))


def input_grad(dy, w, x_shape, stride, pads, threads=1):
  """dx[N, H, W, C] from dy[N, Ho, Wo, O] and w[kh, kw, C, O]."""
  _check()
  out = jax.ShapeDtypeStruct(tuple(x_shape), dy.dtype)
  return jax.ffi.ffi_call('byol_onednn_conv_input_grad', out)(
      dy, w, **_attrs(stride, pads, threads))


def weight_grad(x, dy, kernel, stride, pads, threads=1):
  """dw[kh, kw, C, O] from x[N, H, W, C] and dy[N, Ho, Wo, O]."""
  _check()
  out = jax.ShapeDtypeStruct(tuple(kernel) + (x.shape[-1], dy.shape[-1]),
                             x.dtype)
  return jax.ffi.ffi_call('byol_onednn_conv_weight_grad', out)(
      x, dy, **_attrs(stride, pads, threads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x, w, stride, pads):
  return forward(x, w, stride, pads)


def _conv2d_fwd(x, w, stride, pads):
  return forward(x, w, stride, pads), (x, w)


def _conv2d_bwd(stride, pads, residuals, dy):
  x, w = residuals
  return (input_grad(dy, w, x.shape, stride, pads),
          weight_grad(x, dy, w.shape[:2], stride, pads))


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv2d(x: jax.Array, w: jax.Array, stride: Union[int, Sequence[int]] = 1,
           padding: Padding = 'SAME') -> jax.Array:
  """NHWC x HWIO convolution in oneDNN, forward and backward (f32, XLA:CPU).

  The same function as `jax.lax.conv_general_dilated(x, w, stride, padding,
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`, to float32 rounding; its
  gradients are oneDNN's input- and weight-gradient convolutions.

  Args:
    x: [N, H, W, C], float32.
    w: [kh, kw, C, O], float32.
    stride: an int or (sh, sw).
    padding: 'SAME', 'VALID', or ((lo, hi), (lo, hi)).

  Returns:
    [N, Ho, Wo, O].

  Raises:
    RuntimeError: when the library is not built (see `available`).
  """
  _check()
  if isinstance(stride, int):
    stride = (stride, stride)
  stride = tuple(int(s) for s in stride)
  pads = explicit_padding(x.shape[1:3], w.shape[:2], stride, padding)
  return _conv2d(x, w, stride, pads)
