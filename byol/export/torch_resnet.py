"""A torchvision-layout ResNet v1 that computes byol-gnws' exported encoders.

This file needs only PyTorch (and `safetensors` to read the weights file); it
is copied into every export folder so that it can be used without the rest of
the project:

  import torch_resnet
  model = torch_resnet.load('.')   # encoder.json + encoder.safetensors
  model.fc = torch.nn.Identity()   # the embedding instead of the logits

Parameter names are exactly torchvision's (`conv1`, `bn1`, `layer1.0.conv1`,
`layer1.0.downsample.0`, `fc`, BatchNorm's `weight`, `bias`, `running_mean`,
`running_var`, `num_batches_tracked`), so a ResNet-50's state dict also loads
into `torchvision.models.resnet50(num_classes=...)` (with `norm_layer` for
GroupNorm). Two things differ from torchvision and are the reason this
module exists:

* Padding. The encoder was trained with TensorFlow's SAME padding: a stride-2
  convolution or max-pool on an even-sized input pads one pixel less at the
  top/left than at the bottom/right (e.g. (2, 3) for the 7x7 stem on 224 px,
  (0, 1) for a 3x3 conv), where torchvision pads symmetrically ((3, 3), (1, 1)).
  Loaded into torchvision the weights then see every image shifted by a pixel
  from the second group on: a ResNet-50 ported that way lost several points
  of ImageNet accuracy (deepmind-research issue 84). `Conv2d` and `MaxPool2d`
  below pad explicitly by TensorFlow's rule, computed from each input's size;
  `padding='torchvision'` gives torchvision's rule instead, to measure the
  difference.
* Shortcuts. Every layer's first block has a projection shortcut
  (`downsample`), as in DeepMind's ResNet, also where torchvision's basic-
  block nets (ResNet-18/34) have none: `layer1.0.downsample.{0,1}`. To load a
  basic-block export into torchvision, give `layer1[0]` a `downsample` of a
  1x1 conv and a norm first.

Weight standardization (WS) is a fixed function of a weight at inference, so
an exported WS encoder holds its weights already standardized and computes
with plain convolutions. For fine-tuning with WS pass
`weight_standardization=True` (`from_config(..., fine_tune_ws=True)`): each
conv then standardizes its weight on every call, which leaves the exported
(already standardized) weights unchanged, up to float rounding.
"""

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

PADDINGS = ('tf_same', 'torchvision')
NORMS = ('bn', 'gn', 'ln')
HEAD_NORMS = NORMS + ('none',)

# depth -> (blocks per layer, bottleneck blocks), as torchvision and byol-gnws.
DEPTHS = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
  """TensorFlow's SAME padding (before, after) of one spatial axis.

  The output has ceil(size / stride) positions; the padding needed for that
  is split with the odd pixel after, not before.
  """
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: int, stride: int,
              value: float = 0.) -> torch.Tensor:
  top, bottom = same_padding(x.shape[-2], kernel, stride)
  left, right = same_padding(x.shape[-1], kernel, stride)
  if top == bottom == left == right == 0:
    return x
  return F.pad(x, (left, right, top, bottom), value=value)


class Conv2d(nn.Conv2d):
  """Bias-free `nn.Conv2d` with TensorFlow's or torchvision's padding.

  With `weight_standardization`, the weight is standardized per output
  channel (zero mean, variance over in-channels x kernel, divided by
  sqrt(var + ws_eps)) on every call, as byol-gnws trains it.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel: int,
               stride: int = 1, padding: str = 'tf_same',
               weight_standardization: bool = False, ws_eps: float = 1e-10):
    if padding not in PADDINGS:
      raise ValueError(f'padding must be one of {PADDINGS}, got {padding!r}')
    super().__init__(in_channels, out_channels, kernel, stride,
                     padding=0 if padding == 'tf_same' else kernel // 2,
                     bias=False)
    self.padding_rule = padding
    self.weight_standardization = weight_standardization
    self.ws_eps = ws_eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if self.weight_standardization:
      var, mean = torch.var_mean(w, dim=(1, 2, 3), unbiased=False,
                                 keepdim=True)
      w = (w - mean) * torch.rsqrt(var + self.ws_eps)
    if self.padding_rule == 'tf_same':
      x = _pad_same(x, self.kernel_size[0], self.stride[0])
    return self._conv_forward(x, w, None)


class MaxPool2d(nn.Module):
  """3x3 stride-2 max-pool; TensorFlow's SAME pads with -inf (never chosen)."""

  def __init__(self, padding: str = 'tf_same'):
    super().__init__()
    self.padding_rule = padding

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.padding_rule == 'tf_same':
      return F.max_pool2d(_pad_same(x, 3, 2, value=float('-inf')), 3, 2)
    return F.max_pool2d(x, 3, 2, padding=1)


