"""Encoders (ResNet v1) and MLP heads with swappable normalization and WS.

Every network here is a Haiku module called as `net(x, is_training)` inside
`hk.transform_with_state`. Its normalization (`bn`, `gn`, `ln`, `affine`,
`none`) and whether its convolution and linear weights are standardized are
chosen once, by the factories of `byol/layers.py`, and passed down to the
blocks as callables. The depths are data: `RESNET_DEPTHS` gives each of
`ResNet18` ... `ResNet200` its block counts.

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

from typing import Any, Callable, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from byol import layers

STEMS = ('imagenet', 'small')

# depth -> (blocks per group, bottleneck blocks).
RESNET_DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}


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
               norm: layers.NormFactory,
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
               norm: layers.NormFactory,
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
          # As DeepMind's ResNet: the first block of every group has a
          # projection shortcut, also where shapes would allow the identity
          # (block_group_0 of ResNet-18/34), so their checkpoints map 1:1.
          use_projection=(i == 0),
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
               fast_conv: bool = False,
               conv_impl: str = '',
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
      norm: normalization kind, one of `layers.NORMS` (see
        `layers.make_norm`).
      weight_standardization: standardize every conv weight (`WSConv2D`).
      num_groups: groups of GroupNorm (norm='gn').
      width_multiplier: multiplies every layer's channel count (rounded to
        the nearest integer); e.g. 0.25 for tests, 2 or 4 for wide nets.
      stem: `imagenet` (7x7 stride-2 conv, norm, ReLU, 3x3 stride-2 max-pool)
        or `small` (3x3 stride-1 conv, norm, ReLU; for 24-32 px images).
      zero_init_last_scale: initialise the scale of the last norm of each
        residual block to 0, so every block starts as relu(shortcut). Only
        affects norms with a scale (not `none`).
      fast_conv: convolve with `byol.fast_conv.conv2d`: the same function and
        gradients (to float32 rounding), with a backward pass that XLA:CPU
        runs faster (docs/performance.md).
      conv_impl: how convolutions are computed, one of `layers.CONV_IMPLS`
        (`lax`, `fast_conv`, `onednn`: oneDNN's kernels on XLA:CPU); ''
        follows `fast_conv`.
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
    self._check(blocks_per_group, width_multiplier, stem)
    self.num_classes = num_classes
    self.stem = stem
    self.dtype = layers.as_dtype(dtype)
    self.width_multiplier = width_multiplier
    norm_factory = layers.make_norm(
        norm, num_groups=num_groups, bn_decay=bn_decay, bn_eps=bn_eps,
        gn_eps=gn_eps, cross_replica_axis=cross_replica_axis)
    conv = layers.make_conv(
        weight_standardization, ws_eps=ws_eps, dtype=self.dtype,
        impl=layers.conv_impl(conv_impl, fast_conv, self.dtype))

    stem_channels = self._scaled(64, 'initial_conv')
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
          width=self._scaled(64 * 2**i, f'block_group_{i}'),
          num_blocks=num_blocks, stride=stride, input_channels=channels,
          bottleneck=bottleneck, conv=conv, norm=norm_factory,
          zero_init_last_scale=zero_init_last_scale,
          name=f'block_group_{i}')
      self.block_groups.append(group)
      channels = group.output_channels
    self.embedding_size = channels

    if num_classes is not None:
      self.logits = layers.Linear(num_classes, compute_dtype=jnp.float32,
                                  name='logits')

  def _check(self, blocks_per_group, width_multiplier, stem) -> None:
    if len(blocks_per_group) != 4 or min(blocks_per_group) < 1:
      raise ValueError(f'{self.module_name}: blocks_per_group must be 4 '
                       f'positive counts, got {tuple(blocks_per_group)}')
    if not width_multiplier > 0:
      raise ValueError(f'{self.module_name}: width_multiplier must be '
                       f'positive, got {width_multiplier}')
    if stem not in STEMS:
      raise ValueError(f'{self.module_name}: unknown stem {stem!r}; choose '
                       f'from {", ".join(STEMS)}')

  def _scaled(self, channels: int, layer: str) -> int:
    """`channels` x the width multiplier, rounded; at least 1 or an error."""
    out = int(round(channels * self.width_multiplier))
    if out < 1:
      raise ValueError(f'{self.module_name}/~/{layer}: width_multiplier='
                       f'{self.width_multiplier} leaves {out} of its '
                       f'{channels} channels')
    return out

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


def _resnet_of_depth(depth: int) -> type:
  """The `ResNet` subclass of a depth in `RESNET_DEPTHS`, named `ResNet<depth>`.

  A class rather than a partial so that Haiku names its modules after it
  (`res_net50/~/...`, DeepMind's checkpoint layout) and `isinstance` works.
  """
  blocks_per_group, bottleneck = RESNET_DEPTHS[depth]

  def __init__(self, num_classes: Optional[int] = None, **kwargs):
    ResNet.__init__(self, blocks_per_group, bottleneck=bottleneck,
                    num_classes=num_classes, **kwargs)

  kind = 'bottleneck' if bottleneck else 'basic'
  return type(f'ResNet{depth}', (ResNet,), {
      '__init__': __init__,
      '__module__': __name__,
      '__doc__': f'ResNet-{depth}: {kind} blocks {blocks_per_group}; '
                 'keyword arguments as `ResNet`.',
  })


ResNet18 = _resnet_of_depth(18)
ResNet34 = _resnet_of_depth(34)
ResNet50 = _resnet_of_depth(50)
ResNet101 = _resnet_of_depth(101)
ResNet152 = _resnet_of_depth(152)
ResNet200 = _resnet_of_depth(200)
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


class MLP(hk.Module):
  """Projector / predictor: Linear (bias) -> norm -> ReLU -> Linear (no bias).

  Called as `mlp(x, is_training)` on [B, D]; returns [B, output_size] float32.
  The norm acts on [B, hidden]: BatchNorm over the batch, GroupNorm over
  groups of the hidden units, LayerNorm over all hidden units. Module names,
  as DeepMind BYOL's MLP: `linear`, `batch_norm` (other norms: their tag,
  e.g. `groupnorm`), `linear_1`. With WS both linear layers are standardized.
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
    for field, size in (('hidden_size', hidden_size),
                        ('output_size', output_size)):
      if size <= 0:
        raise ValueError(f'{self.module_name}: {field} must be positive, got '
                         f'{size}')
    self.hidden_size = hidden_size
    self.output_size = output_size
    self.dtype = layers.as_dtype(dtype)
    self._norm = layers.make_norm(
        norm, num_groups=num_groups, bn_decay=bn_decay, bn_eps=bn_eps,
        gn_eps=gn_eps, cross_replica_axis=cross_replica_axis)
    self._linear = layers.make_linear(weight_standardization, ws_eps=ws_eps,
                                      dtype=self.dtype)
    # DeepMind's MLP calls its BatchNorm `batch_norm` (the ResNet's are
    # `batchnorm_<i>`); the same name lets their checkpoints load as they are.
    self.norm_name = 'batch_norm' if norm == 'bn' else self._norm.tag

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    out = self._linear(self.hidden_size, with_bias=True, name='linear')(x)
    out = self._norm(self.norm_name)(out, is_training)
    out = jax.nn.relu(out)
    out = self._linear(self.output_size, with_bias=False, name='linear_1')(out)
    return out.astype(jnp.float32)
