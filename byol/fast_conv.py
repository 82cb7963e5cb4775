"""A 2-D convolution with a cheaper backward pass on XLA's CPU backend.

`conv2d(x, w, stride, padding)` computes exactly
`jax.lax.conv_general_dilated(x, w, stride, padding,
dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`; only its weight gradient is
computed differently, for two costs measured in the `local` BYOL step on
XLA:CPU (a profile of the step; see docs/performance.md):

* For 1x1 kernels the weight gradient is a single matrix product of the
  (strided) input and the output gradient, both [N*Ho*Wo, channels]: 7x
  faster than XLA's convolution form at 16-32 channels.
* Other weight gradients are XLA's, summed over chunks of 16 examples: the
  CPU library runs one weight-gradient convolution over 512 examples 1.5-4x
  slower than 32 over 16 each (`chunked_weight_gradient`).

The forward pass and the input gradient are XLA's own. On accelerators XLA's
own gradients are fast and this module brings nothing; the networks use it
where `model.encoder.fast_conv` is set (the `local` preset).
"""

import functools
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
Padding = Union[str, Tuple[Tuple[int, int], Tuple[int, int]]]


def _conv(x, w, stride, padding):
  return jax.lax.conv_general_dilated(
      x, w, window_strides=stride, padding=padding,
      dimension_numbers=DIMENSION_NUMBERS)


def _pads(size: int, kernel: int, stride: int,
          padding: str) -> Tuple[int, int]:
  """(before, after) padding of one spatial axis, as lax.conv does it."""
  if padding == 'VALID':
    return 0, 0
  if padding == 'SAME':
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2
  raise ValueError(f'unknown padding {padding!r}; use SAME, VALID or pairs')


def pointwise_weight_gradient(x: jax.Array, dy: jax.Array,
                              stride: Sequence[int],
                              padding: Padding) -> jax.Array:
  """The weight gradient of a 1x1 convolution as one matrix product.

  Args:
    x: the convolution's input, [N, H, W, C].
    dy: the gradient of its output, [N, Ho, Wo, O].
    stride: (sh, sw).
    padding: 'SAME', 'VALID' or ((lo, hi), (lo, hi)).

  Returns:
    [1, 1, C, O].
  """
  _, h, w, c = x.shape
  _, ho, wo, o = dy.shape
  sh, sw = stride
  if isinstance(padding, str):
    pads = (_pads(h, 1, sh, padding), _pads(w, 1, sw, padding))
  else:
    pads = tuple(tuple(p) for p in padding)
  if any(p for pair in pads for p in pair):
    x = jnp.pad(x, ((0, 0),) + pads + ((0, 0),))
  x = x[:, :sh * (ho - 1) + 1:sh, :sw * (wo - 1) + 1:sw, :]
  grad = jax.lax.dot_general(x.reshape(-1, c), dy.reshape(-1, o),
                             (((0,), (0,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST)
  return grad.reshape(1, 1, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x, w, stride, padding):
  return _conv(x, w, stride, padding)


def _conv2d_fwd(x, w, stride, padding):
  return _conv(x, w, stride, padding), (x, w)


def _num_chunks(batch: int, chunk: int) -> int:
  """The most chunks of at least `chunk` examples that split `batch` evenly."""
  divisors = [d for d in range(1, batch // chunk + 1) if batch % d == 0]
  return max(divisors or [1])


def chunked_weight_gradient(x: jax.Array, dy: jax.Array,
                            kernel_shape: Sequence[int], stride: Sequence[int],
                            padding: Padding, chunk: int = 16) -> jax.Array:
  """XLA's weight gradient, summed over chunks of about `chunk` examples.

  On XLA:CPU a weight-gradient convolution over 512 examples runs 1.5-4x
  slower than the sum of 32 of them over 16 examples each (measured at the
  `local` network's sizes, 3-128 channels, 24 to 3 px); the chunks are
  independent, so both cores take them.

  Args:
    x: the convolution's input, [N, H, W, C].
    dy: the gradient of its output, [N, Ho, Wo, O].
    kernel_shape: (kh, kw).
    stride: (sh, sw).
    padding: as lax.conv's.
    chunk: the smallest number of examples in a chunk.

  Returns:
    [kh, kw, C, O].
  """
  batch = x.shape[0]
  chunks = _num_chunks(batch, chunk)
  size = batch // chunks
  w0 = jnp.zeros(tuple(kernel_shape) + (x.shape[-1], dy.shape[-1]), x.dtype)
  grad = None
  for i in range(chunks):
    xs = jax.lax.slice_in_dim(x, i * size, (i + 1) * size)
    dys = jax.lax.slice_in_dim(dy, i * size, (i + 1) * size)
    _, vjp = jax.vjp(lambda w, xs=xs: _conv(xs, w, stride, padding), w0)
    (part,) = vjp(dys)
    grad = part if grad is None else grad + part
  return grad


def _conv2d_bwd(stride, padding, residuals, dy):
  x, w = residuals
  _, vjp = jax.vjp(lambda x: _conv(x, w, stride, padding), x)
  (dx,) = vjp(dy)
  if w.shape[:2] == (1, 1):
    dw = pointwise_weight_gradient(x, dy, stride, padding)
  else:
    dw = chunked_weight_gradient(x, dy, w.shape[:2], stride, padding)
  return dx, dw.astype(w.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv2d(x: jax.Array, w: jax.Array, stride: Union[int, Sequence[int]] = 1,
           padding: Union[str, Sequence[Sequence[int]]] = 'SAME'
           ) -> jax.Array:
  """NHWC x HWIO convolution: lax.conv's forward, the gradient above.

  Args:
    x: [N, H, W, C].
    w: [kh, kw, C, O], of x's dtype.
    stride: an int or (sh, sw).
    padding: 'SAME', 'VALID', or ((lo, hi), (lo, hi)).

  Returns:
    [N, Ho, Wo, O], equal to `jax.lax.conv_general_dilated(x, w, stride,
    padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`.
  """
  if isinstance(stride, int):
    stride = (stride, stride)
  if not isinstance(padding, str):
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  return _conv2d(x, w, tuple(int(s) for s in stride), padding)
