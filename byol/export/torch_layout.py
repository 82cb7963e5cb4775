"""Haiku encoder parameters -> a torchvision-layout state dict (NumPy only).

The renaming is the community converter's rule for DeepMind's ResNets,
applied to every normalization this project can convert:

  <net>/~/initial_conv                              conv1
  <net>/~/initial_<norm>                            bn1
  <net>/~/block_group_<i>/~/block_<j>/~/conv_<k>    layer<i+1>.<j>.conv<k+1>
  <net>/~/block_group_<i>/~/block_<j>/~/<norm>_<k>  layer<i+1>.<j>.bn<k+1>
  .../block_<j>/~/shortcut_conv                     layer<i+1>.<j>.downsample.0
  .../block_<j>/~/shortcut_<norm>                   layer<i+1>.<j>.downsample.1
  classifier (the online classifier)                fc

Convolution kernels go from Haiku's HWIO to torch's OIHW, linear weights
from [in, out] to [out, in]. A norm's `scale`/`offset` become `weight`/
`bias`; BatchNorm's moving averages (Haiku's zero-debiased `average`)
become `running_mean`/`running_var`, its update counter
`num_batches_tracked`. WS weights are written standardized (in float64,
with the config's `ws_eps` added to the variance), because WS is a fixed
function of the weight at inference.

Normalizations: `bn` -> BatchNorm2d, `gn` -> GroupNorm(num_groups), `ln`
(byol-gnws' LayerNorm: statistics over H, W and C, per-channel affine) ->
GroupNorm(1). `affine` (the BN-init protocol's per-channel scale and offset)
and `none` have no torchvision layer and are refused (`UnsupportedNorm`):
a BatchNorm2d with frozen statistics would compute `affine` in evaluation
mode but switch to batch statistics in training mode, and `none` has no
`bn1` to load. Their SavedModel export works.
"""

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_collections
import numpy as np

from byol import dataset as dataset_lib
from byol.errors import UserError

NORM_TAGS = {'bn': 'batchnorm', 'gn': 'groupnorm', 'ln': 'layernorm'}
HEAD_NORM_TAGS = {'bn': 'batch_norm', 'gn': 'groupnorm', 'ln': 'layernorm',
                  'none': None}

# Total stride of each stem's encoder (the SavedModel's input must be a
# multiple of it): stem x max-pool x three stride-2 groups.
TOTAL_STRIDE = {'imagenet': 32, 'small': 8}


class UnsupportedNorm(UserError):
  """A normalization that no torch layer of torchvision's layout computes."""


def check_convertible(config: ml_collections.ConfigDict,
                      heads: bool = False) -> None:
  """Raises `UnsupportedNorm` unless the network has torch equivalents."""
  norm = config.model.encoder.norm
  if norm not in NORM_TAGS:
    what = {'affine': 'the BN-init protocol\'s per-channel scale and offset, '
                      'which a BatchNorm2d would replace by batch statistics '
                      'in training mode',
            'none': 'no normalization, so no bn1/bn2 modules to load'}.get(
                norm, 'unknown')
    raise UnsupportedNorm(
        f'the encoder\'s norm {norm!r} ({what}) has no torchvision-layout '
        'torch layer; the torch export supports bn (BatchNorm2d), gn and ln '
        '(GroupNorm); use --format=savedmodel for this encoder')
  if heads:
    for part in _head_parts(config):
      if config.model[part].norm not in HEAD_NORM_TAGS:
        raise UnsupportedNorm(
            f'the {part}\'s norm {config.model[part].norm!r} has no torch '
            'layer; export without --heads, or with --format=savedmodel')


def _head_parts(config):
  return ('projector', 'predictor') if config.method == 'byol' else (
      'projector',)


def encoder_prefix(params: Mapping[str, Any]) -> str:
  """The encoder's root module name (`res_net50`, `res_net`, ...)."""
  roots = {m.split('/~/')[0] for m in params if m.endswith('/~/initial_conv')}
  if len(roots) != 1:
    raise ValueError(f'expected one ResNet in the parameters, found '
                     f'{sorted(roots) or "none"}')
  return roots.pop()


def _conv(w, ws_eps: Optional[float]) -> np.ndarray:
  w = np.asarray(w, np.float64)
  if ws_eps is not None:
    mean = w.mean(axis=(0, 1, 2), keepdims=True)
    var = w.var(axis=(0, 1, 2), keepdims=True)
    w = (w - mean) / np.sqrt(var + ws_eps)
  return np.ascontiguousarray(w.transpose(3, 2, 0, 1).astype(np.float32))


def _linear(w, ws_eps: Optional[float]) -> np.ndarray:
  w = np.asarray(w, np.float64)
  if ws_eps is not None:
    w = (w - w.mean(axis=0, keepdims=True)) / np.sqrt(
        w.var(axis=0, keepdims=True) + ws_eps)
  return np.ascontiguousarray(w.T.astype(np.float32))


