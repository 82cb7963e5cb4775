"""Encoders (ResNet v1) and MLP heads with swappable normalization and WS.

Every network here is a Haiku module called as `net(x, is_training)` inside
`hk.transform_with_state`. Two independent choices are made once, by
factories, and passed down to the blocks as callables:

* the normalization layer, `make_norm(kind, ...)` with kind one of
  `bn`, `gn`, `ln`, `affine`, `none`;
* whether convolution and linear weights are standardized (`WSConv2D`,
  `WSLinear`) or used as they are (`Conv2D`, `Linear`).

Module naming rule. Normalization modules are named after their kind's tag
(`batchnorm`, `groupnorm`, `layernorm`, `affine`); `none` creates no module at
all. So the BatchNorm ResNet-50 has DeepMind BYOL's checkpoint layout
(`res_net50/~/initial_conv`, `res_net50/~/initial_batchnorm`,
`res_net50/~/block_group_0/~/block_0/~/conv_0`, `.../batchnorm_0`,
`.../shortcut_conv`, `.../shortcut_batchnorm`) and the GroupNorm one reads
`.../groupnorm_0`, `.../shortcut_groupnorm`. Every module that owns
normalization parameters has `norm` or `affine` in its name, and every bias is
called `b`: the optimizer relies on exactly this to exclude them from weight
decay and from LARS' trust ratio.

Precision. Parameters are always stored in float32. With `dtype=jnp.bfloat16`
convolutions and matmuls run in bfloat16 (inputs and weights are cast just
before use), normalization statistics are computed in float32, and the
returned embedding is float32.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

NORMS = ('bn', 'gn', 'ln', 'affine', 'none')
STEMS = ('imagenet', 'small')

# Module-name tag of each normalization kind (see the module docstring).
_NORM_TAGS = {
    'bn': 'batchnorm',
    'gn': 'groupnorm',
    'ln': 'layernorm',
    'affine': 'affine',
    'none': 'identity',
}

# depth -> (blocks per group, bottleneck blocks).
RESNET_DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}

NormModule = Callable[[jax.Array, bool], jax.Array]
Initializer = Callable[[Sequence[int], Any], jax.Array]


def _as_dtype(dtype) -> np.dtype:
  """Accepts a dtype or its name ('float32', 'bfloat16')."""
  return jnp.dtype(dtype)


# Normalization layers.


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


# Convolution and linear layers (plain and weight-standardized).


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
               name: Optional[str] = None):
    super().__init__(output_channels=output_channels,
                     kernel_shape=kernel_shape, stride=stride,
                     padding=padding, with_bias=with_bias, w_init=w_init,
                     name=name)
    self.compute_dtype = (None if compute_dtype is None
                          else _as_dtype(compute_dtype))

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
                          else _as_dtype(compute_dtype))

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
              dtype: Any = jnp.float32) -> Callable[..., Conv2D]:
  """Returns a `Conv2D`/`WSConv2D` constructor with bias off by default."""
  if weight_standardization:
    return functools.partial(WSConv2D, ws_eps=ws_eps, compute_dtype=dtype)
  return functools.partial(Conv2D, compute_dtype=dtype)


def make_linear(weight_standardization: bool, *, ws_eps: float = 1e-10,
                dtype: Any = jnp.float32) -> Callable[..., Linear]:
  """Returns a `Linear`/`WSLinear` constructor."""
  if weight_standardization:
    return functools.partial(WSLinear, ws_eps=ws_eps, compute_dtype=dtype)
  return functools.partial(Linear, compute_dtype=dtype)


# ResNet.


class ResidualBlock(hk.Module):
  """ResNet v1 block (basic or bottleneck), as in haiku's nets/resnet.py.

  Bottleneck: 1x1 (width) -> 3x3 (width, stride) -> 1x1 (4 * width); basic:
  3x3 (width, stride) -> 3x3 (width). Each conv is followed by a norm; ReLU
  after every norm but the last; then out = relu(branch + shortcut), where
  the shortcut is a strided 1x1 conv + norm when `use_projection`, else the
  input.
  """

  def __init__(self,
               width: int,
               stride: int,
               bottleneck: bool,
               use_projection: bool,
               conv: Callable[..., hk.Module],
               norm: NormFactory,
               zero_init_last_scale: bool = False,
               name: Optional[str] = None):
    super().__init__(name=name)
    if bottleneck:
      specs = ((width, 1, 1), (width, 3, stride), (4 * width, 1, 1))
    else:
      specs = ((width, 3, stride), (width, 3, 1))
    self.output_channels = specs[-1][0]
    self.use_projection = use_projection
    if use_projection:
      self.shortcut_conv = conv(self.output_channels, 1, stride,
                                name='shortcut_conv')
      self.shortcut_norm = norm(f'shortcut_{norm.tag}')
    self.layers = []
    for i, (channels, kernel, conv_stride) in enumerate(specs):
      last = i == len(specs) - 1
      scale_init = jnp.zeros if (last and zero_init_last_scale) else None
      self.layers.append((conv(channels, kernel, conv_stride,
                               name=f'conv_{i}'),
                          norm(f'{norm.tag}_{i}', scale_init=scale_init)))

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    shortcut = x
    if self.use_projection:
      shortcut = self.shortcut_norm(self.shortcut_conv(x), is_training)
    out = x
    for i, (conv, norm) in enumerate(self.layers):
      out = norm(conv(out), is_training)
      if i < len(self.layers) - 1:
        out = jax.nn.relu(out)
    return jax.nn.relu(out + shortcut)


class BlockGroup(hk.Module):
  """A sequence of residual blocks; only the first one strides."""

  def __init__(self,
               width: int,
               num_blocks: int,
               stride: int,
               input_channels: int,
               bottleneck: bool,
               conv: Callable[..., hk.Module],
               norm: NormFactory,
               zero_init_last_scale: bool = False,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.blocks = []
    channels = input_channels
    for i in range(num_blocks):
      block_stride = stride if i == 0 else 1
      output_channels = 4 * width if bottleneck else width
      block = ResidualBlock(
          width=width, stride=block_stride, bottleneck=bottleneck,
          use_projection=(block_stride != 1 or channels != output_channels),
          conv=conv, norm=norm, zero_init_last_scale=zero_init_last_scale,
          name=f'block_{i}')
      self.blocks.append(block)
      channels = output_channels
    self.output_channels = channels

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    for block in self.blocks:
      x = block(x, is_training)
    return x


class ResNet(hk.Module):
  """ResNet v1 encoder with a swappable normalization and optional WS.

  Called as `net(images, is_training)` on NHWC images; returns the embedding
  (global average pool of the last block group), [B, C] float32, with
  C = 512 * width (basic blocks) or 2048 * width (bottleneck), or the logits
  [B, num_classes] when `num_classes` is given.

  Convolutions have no bias (a norm follows each one; with norm='none' they
  simply have none). Submodules are built in the constructor, so parameter
  paths read `res_net50/~/block_group_0/~/block_0/~/conv_0` etc.
  """

  def __init__(self,
               blocks_per_group: Sequence[int],
               bottleneck: bool,
               num_classes: Optional[int] = None,
               norm: str = 'bn',
               weight_standardization: bool = False,
               num_groups: int = 16,
               width_multiplier: float = 1.0,
               stem: str = 'imagenet',
               zero_init_last_scale: bool = False,
               bn_decay: float = 0.9,
               bn_eps: float = 1e-5,
               gn_eps: float = 1e-5,
               ws_eps: float = 1e-10,
               cross_replica_axis: Optional[str] = None,
               dtype: Any = jnp.float32,
               name: Optional[str] = None):
    """Builds the network.

    Args:
      blocks_per_group: number of blocks in each of the 4 groups.
      bottleneck: bottleneck blocks (ResNet-50 and deeper) or basic ones.
      num_classes: when given, a final linear layer `logits` maps the
        embedding to this many logits, which are returned instead.
      norm: normalization kind, one of `NORMS` (see `make_norm`).
      weight_standardization: standardize every conv weight (`WSConv2D`).
      num_groups: groups of GroupNorm (norm='gn').
      width_multiplier: multiplies every layer's channel count (rounded to
        the nearest integer); e.g. 0.25 for tests, 2 or 4 for wide nets.
      stem: `imagenet` (7x7 stride-2 conv, norm, ReLU, 3x3 stride-2 max-pool)
        or `small` (3x3 stride-1 conv, norm, ReLU; for 24-32 px images).
      zero_init_last_scale: initialise the scale of the last norm of each
        residual block to 0, so every block starts as relu(shortcut). Only
        affects norms with a scale (not `none`).
      bn_decay: BatchNorm moving-average decay.
      bn_eps: BatchNorm epsilon.
      gn_eps: GroupNorm / LayerNorm epsilon.
      ws_eps: weight-standardization epsilon (see `WSConv2D`).
      cross_replica_axis: pmap axis name for cross-replica BatchNorm.
      dtype: compute dtype of convolutions (float32 or bfloat16); parameters
        stay float32.
      name: module name (default derived from the class: `res_net50` etc.).

    Raises:
      ValueError: for an impossible configuration.
    """
    super().__init__(name=name)
    if len(blocks_per_group) != 4 or min(blocks_per_group) < 1:
      raise ValueError(f'{self.module_name}: blocks_per_group must be 4 '
                       f'positive counts, got {tuple(blocks_per_group)}')
    if not width_multiplier > 0:
      raise ValueError(f'{self.module_name}: width_multiplier must be '
                       f'positive, got {width_multiplier}')
    if stem not in STEMS:
      raise ValueError(f'{self.module_name}: unknown stem {stem!r}; choose '
                       f'from {", ".join(STEMS)}')

    def scaled(channels, layer):
      out = int(round(channels * width_multiplier))
      if out < 1:
        raise ValueError(f'{self.module_name}/~/{layer}: width_multiplier='
                         f'{width_multiplier} leaves {out} of its {channels} '
                         'channels')
      return out

    self.num_classes = num_classes
    self.stem = stem
    self.dtype = _as_dtype(dtype)
    norm_factory = make_norm(norm, num_groups=num_groups, bn_decay=bn_decay,
                             bn_eps=bn_eps, gn_eps=gn_eps,
                             cross_replica_axis=cross_replica_axis)
    conv = make_conv(weight_standardization, ws_eps=ws_eps, dtype=self.dtype)

    stem_channels = scaled(64, 'initial_conv')
    if stem == 'imagenet':
      self.initial_conv = conv(stem_channels, 7, 2, name='initial_conv')
    else:
      self.initial_conv = conv(stem_channels, 3, 1, name='initial_conv')
    self.initial_norm = norm_factory(f'initial_{norm_factory.tag}')

    self.block_groups = []
    channels = stem_channels
    for i, (num_blocks, stride) in enumerate(zip(blocks_per_group,
                                                 (1, 2, 2, 2))):
      group = BlockGroup(
          width=scaled(64 * 2**i, f'block_group_{i}'), num_blocks=num_blocks,
          stride=stride, input_channels=channels, bottleneck=bottleneck,
          conv=conv, norm=norm_factory,
          zero_init_last_scale=zero_init_last_scale,
          name=f'block_group_{i}')
      self.block_groups.append(group)
      channels = group.output_channels
    self.embedding_size = channels

    if num_classes is not None:
      self.logits = Linear(num_classes, compute_dtype=jnp.float32,
                           name='logits')

  def __call__(self, images: jax.Array, is_training: bool) -> jax.Array:
    out = self.initial_conv(images.astype(self.dtype))
    out = jax.nn.relu(self.initial_norm(out, is_training))
    if self.stem == 'imagenet':
      out = hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1),
                        padding='SAME')
    for group in self.block_groups:
      out = group(out, is_training)
    embedding = jnp.mean(out.astype(jnp.float32), axis=(1, 2))
    if self.num_classes is not None:
      return self.logits(embedding)
    return embedding


class ResNet18(ResNet):
  """ResNet-18: basic blocks (2, 2, 2, 2); keyword arguments as `ResNet`."""

  def __init__(self, num_classes: Optional[int] = None, **kwargs):
    super().__init__(RESNET_DEPTHS[18][0], bottleneck=False,
                     num_classes=num_classes, **kwargs)


class ResNet34(ResNet):
  """ResNet-34: basic blocks (3, 4, 6, 3); keyword arguments as `ResNet`."""

  def __init__(self, num_classes: Optional[int] = None, **kwargs):
    super().__init__(RESNET_DEPTHS[34][0], bottleneck=False,
                     num_classes=num_classes, **kwargs)


class ResNet50(ResNet):
  """ResNet-50: bottleneck blocks (3, 4, 6, 3); keyword arguments as `ResNet`.
  """

  def __init__(self, num_classes: Optional[int] = None, **kwargs):
    super().__init__(RESNET_DEPTHS[50][0], bottleneck=True,
                     num_classes=num_classes, **kwargs)


class ResNet101(ResNet):
  """ResNet-101: bottleneck blocks (3, 4, 23, 3); keyword arguments as
  `ResNet`."""

  def __init__(self, num_classes: Optional[int] = None, **kwargs):
    super().__init__(RESNET_DEPTHS[101][0], bottleneck=True,
                     num_classes=num_classes, **kwargs)


class ResNet152(ResNet):
  """ResNet-152: bottleneck blocks (3, 8, 36, 3); keyword arguments as
  `ResNet`."""

  def __init__(self, num_classes: Optional[int] = None, **kwargs):
    super().__init__(RESNET_DEPTHS[152][0], bottleneck=True,
                     num_classes=num_classes, **kwargs)


class ResNet200(ResNet):
  """ResNet-200: bottleneck blocks (3, 24, 36, 3); keyword arguments as
  `ResNet`."""

  def __init__(self, num_classes: Optional[int] = None, **kwargs):
    super().__init__(RESNET_DEPTHS[200][0], bottleneck=True,
                     num_classes=num_classes, **kwargs)


_RESNET_CLASSES = {18: ResNet18, 34: ResNet34, 50: ResNet50, 101: ResNet101,
                   152: ResNet152, 200: ResNet200}


def resnet(depth: int = 50,
           *,
           blocks_per_group: Sequence[int] = (),
           **kwargs) -> ResNet:
  """Builds the ResNet of a depth; call inside a Haiku transform.

  Takes the encoder config's fields directly (depth, width_multiplier, stem,
  blocks_per_group, zero_init_last_scale, norm, weight_standardization,
  num_groups): `resnet(**config.model.encoder, bn_decay=..., dtype=...)`.

  Args:
    depth: one of 18, 34, 50, 101, 152, 200; picks the block counts and
      whether blocks are bottlenecks.
    blocks_per_group: if non-empty, replaces the depth's block counts (e.g.
      (1, 1, 1, 1) for a tiny test net); the module is then a plain `ResNet`
      named `res_net` unless `name` is given.
    **kwargs: the other `ResNet` arguments.

  Returns:
    The `ResNet` module (e.g. a `ResNet50` named `res_net50`).

  Raises:
    ValueError: for an unknown depth.
  """
  if depth not in RESNET_DEPTHS:
    raise ValueError(f'unknown ResNet depth {depth}; choose from '
                     f'{", ".join(map(str, RESNET_DEPTHS))}')
  if blocks_per_group:
    return ResNet(tuple(blocks_per_group), bottleneck=RESNET_DEPTHS[depth][1],
                  **kwargs)
  return _RESNET_CLASSES[depth](**kwargs)


# MLP heads.


class MLP(hk.Module):
  """Projector / predictor: Linear (bias) -> norm -> ReLU -> Linear (no bias).

  Called as `mlp(x, is_training)` on [B, D]; returns [B, output_size] float32.
  The norm acts on [B, hidden]: BatchNorm over the batch, GroupNorm over
  groups of the hidden units, LayerNorm over all hidden units. Module names,
  as DeepMind BYOL's MLP: `linear`, the norm's tag (e.g. `batchnorm`; theirs
  is `batch_norm`), `linear_1`. With WS both linear layers are standardized.
  """

  def __init__(self,
               hidden_size: int,
               output_size: int,
               norm: str = 'bn',
               weight_standardization: bool = False,
               num_groups: int = 16,
               bn_decay: float = 0.9,
               bn_eps: float = 1e-5,
               gn_eps: float = 1e-5,
               ws_eps: float = 1e-10,
               cross_replica_axis: Optional[str] = None,
               dtype: Any = jnp.float32,
               name: Optional[str] = None):
    """Builds the head; arguments as `ResNet`'s, plus the two layer sizes."""
    super().__init__(name=name)
    self.hidden_size = hidden_size
    self.output_size = output_size
    self.dtype = _as_dtype(dtype)
    self._norm = make_norm(norm, num_groups=num_groups, bn_decay=bn_decay,
                           bn_eps=bn_eps, gn_eps=gn_eps,
                           cross_replica_axis=cross_replica_axis)
    self._linear = make_linear(weight_standardization, ws_eps=ws_eps,
                               dtype=self.dtype)

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    out = self._linear(self.hidden_size, with_bias=True, name='linear')(x)
    out = self._norm(self._norm.tag)(out, is_training)
    out = jax.nn.relu(out)
    out = self._linear(self.output_size, with_bias=False, name='linear_1')(out)
    return out.astype(jnp.float32)
