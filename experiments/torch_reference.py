r"""The `local` BYOL step in PyTorch: a speed reference, not part of the code.

The same network and update as the project's `configs/byol.py:local` step, so
that `experiments/benchmark.py --torch_python=...` can time both side by side:

* encoder: small-stem ResNet (3x3 stride-1 conv, norm, ReLU), basic blocks
  (1, 1, 1, 1) of widths 16, 32, 64, 128 (ResNet-18 x 0.25), a projection
  shortcut where the stride or width changes, global average pool;
* projector and predictor: Linear(bias) -> norm -> ReLU -> Linear(no bias),
  256 -> 64; a linear classifier on the detached embedding;
* `gn+ws`: GroupNorm(8) everywhere, every conv and linear weight
  standardized (zero mean, unit variance over its fan-in, eps 1e-10 on the
  variance); both views in one pass of 2B images. `bn`: BatchNorm (momentum
  0.1, eps 1e-5), no WS, one view at a time, as BYOL needs;
* the step: online forward and backward on both views, target forward on both
  views (encoder and projector, no gradient), the symmetrised BYOL loss plus
  the classifier's cross-entropy, LARS (weight decay and trust ratio on
  weights, not on biases or norm parameters; momentum 0.9, the learning rate
  applied after momentum), then the target's EMA;
* channels-last tensors, float32.

The views are fixed random tensors: the augmentations are not part of it (the
JAX step also augments on the device; see docs/performance.md).

It runs with a Python that has PyTorch (and NumPy); it never imports JAX.

  python experiments/torch_reference.py --norm=gn+ws --steps=10
  python experiments/torch_reference.py --serve --norm=bn   # used by benchmark

With `--serve` it builds and warms up the step, prints one JSON line
`{"ready": ...}`, then for each line `N` read on stdin times N steps and
prints `{"times": [...]}` (seconds per step); an empty line or EOF ends it.
"""

import argparse
import json
import math
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F

WS_EPS = 1e-10
WEIGHT_DECAY = 1e-6
ETA = 1e-3
MOMENTUM = 0.9
LEARNING_RATE = 1.0
TAU = 0.99


def standardize(w, eps=WS_EPS):
  """Zero mean, unit variance over every axis but the first (the outputs)."""
  dims = tuple(range(1, w.ndim))
  var, mean = torch.var_mean(w, dim=dims, keepdim=True, unbiased=False)
  return (w - mean) * torch.rsqrt(var + eps)