def _norm(kind, module, params, state, out, key) -> None:
  """`module`'s norm parameters (and BN averages) as torch's, at `key`."""
  p = params[module]
  out[f'{key}.weight'] = np.asarray(p['scale'], np.float32).reshape(-1)
  out[f'{key}.bias'] = np.asarray(p['offset'], np.float32).reshape(-1)
  if kind == 'bn':
    mean, var = state[f'{module}/~/mean_ema'], state[f'{module}/~/var_ema']
    out[f'{key}.running_mean'] = np.asarray(mean['average'],
                                            np.float32).reshape(-1)
    out[f'{key}.running_var'] = np.asarray(var['average'],
                                           np.float32).reshape(-1)
    out[f'{key}.num_batches_tracked'] = np.asarray(mean['counter'], np.int64)


def encoder_state_dict(config: ml_collections.ConfigDict,
                       params: Mapping[str, Mapping[str, Any]],
                       state: Mapping[str, Mapping[str, Any]]
                       ) -> Dict[str, np.ndarray]:
  """The encoder and online classifier as a torchvision state dict.

  Args:
    config: the pretraining config (its `model.encoder`, epsilons).
    params: the network's Haiku parameters (encoder, heads, classifier).
    state: its Haiku state (BatchNorm's moving averages).

  Returns:
    {torchvision name: float32 array (int64 for `num_batches_tracked`)}.

  Raises:
    UnsupportedNorm: see `check_convertible`.
  """
  check_convertible(config)
  enc = config.model.encoder
  kind, tag = enc.norm, NORM_TAGS[enc.norm]
  ws_eps = config.model.ws_eps if enc.weight_standardization else None
  root = encoder_prefix(params)
  block_re = re.compile(
      rf'^block_group_(\d+)/~/block_(\d+)/~/(conv|{tag}|shortcut_conv|'
      rf'shortcut_{tag})(?:_(\d+))?$')
  out = {}
  for module in sorted(params):
    if not module.startswith(root + '/~/'):
      continue
    name = module[len(root) + 3:]
    if name == 'initial_conv':
      out['conv1.weight'] = _conv(params[module]['w'], ws_eps)
      continue
    if name == f'initial_{tag}':
      _norm(kind, module, params, state, out, 'bn1')
      continue
    m = block_re.match(name)
    if not m:
      raise ValueError(f'{module}: no torchvision name for this module')
    group, block, what, k = m.groups()
    prefix = f'layer{int(group) + 1}.{block}'
    if what == 'conv':
      out[f'{prefix}.conv{int(k) + 1}.weight'] = _conv(params[module]['w'],
                                                       ws_eps)
    elif what == 'shortcut_conv':
      out[f'{prefix}.downsample.0.weight'] = _conv(params[module]['w'],
                                                   ws_eps)
    elif what == tag:
      _norm(kind, module, params, state, out, f'{prefix}.bn{int(k) + 1}')
    else:
      _norm(kind, module, params, state, out, f'{prefix}.downsample.1')
  classifier = params['classifier']
  out['fc.weight'] = _linear(classifier['w'], None)
  out['fc.bias'] = np.asarray(classifier['b'], np.float32)
  return out


def heads_state_dict(config: ml_collections.ConfigDict,
                     params: Mapping[str, Mapping[str, Any]],
                     state: Mapping[str, Mapping[str, Any]]
                     ) -> Dict[str, np.ndarray]:
  """The projector (and BYOL's predictor) as `torch_resnet.mlp` state dicts,
  keys `projector.0.weight` etc."""
  check_convertible(config, heads=True)
  out = {}
  for part in _head_parts(config):
    head = config.model[part]
    ws_eps = config.model.ws_eps if head.weight_standardization else None
    out[f'{part}.0.weight'] = _linear(params[f'{part}/linear']['w'], ws_eps)
    out[f'{part}.0.bias'] = np.asarray(params[f'{part}/linear']['b'],
                                       np.float32)
    tag = HEAD_NORM_TAGS[head.norm]
    if tag is not None:
      _norm(head.norm, f'{part}/{tag}', params, state, out, f'{part}.1')
    out[f'{part}.3.weight'] = _linear(params[f'{part}/linear_1']['w'], ws_eps)
  return out


