"""Layers: swappable normalization, and plain or weight-standardized conv/linear.

The building blocks of `byol/networks.py`, after NFNets' `base.py`. Two
choices are made once, by factories, and passed down to the blocks as
callables:

* the normalization layer, `make_norm(kind, ...)` with kind one of
  `bn`, `gn`, `ln`, `affine`, `none`, called as `layer(x, is_training)`;
* whether convolution and linear weights are standardized (`WSConv2D`,
  `WSLinear`) or used as they are (`Conv2D`, `Linear`): `make_conv`,
  `make_linear`.

Normalization modules are named after their kind's tag (`batchnorm`,
`groupnorm`, `layernorm`, `affine`; see `NormFactory.tag`); `none` creates no
module. Every bias is called `b`.

Precision. Parameters are always stored in float32. With a bfloat16 compute
dtype convolutions and matmuls run in bfloat16 (inputs and weights are cast
just before use); normalization statistics are computed in float32 and
a normalization layer's output has its input's dtype.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from byol import fast_conv
from byol import onednn_conv

NORMS = ('bn', 'gn', 'ln', 'affine', 'none')

# Module-name tag of each normalization kind (see the module docstring).
_NORM_TAGS = {
    'bn': 'batchnorm',
    'gn': 'groupnorm',
    'ln': 'layernorm',
    'affine': 'affine',
    'none': 'identity',
}

NormModule = Callable[[jax.Array, bool], jax.Array]
Initializer = Callable[[Sequence[int], Any], jax.Array]


# Compute dtypes of convolutions and matmuls; parameters are always float32.
COMPUTE_DTYPES = ('float32', 'bfloat16')

# How a convolution is computed (the same function, other rounding): XLA's
# own (`lax`), XLA's with a backward pass arranged for XLA:CPU (`fast_conv`,
# byol/fast_conv.py), or oneDNN's kernels as custom calls (`onednn`,
# byol/onednn_conv.py; float32 on XLA:CPU, XLA's own elsewhere).
CONV_IMPLS = ('lax', 'fast_conv', 'onednn')


def conv_impl(impl: str, fast: bool = False, dtype: Any = jnp.float32) -> str:
  """The convolution implementation a config asks for, checked.

  Args:
    impl: one of `CONV_IMPLS`, or '' for the older switch `fast`.
    fast: `model.encoder.fast_conv` ('' and True: `fast_conv`).
    dtype: the compute dtype.

  Returns:
    One of `CONV_IMPLS`. `onednn` becomes `lax` on an accelerator and for a
    bfloat16 network: the custom calls are float32 kernels for XLA:CPU (and
    XLA's own convolutions are fast on accelerators), so that a preset with
    `onednn` runs everywhere.

  Raises:
    ValueError: for an unknown name, or `onednn` on the CPU in float32 where
      its library is not built (or was built for another jaxlib).
  """
  impl = impl or ('fast_conv' if fast else 'lax')
  if impl not in CONV_IMPLS:
    raise ValueError(f'unknown conv_impl {impl!r}; choose from '
                     f'{", ".join(CONV_IMPLS)}')
  if impl == 'onednn':
    if jax.default_backend() != 'cpu' or as_dtype(dtype) != np.float32:
      return 'lax'
    reason = onednn_conv.unavailable_reason()
    if reason is not None:
      raise ValueError(f"conv_impl 'onednn' cannot be used: {reason}")
  return impl


def as_dtype(dtype) -> np.dtype:
  """A compute dtype, given as a dtype or its name ('float32', 'bfloat16').

  Raises:
    ValueError: for any other dtype.
  """
  try:
    result = jnp.dtype(dtype)
  except TypeError:
    result = None
  if result is None or result.name not in COMPUTE_DTYPES:
    raise ValueError(f'dtype must be {" or ".join(COMPUTE_DTYPES)}, got '
                     f'{dtype!r}')
  return result


class BatchNorm(hk.BatchNorm):
  """`hk.BatchNorm` whose statistics are always computed in float32.

  Parameters and moving averages keep hk.BatchNorm's names and shapes
  (`scale`/`offset` of shape (1, ..., 1, C); `mean_ema`, `var_ema`), so
  checkpoints of DeepMind's BYOL map onto it. The output has the input's
  dtype.
  """

  def __call__(self, inputs: jax.Array, is_training: bool,
               test_local_stats: bool = False) -> jax.Array:
    # In bfloat16 the mean of squares over a large batch loses most of its
    # digits, so the whole layer runs in float32 and only the result is cast.
    out = super().__call__(inputs.astype(jnp.float32), is_training,
                           test_local_stats)
    return out.astype(inputs.dtype)


class GroupNorm(hk.Module):
  """Group normalization over the channels (last axis) and spatial axes.

  Equal to `hk.GroupNorm(num_groups, eps=eps)` but much faster on XLA's CPU
  backend: per-channel moments (mean and mean of squares over the spatial
  axes) are reduced first, in float32; they are then averaged over the
  channels of each group, and the input is normalised with one per-(example,
  channel) multiply-add, so the big tensor is read twice and written once.
  The variance is E[x^2] - E[x]^2, clamped at 0.

  With one group this is a layer norm over all non-batch axes; with as many
  groups as channels it is instance normalization. On a rank-2 input [B, C]
  the groups partition C.

  Parameters: `scale` (init 1, or `scale_init`) and `offset` (init 0), one per
  channel, float32. The output has the input's dtype.
  """

  def __init__(self,
               num_groups: int,
               eps: float = 1e-5,
               scale_init: Optional[Initializer] = None,
               name: Optional[str] = None):
    """Builds the layer.

    Args:
      num_groups: number of channel groups; must divide the channel count.
      eps: added to the variance before taking its square root.
      scale_init: initializer of the scale (default: ones).
      name: module name.
    """
    super().__init__(name=name)
    if num_groups < 1:
      raise ValueError(f'{self.module_name}: num_groups must be positive, got '
                       f'{num_groups}')
    self.num_groups = num_groups
    self.eps = eps
    self.scale_init = scale_init or jnp.ones

  def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
    del is_training  # Same computation in training and evaluation.
    if x.ndim < 2:
      raise ValueError(f'{self.module_name}: expects [batch, ..., channels], '
                       f'got shape {x.shape}')
    batch, channels = x.shape[0], x.shape[-1]
    groups = self.num_groups
    if channels % groups:
      raise ValueError(
          f'{self.module_name}: num_groups={groups} does not divide the '
          f'{channels} channels of its input')
    per_group = channels // groups
    spatial = tuple(range(1, x.ndim - 1))

    xf = x.astype(jnp.float32)
    if spatial:
      mean_c = jnp.mean(xf, axis=spatial)
      sq_mean_c = jnp.mean(jnp.square(xf), axis=spatial)
    else:
      mean_c, sq_mean_c = xf, jnp.square(xf)
    mean_g = jnp.mean(mean_c.reshape(batch, groups, per_group), axis=-1)
    sq_mean_g = jnp.mean(sq_mean_c.reshape(batch, groups, per_group), axis=-1)
    var_g = jnp.maximum(sq_mean_g - jnp.square(mean_g), 0.)
    inv_g = jax.lax.rsqrt(var_g + self.eps)

    scale = hk.get_parameter('scale', (channels,), jnp.float32,
                             init=self.scale_init)
    offset = hk.get_parameter('offset', (channels,), jnp.float32,
                              init=jnp.zeros)
    # Per-(example, channel) coefficients: y = x * a + b.
    a = jnp.repeat(inv_g, per_group, axis=1) * scale
    b = offset - jnp.repeat(mean_g, per_group, axis=1) * a
    bshape = (batch,) + (1,) * len(spatial) + (channels,)
    out = xf * a.reshape(bshape) + b.reshape(bshape)
    return out.astype(x.dtype)


class Affine(hk.Module):
  """Per-channel scale and offset, no statistics.

  This is what the BN-free initialisation protocol leaves in place of each
  BatchNorm: `scale` (init 1, or `scale_init`) and `offset` (init 0), shape
  (C,), float32. Note they are flat, whereas hk.BatchNorm's are (1, .., 1, C).
  """

  def __init__(self, scale_init: Optional[Initializer] = None,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.scale_init = scale_init or jnp.ones

  def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
    del is_training
    channels = x.shape[-1]
    scale = hk.get_parameter('scale', (channels,), jnp.float32,
                             init=self.scale_init)
    offset = hk.get_parameter('offset', (channels,), jnp.float32,
                              init=jnp.zeros)
    return (x.astype(jnp.float32) * scale + offset).astype(x.dtype)


def _identity(x: jax.Array, is_training: bool = False) -> jax.Array:
  del is_training
  return x


@dataclasses.dataclass(frozen=True)
class NormFactory:
  """Makes normalization layers of one kind; see `make_norm`.

  Attributes:
    kind: one of `NORMS`.
    tag: the name stem of the modules it makes (`batchnorm`, `groupnorm`,
      `layernorm`, `affine`; `identity` for `none`, which makes no module).
  """
  kind: str
  tag: str
  _build: Callable[..., NormModule]

  def __call__(self, name: str,
               scale_init: Optional[Initializer] = None) -> NormModule:
    """Returns a layer called as `layer(x, is_training)`.

    Args:
      name: module name; by convention `f'{prefix}{factory.tag}{suffix}'`.
      scale_init: initializer of the scale (default ones); ignored by kinds
        without a scale (`none`).
    """
    return self._build(name=name, scale_init=scale_init)


def make_norm(kind: str,
              *,
              num_groups: int = 16,
              bn_decay: float = 0.9,
              bn_eps: float = 1e-5,
              gn_eps: float = 1e-5,
              cross_replica_axis: Optional[str] = None) -> NormFactory:
  """Returns a factory of normalization layers of the given kind.

  All layers made by the factory are called as `layer(x, is_training)`, with
  x of shape [B, ..., C]; statistics are computed in float32 and the output
  has x's dtype.

  Args:
    kind: `bn` (BatchNorm over every axis but the last, with moving averages),
      `gn` (GroupNorm with `num_groups` groups), `ln` (normalization over all
      non-batch axes, i.e. GroupNorm with one group), `affine` (per-channel
      scale and offset only), `none` (identity, no parameters).
    num_groups: groups of `gn`.
    bn_decay: decay of BatchNorm's moving averages.
    bn_eps: BatchNorm's epsilon.
    gn_eps: epsilon of `gn` and `ln`.
    cross_replica_axis: BatchNorm only: the pmap axis name (e.g. 'i') over
      which batch statistics are averaged; None for per-device statistics.

  Returns:
    A `NormFactory`.

  Raises:
    ValueError: for an unknown kind.
  """
  if kind == 'bn':
    def build(name, scale_init):
      return BatchNorm(create_scale=True, create_offset=True,
                       decay_rate=bn_decay, eps=bn_eps, scale_init=scale_init,
                       cross_replica_axis=cross_replica_axis, name=name)
  elif kind == 'gn':
    build = functools.partial(GroupNorm, num_groups, gn_eps)
  elif kind == 'ln':
    build = functools.partial(GroupNorm, 1, gn_eps)
  elif kind == 'affine':
    build = Affine
  elif kind == 'none':
    build = lambda name, scale_init: _identity
  else:
    raise ValueError(f'unknown norm {kind!r}; choose from {", ".join(NORMS)}')
  return NormFactory(kind=kind, tag=_NORM_TAGS[kind], _build=build)


def standardize_weight(w: jax.Array, axis: Sequence[int],
                       eps: float) -> jax.Array:
  """Shifts `w` to zero mean and divides by sqrt(var + eps) over `axis`."""
  mean = jnp.mean(w, axis=axis, keepdims=True)
  var = jnp.var(w, axis=axis, keepdims=True)
  return (w - mean) * jax.lax.rsqrt(var + eps)


def _fan_in_init(fan_in: int) -> Initializer:
  # Haiku's default for Conv2D and Linear.
  return hk.initializers.TruncatedNormal(stddev=1. / np.sqrt(fan_in))


class Conv2D(hk.Conv2D):
  """`hk.Conv2D` (NHWC) with float32 weights and an optional compute dtype.

  The weight `w` (and bias `b`, when `with_bias`) are stored in float32 and
  cast, with the input, to `compute_dtype` (default: the input's dtype) just
  before the convolution. Subclasses change the weight through
  `effective_weight`.
  """

  def __init__(self,
               output_channels: int,
               kernel_shape: int | Sequence[int],
               stride: int | Sequence[int] = 1,
               *,
               with_bias: bool = False,
               padding: str = 'SAME',
               w_init: Optional[Initializer] = None,
               compute_dtype: Any = None,
               impl: str = 'lax',
               name: Optional[str] = None):
    super().__init__(output_channels=output_channels,
                     kernel_shape=kernel_shape, stride=stride,
                     padding=padding, with_bias=with_bias, w_init=w_init,
                     name=name)
    self.compute_dtype = (None if compute_dtype is None
                          else as_dtype(compute_dtype))
    # `CONV_IMPLS`: lax's convolution; `fast_conv.conv2d`, its backward
    # arranged for XLA:CPU; or oneDNN's (`onednn_conv.conv2d`, XLA:CPU, f32).
    if impl not in CONV_IMPLS:
      raise ValueError(f'unknown conv_impl {impl!r}; choose from '
                       f'{", ".join(CONV_IMPLS)}')
    self.impl = impl

  @hk.transparent
  def effective_weight(self, w: jax.Array) -> jax.Array:
    """The weight actually convolved with the input (here: `w` itself)."""
    return w

  def __call__(self, inputs: jax.Array) -> jax.Array:
    if inputs.ndim != 4:
      raise ValueError(f'{self.module_name}: expects [B, H, W, C], got shape '
                       f'{inputs.shape}')
    w_shape = tuple(self.kernel_shape) + (inputs.shape[-1],
                                          self.output_channels)
    w_init = self.w_init or _fan_in_init(int(np.prod(w_shape[:-1])))
    w = hk.get_parameter('w', w_shape, jnp.float32, init=w_init)
    w = self.effective_weight(w)
    dtype = self.compute_dtype or inputs.dtype
    if self.impl == 'fast_conv':
      out = fast_conv.conv2d(inputs.astype(dtype), w.astype(dtype),
                             self.stride, self.padding)
    elif self.impl == 'onednn':
      out = onednn_conv.conv2d(inputs.astype(dtype), w.astype(dtype),
                               self.stride, self.padding)
    else:
      out = jax.lax.conv_general_dilated(
          inputs.astype(dtype), w.astype(dtype),
          window_strides=self.stride,
          padding=self.padding,
          lhs_dilation=self.lhs_dilation,
          rhs_dilation=self.kernel_dilation,
          dimension_numbers=self.dimension_numbers)
    if self.with_bias:
      b = hk.get_parameter('b', (self.output_channels,), jnp.float32,
                           init=self.b_init)
      out = out + b.astype(dtype)
    return out


class WSConv2D(Conv2D):
  """Weight-standardized `Conv2D`.

  Each output channel's kernel (over height, width and input channels) is
  shifted to zero mean and divided by sqrt(var + ws_eps) before use;
  gradients flow through the standardization to the raw weight. No gain or
  other extra parameter: the normalization that follows supplies the affine,
  so parameter names and counts equal `Conv2D`'s.

  `ws_eps` is absolute, not relative to the weight's scale. The default,
  1e-10, is (1e-5)^2: Qiao et al.'s WS divides by std + 1e-5, and this is the
  same floor on the standard deviation. It must stay far below var(w): the
  fan-in initialisation gives var(w) ~ 0.77 / fan_in (about 3e-4 for a
  3x3x256 kernel, 4e-5 for 3x3x2048), and an eps of that order would shrink
  the standardized weights of wide layers and break WS' invariance to the
  raw weight's scale. It keeps the division finite for a constant kernel.
  """

  def __init__(self, *args, ws_eps: float = 1e-10, **kwargs):
    super().__init__(*args, **kwargs)
    self.ws_eps = ws_eps

  @hk.transparent
  def effective_weight(self, w: jax.Array) -> jax.Array:
    """The standardized weight."""
    return standardize_weight(w, axis=(0, 1, 2), eps=self.ws_eps)


class Linear(hk.Linear):
  """`hk.Linear` with float32 parameters and an optional compute dtype.

  As `Conv2D`: `w` and `b` are stored in float32 and cast, with the input, to
  `compute_dtype` (default: the input's dtype) before the matmul.
  """

  def __init__(self,
               output_size: int,
               *,
               with_bias: bool = True,
               w_init: Optional[Initializer] = None,
               compute_dtype: Any = None,
               name: Optional[str] = None):
    super().__init__(output_size=output_size, with_bias=with_bias,
                     w_init=w_init, name=name)
    self.compute_dtype = (None if compute_dtype is None
                          else as_dtype(compute_dtype))

  @hk.transparent
  def effective_weight(self, w: jax.Array) -> jax.Array:
    """The weight actually multiplied with the input (here: `w` itself)."""
    return w

  def __call__(self, inputs: jax.Array) -> jax.Array:
    input_size = inputs.shape[-1]
    w_init = self.w_init or _fan_in_init(input_size)
    w = hk.get_parameter('w', (input_size, self.output_size), jnp.float32,
                         init=w_init)
    w = self.effective_weight(w)
    dtype = self.compute_dtype or inputs.dtype
    out = jnp.dot(inputs.astype(dtype), w.astype(dtype))
    if self.with_bias:
      b = hk.get_parameter('b', (self.output_size,), jnp.float32,
                           init=self.b_init)
      out = out + b.astype(dtype)
    return out


class WSLinear(Linear):
  """Weight-standardized `Linear`: each output unit's weights (over the inputs)
  are shifted to zero mean and divided by sqrt(var + ws_eps). The bias is left
  as it is. See `WSConv2D` for the role and scale of `ws_eps`.
  """

  def __init__(self, *args, ws_eps: float = 1e-10, **kwargs):
    super().__init__(*args, **kwargs)
    self.ws_eps = ws_eps

  @hk.transparent
  def effective_weight(self, w: jax.Array) -> jax.Array:
    """The standardized weight."""
    return standardize_weight(w, axis=(0,), eps=self.ws_eps)


def make_conv(weight_standardization: bool, *, ws_eps: float = 1e-10,
              dtype: Any = jnp.float32,
              impl: str = 'lax') -> Callable[..., Conv2D]:
  """Returns a `Conv2D`/`WSConv2D` constructor with bias off by default."""
  if weight_standardization:
    return functools.partial(WSConv2D, ws_eps=ws_eps, compute_dtype=dtype,
                             impl=impl)
  return functools.partial(Conv2D, compute_dtype=dtype, impl=impl)


def make_linear(weight_standardization: bool, *, ws_eps: float = 1e-10,
                dtype: Any = jnp.float32) -> Callable[..., Linear]:
  """Returns a `Linear`/`WSLinear` constructor."""
  if weight_standardization:
    return functools.partial(WSLinear, ws_eps=ws_eps, compute_dtype=dtype)
  return functools.partial(Linear, compute_dtype=dtype)