class Conv(nn.Conv2d):
  """Conv2d without bias, 'SAME' padding, optionally weight-standardized."""

  def __init__(self, cin, cout, kernel, stride, ws):
    # For odd kernels, stride 1 or 2 and even inputs, TF's SAME pads
    # (k - s) // 2 before; PyTorch pads symmetrically, so pad by hand.
    super().__init__(cin, cout, kernel, stride, padding=0, bias=False)
    self.ws = ws
    total = max(kernel - stride, 0)
    self.pads = (total // 2, total - total // 2) * 2
    nn.init.trunc_normal_(self.weight, std=1 / math.sqrt(cin * kernel ** 2),
                          a=-2 / math.sqrt(cin * kernel ** 2),
                          b=2 / math.sqrt(cin * kernel ** 2))

  def forward(self, x):
    w = standardize(self.weight) if self.ws else self.weight
    if any(self.pads):
      x = F.pad(x, self.pads)
    return F.conv2d(x, w, None, self.stride)


class Linear(nn.Linear):
  """nn.Linear, optionally weight-standardized over its inputs."""

  def __init__(self, cin, cout, bias, ws):
    super().__init__(cin, cout, bias=bias)
    self.ws = ws

  def forward(self, x):
    w = standardize(self.weight) if self.ws else self.weight
    return F.linear(x, w, self.bias)


def make_norm(kind, channels):
  if kind == 'bn':
    return nn.BatchNorm2d(channels, momentum=0.1, eps=1e-5)
  return nn.GroupNorm(8, channels, eps=1e-5)


def make_norm1d(kind, channels):
  if kind == 'bn':
    return nn.BatchNorm1d(channels, momentum=0.1, eps=1e-5)
  return nn.GroupNorm(8, channels, eps=1e-5)


class Block(nn.Module):
  """ResNet v1 basic block: 3x3 (stride) -> 3x3, shortcut projection."""

  def __init__(self, cin, cout, stride, norm, ws):
    super().__init__()
    self.conv_0 = Conv(cin, cout, 3, stride, ws)
    self.norm_0 = make_norm(norm, cout)
    self.conv_1 = Conv(cout, cout, 3, 1, ws)
    self.norm_1 = make_norm(norm, cout)
    self.project = stride != 1 or cin != cout
    if self.project:
      self.shortcut_conv = Conv(cin, cout, 1, stride, ws)
      self.shortcut_norm = make_norm(norm, cout)

  def forward(self, x):
    shortcut = x
    if self.project:
      shortcut = self.shortcut_norm(self.shortcut_conv(x))
    out = F.relu(self.norm_0(self.conv_0(x)))
    out = self.norm_1(self.conv_1(out))
    return F.relu(out + shortcut)


class MLP(nn.Module):

  def __init__(self, cin, hidden, cout, norm, ws):
    super().__init__()
    self.linear = Linear(cin, hidden, True, ws)
    self.norm = make_norm1d(norm, hidden)
    self.linear_1 = Linear(hidden, cout, False, ws)

  def forward(self, x):
    return self.linear_1(F.relu(self.norm(self.linear(x))))


class Network(nn.Module):
  """Encoder -> projector -> predictor, and the online classifier."""

  def __init__(self, norm, ws, widths=(16, 32, 64, 128), num_classes=10):
    super().__init__()
    self.initial_conv = Conv(3, widths[0], 3, 1, ws)
    self.initial_norm = make_norm(norm, widths[0])
    blocks, cin = [], widths[0]
    for width, stride in zip(widths, (1, 2, 2, 2)):
      blocks.append(Block(cin, width, stride, norm, ws))
      cin = width
    self.blocks = nn.Sequential(*blocks)
    self.projector = MLP(cin, 256, 64, norm, ws)
    self.predictor = MLP(64, 256, 64, norm, ws)
    self.classifier = nn.Linear(cin, num_classes)

  def forward(self, x, predict=True):
    out = F.relu(self.initial_norm(self.initial_conv(x)))
    embedding = self.blocks(out).mean(dim=(2, 3))
    projection = self.projector(embedding)
    if not predict:
      return projection
    return (self.predictor(projection), projection,
            self.classifier(embedding.detach()))


def regression_loss(x, y):
  x = F.normalize(x, dim=-1, eps=1e-6)
  y = F.normalize(y, dim=-1, eps=1e-6)
  return (x - y).square().sum(-1)


class Step:
  """One BYOL update of an online and a target network."""

  def __init__(self, norm, batch_size, image_size, seed=0):
    torch.manual_seed(seed)
    ws = norm == 'gn+ws'
    self.one_pass = norm != 'bn'
    self.online = Network('bn' if norm == 'bn' else 'gn', ws).to(
        memory_format=torch.channels_last)
    self.target = Network('bn' if norm == 'bn' else 'gn', ws).to(
        memory_format=torch.channels_last)
    self.target.load_state_dict(self.online.state_dict())
    for p in self.target.parameters():
      p.requires_grad_(False)
    self.params = list(self.online.parameters())
    self.target_params = list(self.target.parameters())
    # Weight decay and the trust ratio apply to weights of rank > 1 only
    # (not to biases nor to norm scales and offsets).
    self.decayed = [p.ndim > 1 for p in self.params]
    self.momentum = [torch.zeros_like(p) for p in self.params]
    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, 3, image_size, image_size)
    self.view1 = torch.rand(shape, generator=g).contiguous(
        memory_format=torch.channels_last)
    self.view2 = torch.rand(shape, generator=g).contiguous(
        memory_format=torch.channels_last)
    self.labels = torch.randint(0, 10, (batch_size,), generator=g)

  def _views(self, net, **kwargs):
    if self.one_pass:
      out = net(torch.cat([self.view1, self.view2]), **kwargs)
      n = self.view1.shape[0]
      if isinstance(out, tuple):
        return tuple(o[:n] for o in out), tuple(o[n:] for o in out)
      return out[:n], out[n:]
    return net(self.view1, **kwargs), net(self.view2, **kwargs)

  def __call__(self):
    (pred1, _, logits), (pred2, _, _) = self._views(self.online)
    with torch.no_grad():
      target1, target2 = self._views(self.target, predict=False)
    loss = (regression_loss(pred1, target2) +
            regression_loss(pred2, target1)).mean()
    loss = loss + F.cross_entropy(logits, self.labels)
    for p in self.params:
      p.grad = None
    loss.backward()
    with torch.no_grad():
      for p, mu, decayed in zip(self.params, self.momentum, self.decayed):
        g = p.grad
        if decayed:
          g = g.add(p, alpha=WEIGHT_DECAY)
          p_norm = torch.linalg.vector_norm(p)
          g_norm = torch.linalg.vector_norm(g)
          trust = torch.where((p_norm > 0) & (g_norm > 0),
                              ETA * p_norm / g_norm, torch.ones_like(p_norm))
          g = g * trust
        mu.mul_(MOMENTUM).add_(g)
        p.add_(mu, alpha=-LEARNING_RATE)
      torch._foreach_lerp_(self.target_params, self.params, 1.0 - TAU)
    return loss


def time_steps(step, n):
  times = []
  for _ in range(n):
    t = time.perf_counter()
    step().item()
    times.append(time.perf_counter() - t)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--norm', choices=('bn', 'gn+ws'), default='gn+ws')
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--image_size', type=int, default=24)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--threads', type=int, default=0,
                      help='torch.set_num_threads; 0 keeps the default')
  parser.add_argument('--serve', action='store_true')
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  step = Step(args.norm, args.batch_size, args.image_size)
  time_steps(step, args.warmup)
  if args.serve:
    print(json.dumps({'ready': True, 'torch': torch.__version__,
                      'threads': torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
      if not line.strip():
        break
      print(json.dumps({'times': time_steps(step, int(line))}), flush=True)
    return
  times = sorted(time_steps(step, args.steps))
  median = times[len(times) // 2]
  print(f'torch {torch.__version__} ({torch.get_num_threads()} threads), '
        f'{args.norm}, batch {args.batch_size}: {args.batch_size / median:.1f} '
        f'images/s ({1000 * median:.1f} ms/step, median of {args.steps})')


if __name__ == '__main__':
  main()