def encoder_json(config: ml_collections.ConfigDict, num_classes: int,
                 embedding_size: int, heads: bool,
                 source: Dict[str, Any]) -> Dict[str, Any]:
  """What `torch_resnet.from_config` needs to build the module, and more."""
  from byol import networks  # pylint: disable=g-import-not-at-top
  enc = config.model.encoder
  blocks, bottleneck = networks.RESNET_DEPTHS[enc.depth]
  blocks = tuple(enc.blocks_per_group) or blocks
  eps = config.model.bn_eps if enc.norm == 'bn' else config.model.gn_eps
  mean, std = dataset_lib.data_normalization(config.data)
  c = {
      'format': 'byol-gnws torchvision-layout ResNet v1',
      'depth': enc.depth,
      'blocks_per_group': list(blocks),
      'bottleneck': bottleneck,
      'width_multiplier': enc.width_multiplier,
      'stem': enc.stem,
      'norm': enc.norm,
      # None: no torch layer (`affine`, `none`: SavedModel only).
      'torch_norm': {'bn': 'BatchNorm2d', 'gn': f'GroupNorm({enc.num_groups})',
                     'ln': 'GroupNorm(1)'}.get(enc.norm),
      'num_groups': enc.num_groups if enc.norm == 'gn' else 1,
      'eps': eps,
      'bn_momentum': round(1.0 - config.model.bn_decay, 10),
      'weight_standardization': {
          'trained_with': bool(enc.weight_standardization),
          'pre_standardized': bool(enc.weight_standardization),
          'eps': config.model.ws_eps,
          'rule': '(w - mean) / sqrt(var + eps) per output channel over '
                  'in-channels x kernel (biased variance)',
      },
      'padding': 'tf_same',
      'padding_rule': 'TensorFlow SAME: pad (total // 2, total - total // 2) '
                      'with total = max((ceil(n / s) - 1) * s + k - n, 0); '
                      'max-pool pads with -inf',
      'projection_shortcut': 'the first block of every layer has downsample',
      'num_classes': num_classes,
      'fc': 'the online classifier (linear, on the stop-gradient embedding)',
      'embedding_size': embedding_size,
      'input': {
          'layout': 'NCHW float32 RGB',
          'preprocessing': 'pixels in [0, 1], then (x - mean) / std per '
                           'channel; centre crop and resize to image_size',
          'mean': [float(x) for x in mean],
          'std': [float(x) for x in std],
          'image_size': config.data.image_size,
      },
      'source': source,
  }
  if heads:
    c['heads'] = {}
    in_features = embedding_size
    for part in _head_parts(config):
      h = config.model[part]
      c['heads'][part] = {
          'in_features': in_features, 'hidden_size': h.hidden_size,
          'output_size': h.output_size, 'norm': h.norm,
          'num_groups': h.num_groups if h.norm == 'gn' else 1,
          'eps': config.model.bn_eps if h.norm == 'bn' else config.model.gn_eps,
          'weight_standardization': bool(h.weight_standardization)}
      in_features = h.output_size
  return c


def torchvision_layout(blocks_per_layer: Tuple[int, ...], bottleneck: bool,
                       num_classes: int = 1000, width: int = 64,
                       norm: str = 'bn', basic_layer1_downsample: bool = True
                       ) -> Dict[str, Tuple[int, ...]]:
  """torchvision's ResNet state-dict names and shapes, from its naming rules.

  Derived without torchvision (which cannot be installed beside the pinned
  torch): `conv1`/`bn1`, `layer<i>.<j>.conv<k>`/`bn<k>` (k = 1..3 for
  bottlenecks, 1..2 for basic blocks, stride on the 3x3 conv),
  `layer<i>.0.downsample.{0,1}` where the block changes shape (every layer's
  first block of a bottleneck net; layers 2-4 of a basic one), `fc`.
  BatchNorm has weight, bias, running_mean, running_var and
  num_batches_tracked (a scalar); GroupNorm has weight and bias.

  Args:
    blocks_per_layer: e.g. (3, 4, 6, 3) for resnet50.
    bottleneck: bottleneck (expansion 4) or basic blocks.
    num_classes: fc's outputs.
    width: channels of conv1.
    norm: `bn` or `gn`.
    basic_layer1_downsample: add `layer1.0.downsample` to a basic-block net
      (byol-gnws' layout; torchvision's resnet18/34 have none).
  """
  out = {}

  def add_norm(key, c):
    out[f'{key}.weight'] = (c,)
    out[f'{key}.bias'] = (c,)
    if norm == 'bn':
      out[f'{key}.running_mean'] = (c,)
      out[f'{key}.running_var'] = (c,)
      out[f'{key}.num_batches_tracked'] = ()

  expansion = 4 if bottleneck else 1
  out['conv1.weight'] = (width, 3, 7, 7)
  add_norm('bn1', width)
  cin = width
  for i, n in enumerate(blocks_per_layer):
    w = width * 2**i
    for j in range(n):
      p = f'layer{i + 1}.{j}'
      if bottleneck:
        convs = [(w, cin, 1), (w, w, 3), (w * 4, w, 1)]
      else:
        convs = [(w, cin, 3), (w, w, 3)]
      for k, (o, c, kk) in enumerate(convs):
        out[f'{p}.conv{k + 1}.weight'] = (o, c, kk, kk)
        add_norm(f'{p}.bn{k + 1}', o)
      if j == 0 and (i > 0 or bottleneck or basic_layer1_downsample):
        out[f'{p}.downsample.0.weight'] = (w * expansion, cin, 1, 1)
        add_norm(f'{p}.downsample.1', w * expansion)
      cin = w * expansion
  out['fc.weight'] = (num_classes, cin)
  out['fc.bias'] = (num_classes,)
  return out