def make_norm(kind: str, channels: int, *, num_groups: int = 16,
              eps: float = 1e-5, bn_momentum: float = 0.1,
              dims: int = 2) -> nn.Module:
  """The torch layer of byol-gnws' normalization `kind`.

  `bn`: BatchNorm (2d or 1d); `gn`: GroupNorm; `ln` (byol-gnws' LayerNorm
  over every non-batch axis with a per-channel affine): GroupNorm with one
  group; `none` (heads only): identity.
  """
  if kind == 'bn':
    cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return cls(channels, eps=eps, momentum=bn_momentum)
  if kind == 'gn':
    return nn.GroupNorm(num_groups, channels, eps=eps)
  if kind == 'ln':
    return nn.GroupNorm(1, channels, eps=eps)
  if kind == 'none':
    return nn.Identity()
  raise ValueError(f'unknown norm {kind!r}; choose from {HEAD_NORMS}')


class BasicBlock(nn.Module):
  """3x3 (stride) -> 3x3, norm after each; torchvision's names."""
  expansion = 1

  def __init__(self, in_channels, width, stride, downsample, conv, norm):
    super().__init__()
    self.conv1 = conv(in_channels, width, 3, stride)
    self.bn1 = norm(width)
    self.conv2 = conv(width, width, 3, 1)
    self.bn2 = norm(width)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    shortcut = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + shortcut)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride) -> 1x1 (4x width); torchvision's (v1.5) names."""
  expansion = 4

  def __init__(self, in_channels, width, stride, downsample, conv, norm):
    super().__init__()
    self.conv1 = conv(in_channels, width, 1, 1)
    self.bn1 = norm(width)
    self.conv2 = conv(width, width, 3, stride)
    self.bn2 = norm(width)
    self.conv3 = conv(width, width * 4, 1, 1)
    self.bn3 = norm(width * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    shortcut = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + shortcut)


class ResNet(nn.Module):
  """ResNet v1 with torchvision's module names; byol-gnws' architecture.

  `forward` returns `fc(embedding)`: the exported online classifier's logits,
  or the embedding itself once `fc` is `nn.Identity()` (torchvision's idiom).
  `embed` returns the embedding whatever `fc` is.
  """

  def __init__(self,
               blocks_per_layer: Sequence[int] = (3, 4, 6, 3),
               bottleneck: bool = True,
               *,
               width_multiplier: float = 1.0,
               stem: str = 'imagenet',
               norm: str = 'bn',
               num_groups: int = 16,
               eps: float = 1e-5,
               bn_momentum: float = 0.1,
               padding: str = 'tf_same',
               num_classes: Optional[int] = 1000,
               weight_standardization: bool = False,
               ws_eps: float = 1e-10):
    super().__init__()
    if norm not in NORMS:
      raise ValueError(f'unknown encoder norm {norm!r}; choose from {NORMS}')
    if stem not in ('imagenet', 'small'):
      raise ValueError(f'unknown stem {stem!r}: imagenet or small')

    def conv(cin, cout, kernel, stride):
      return Conv2d(cin, cout, kernel, stride, padding,
                    weight_standardization, ws_eps)

    def norm_layer(channels):
      return make_norm(norm, channels, num_groups=num_groups, eps=eps,
                       bn_momentum=bn_momentum)

    def scaled(channels):
      return max(1, int(round(channels * width_multiplier)))

    block = Bottleneck if bottleneck else BasicBlock
    channels = scaled(64)
    if stem == 'imagenet':
      self.conv1 = conv(3, channels, 7, 2)
      self.maxpool = MaxPool2d(padding)
    else:  # 3x3 stride-1 conv, no pool: for 24-32 px images.
      self.conv1 = conv(3, channels, 3, 1)
      self.maxpool = nn.Identity()
    self.bn1 = norm_layer(channels)
    self.relu = nn.ReLU(inplace=True)
    for i, num_blocks in enumerate(blocks_per_layer):
      width = scaled(64 * 2**i)
      blocks = []
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        downsample = None
        if j == 0:  # byol-gnws (and DeepMind): a projection in every layer.
          downsample = nn.Sequential(
              conv(channels, width * block.expansion, 1, stride),
              norm_layer(width * block.expansion))
        blocks.append(block(channels, width, stride, downsample, conv,
                            norm_layer))
        channels = width * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.num_layers = len(blocks_per_layer)
    self.embedding_size = channels
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = (nn.Linear(channels, num_classes) if num_classes
               else nn.Identity())

  def embed(self, x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] normalised images -> [B, D] embedding."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(self.num_layers):
      x = getattr(self, f'layer{i + 1}')(x)
    return torch.flatten(self.avgpool(x), 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc(self.embed(x))


def mlp(in_features: int, hidden_size: int, output_size: int, *,
        norm: str = 'bn', num_groups: int = 16, eps: float = 1e-5,
        bn_momentum: float = 0.1) -> nn.Sequential:
  """byol-gnws' projector/predictor: Linear -> norm -> ReLU -> Linear (no bias).

  Keys `0.weight`, `0.bias`, `1.*` (the norm), `3.weight`. Weights of a WS
  head are exported standardized, as the encoder's.
  """
  return nn.Sequential(
      nn.Linear(in_features, hidden_size),
      make_norm(norm, hidden_size, num_groups=num_groups, eps=eps,
                bn_momentum=bn_momentum, dims=1),
      nn.ReLU(inplace=True),
      nn.Linear(hidden_size, output_size, bias=False))


def _read_config(config: Union[str, Dict[str, Any]]) -> Dict[str, Any]:
  if isinstance(config, dict):
    return config
  with open(config, encoding='utf-8') as f:
    return json.load(f)


def from_config(config: Union[str, Dict[str, Any]], *,
                padding: Optional[str] = None,
                fine_tune_ws: bool = False) -> ResNet:
  """The (untrained) module an `encoder.json` describes.

  Args:
    config: the path of encoder.json, or its parsed content.
    padding: override the file's padding rule (`torchvision` only to measure
      what symmetric padding changes).
    fine_tune_ws: standardize conv weights on every call (for fine-tuning a
      WS encoder; no effect on the exported weights' outputs).
  """
  c = _read_config(config)
  return ResNet(
      c['blocks_per_group'], c['bottleneck'],
      width_multiplier=c['width_multiplier'], stem=c['stem'], norm=c['norm'],
      num_groups=c['num_groups'], eps=c['eps'], bn_momentum=c['bn_momentum'],
      padding=padding or c['padding'], num_classes=c['num_classes'],
      weight_standardization=fine_tune_ws and
      c['weight_standardization']['trained_with'],
      ws_eps=c['weight_standardization']['eps'])


def heads_from_config(config: Union[str, Dict[str, Any]]) -> nn.ModuleDict:
  """The projector (and predictor) an `encoder.json` with heads describes."""
  c = _read_config(config)
  if not c.get('heads'):
    raise ValueError('this export has no heads (export with --heads)')
  return nn.ModuleDict({
      name: mlp(h['in_features'], h['hidden_size'], h['output_size'],
                norm=h['norm'], num_groups=h['num_groups'], eps=h['eps'],
                bn_momentum=c['bn_momentum'])
      for name, h in c['heads'].items()})


def load(folder: str, **kwargs) -> ResNet:
  """`from_config(folder/encoder.json)` with folder/encoder.safetensors loaded
  (strictly), in evaluation mode. Keyword arguments go to `from_config`."""
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  model = from_config(os.path.join(folder, 'encoder.json'), **kwargs)
  model.load_state_dict(load_file(os.path.join(folder, 'encoder.safetensors')))
  return model.eval()


def load_heads(folder: str) -> nn.ModuleDict:
  """The heads of folder/heads.safetensors, in evaluation mode."""
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
  heads = heads_from_config(os.path.join(folder, 'encoder.json'))
  heads.load_state_dict(load_file(os.path.join(folder, 'heads.safetensors')))
  return heads.eval()
