r"""Train-step throughput of BN, GN+WS and no-norm BYOL, side by side in one run.

For each size (a config preset plus overrides) and each normalization, the
pretraining update step is compiled once and timed on a fixed batch: the
median images/s over timed steps after warm-up, the compile time, XLA's
memory estimate of the step (arguments + temporaries) and its FLOPs per image.
The input pipeline's images/s for the same size is measured beside it. All
variants of a size run in the same process, one after the other, so their
ratios are comparable even on a noisy machine.

  ./run.sh bench                                  # every size below
  python -m experiments.benchmark --sizes=local --steps=20
  python -m experiments.benchmark --sizes=resnet50_224 --dtype=bfloat16
  python -m experiments.benchmark --sizes=local --norms=bn,gn+ws,gn+ws_naive
  python -m experiments.benchmark --sizes=local --norms=bn,gn+ws \\
      --input=false --torch_python=/work/torchenv/bin/python

`gn+ws_naive` is the starting point this project was measured against:
Haiku's own `hk.GroupNorm` in place of `layers.GroupNorm`, and the two
views in two forward passes of B images (as BatchNorm needs) instead of one
of 2B. It computes the same function as `gn+ws`. Without a suffix a variant
runs the size's config as it is; suffixes, each after a `+`, change it:

  +fastconv / +lax  model.encoder.fast_conv=True / False
                    (`byol.fast_conv.conv2d`, the convolution whose backward
                    pass is arranged for XLA:CPU, or lax's own)
  +onepass          training.images_per_pass=0: both views in one pass
  +passN            training.images_per_pass=N (e.g. +pass128)
  +noaug            the step without its on-device augmentations (the views
                    as given, normalised only), as the PyTorch reference
  +cpuN             distributed.cpu_devices=N: the step on N CPU devices (e.g.
                    one per core), the batch split over them by pmap;
                    BatchNorm keeps the statistics of the whole batch

e.g. `gn+ws+lax+onepass` (the `local` step before the CPU preset's
settings), `gn+ws+fastconv+pass128`, `bn+fastconv`.

With a `+cpuN` variant the process starts as many CPU devices as the largest
N asks for; other variants run on one of them.

`--torch_python=PYTHON` also times `experiments/torch_reference.py`, the same
network and step in PyTorch (BN and GN+WS), in a second process run by that
Python: one PyTorch step after each timed JAX step, so that both see the same
load, and the ratio `vs_torch` (JAX images/s over PyTorch's) is reported.
PyTorch is not a dependency of the project; the reference times the step
without the augmentations, which the JAX step includes unless `+noaug`.

Results: a table on stdout, and JSON in --json (default
experiments/results/benchmark_<platform>.json).
"""

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from byol import devices
from byol import distributed
from byol import experiment
from byol import layers
from byol import model
from byol import update as update_lib
from configs import byol as byol_config

SIZES = {
    # name: (config variants, overrides, whether to time the input pipeline)
    'local': ('local', {}, True),
    'resnet18_32': ('local', {
        'model.encoder.blocks_per_group': (),
        'model.encoder.depth': 18,
        'model.encoder.width_multiplier': 1.0,
        'model.encoder.num_groups': 16,
        'model.projector.hidden_size': 1024,
        'model.projector.output_size': 128,
        'model.projector.num_groups': 16,
        'model.predictor.hidden_size': 1024,
        'model.predictor.output_size': 128,
        'model.predictor.num_groups': 16,
        'data.image_size': 32,
        'training.batch_size': 64,
    }, True),
    'resnet50_224': ('gnws', {
        'data.dataset': 'fashion_mnist',  # shapes only; no ImageNet needed
        'training.batch_size': 8,
    }, False),
}

NORM_VARIANTS = {
    'bn': ('bn', False),
    'gn+ws': ('gn', True),
    'none': ('none', False),
    'gn+ws_naive': ('gn', True),  # see naive_group_norm()
}
# The PyTorch reference's name for each base variant it implements.
TORCH_VARIANTS = {'bn': 'bn', 'gn+ws': 'gn+ws'}


def _split_variant(name):
  """(base variant, [suffixes]) of a name like `gn+ws+lax+pass128`."""
  for base in sorted(NORM_VARIANTS, key=len, reverse=True):
    if name == base or name.startswith(base + '+'):
      return base, name[len(base) + 1:].split('+') if name != base else []
  raise ValueError(f'unknown variant {name!r}; choose from '
                   f'{", ".join(NORM_VARIANTS)} (+fastconv, +lax, '
                   '+onepass, +passN, +cpuN, +noaug)')


def parse_variant(name):
  """(base variant, {config field: value}) of a name like `gn+ws+lax+pass128`.

  `+noaug` changes the step, not the config: see `augments`.

  Raises:
    ValueError: for an unknown base or suffix.
  """
  base, suffixes = _split_variant(name)
  overrides = {}
  for suffix in suffixes:
    if suffix in ('fastconv', 'lax'):
      overrides['model.encoder.fast_conv'] = suffix == 'fastconv'
    elif suffix == 'onepass':
      overrides['training.images_per_pass'] = 0
    elif suffix.startswith('pass') and suffix[4:].isdigit():
      overrides['training.images_per_pass'] = int(suffix[4:])
    elif suffix.startswith('cpu') and suffix[3:].isdigit() and int(suffix[3:]):
      overrides['distributed.cpu_devices'] = int(suffix[3:])
    elif suffix != 'noaug':
      raise ValueError(f'unknown suffix {suffix!r} in variant {name!r}; use '
                       '+fastconv, +lax, +onepass, +passN, +cpuN or +noaug')
  return base, overrides


def augments(name):
  """Whether the variant's step runs the on-device augmentations."""
  return 'noaug' not in _split_variant(name)[1]


class _HaikuGroupNorm(hk.Module):
  """`layers.GroupNorm`'s interface over Haiku's own `hk.GroupNorm`."""

  def __init__(self, num_groups, eps=1e-5, scale_init=None, name=None):
    super().__init__(name=name)
    self._norm = hk.GroupNorm(num_groups, eps=eps, scale_init=scale_init)

  def __call__(self, x, is_training=False):
    del is_training
    return self._norm(x.astype(jnp.float32)).astype(x.dtype)


@contextlib.contextmanager
def naive_group_norm():
  """While active, new networks use `hk.GroupNorm` and the step runs the two
  views in two passes: the baseline of `gn+ws_naive`."""
  saved = layers.GroupNorm, model.batch_independent
  layers.GroupNorm = _HaikuGroupNorm
  model.batch_independent = lambda config: False
  try:
    yield
  finally:
    layers.GroupNorm, model.batch_independent = saved


class TorchReference:
  """experiments/torch_reference.py in a second process, one step at a time."""

  def __init__(self, python, norm, batch_size, image_size):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          'torch_reference.py')
    # OpenMP threads that spin while waiting (libgomp's default) collapse
    # when the cores are shared: on the busy 2-core machine a PyTorch step
    # took 18x longer than with passive waiting. Passive is the reference's
    # better setting there, so it is the default here.
    env = dict(os.environ)
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    self._proc = subprocess.Popen(
        [python, script, '--serve', f'--norm={norm}',
         f'--batch_size={batch_size}', f'--image_size={image_size}'],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = dict(self._read(), omp_wait_policy=env['OMP_WAIT_POLICY'])
    self.times = []

  def _read(self):
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f'{self._proc.args[1]} exited with status '
                         f'{self._proc.wait()}')
    return json.loads(line)

  def step(self):
    """Runs and times one PyTorch step."""
    self._proc.stdin.write('1\n')
    self._proc.stdin.flush()
    self.times.extend(self._read()['times'])

  def close(self):
    self._proc.stdin.close()
    self._proc.wait()


_SIZES = flags.DEFINE_list('sizes', list(SIZES), 'Sizes to measure.')
_NORMS = flags.DEFINE_list('norms', ['bn', 'gn+ws', 'none'],
                           f'Variants, among {", ".join(NORM_VARIANTS)}.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per variant.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Override every batch size.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype.')
_INPUT = flags.DEFINE_bool('input', True, 'Also time the input pipeline.')
_JSON = flags.DEFINE_string('json', None, 'Where to write the results.')
_TORCH_PYTHON = flags.DEFINE_string(
    'torch_python', '', 'A Python with PyTorch: also time '
    'experiments/torch_reference.py (bn, gn+ws), interleaved step by step.')


def make_config(size, norm, ws):
  variants, overrides, _ = SIZES[size]
  c = byol_config.get_config(variants)
  c.unlock()
  c.update_from_flattened_dict(overrides)
  for part in ('encoder', 'projector', 'predictor'):
    c.model[part].norm = norm
    c.model[part].weight_standardization = ws
  if _BATCH.value:
    c.training.batch_size = _BATCH.value
  c.model.dtype = _DTYPE.value
  c.training.max_steps = 1000
  c.lock()
  return c


def variant_config(size, name):
  """(base variant, overrides, locked config) of a variant name at `size`."""
  base, overrides = parse_variant(name)
  config = make_config(size, *NORM_VARIANTS[base])
  config.unlock()
  config.update_from_flattened_dict(overrides)
  config.lock()
  return base, overrides, config


def time_step(config, after_step=None, augment=True):
  """Compiles and times the pmapped update step on a fixed random batch.

  `after_step`, if given, is called after each timed step, outside its time
  (the PyTorch reference's step, interleaved). Without `augment` the step
  skips the on-device augmentations.
  """
  local = jax.local_devices()
  if local[0].platform == 'cpu' and config.distributed.cpu_devices:
    local = local[:config.distributed.cpu_devices]
  elif local[0].platform == 'cpu' and jax.config.jax_num_cpu_devices > 0:
    local = local[:1]  # the process has more only for +cpuN variants
  n = len(local)
  per_device = experiment.per_device_batch(config, n)
  s = config.data.image_size
  rng = np.random.RandomState(0)
  shape = (n, 1, per_device, s, s, 3)
  batch = {'view1': rng.uniform(size=shape).astype(np.float32),
           'view2': rng.uniform(size=shape).astype(np.float32),
           'labels': rng.randint(0, 10, size=shape[:3]).astype(np.int32)}
  network = model.Network(config, devices.AXIS)
  forward = network.forward
  optimizer = update_lib.make_optimizer(config, 1000, 10)
  init = jax.pmap(experiment.make_init_fn(network, optimizer),
                  axis_name=devices.AXIS, devices=local)
  update = jax.pmap(
      update_lib.make_update_fn(config, forward, optimizer, 1000, 10,
                                augment=augment),
      axis_name=devices.AXIS, donate_argnums=(0,), devices=local)
  sharding = devices.local_mesh_sharding(local)
  key = devices.replicate(jax.random.PRNGKey(0), sharding)
  state = init(key, np.zeros((n, per_device, s, s, 3), np.float32))
  batch = jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
  t0 = time.perf_counter()
  lowered = update.lower(state, batch, key)
  compiled = lowered.compile()
  compile_sec = time.perf_counter() - t0
  flops = memory = None
  try:
    # Counted on the lowered program, before the backend turns convolutions
    # into library calls (cuDNN) that its own count would leave out.
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get('flops', 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    m = compiled.memory_analysis()
    memory = (m.argument_size_in_bytes + m.output_size_in_bytes +
              m.temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass
  for _ in range(_WARMUP.value):
    state, logs = compiled(state, batch, key)
  jax.block_until_ready(state)
  times = []
  for _ in range(_STEPS.value):
    t = time.perf_counter()
    state, logs = compiled(state, batch, key)
    jax.block_until_ready(logs)
    times.append(time.perf_counter() - t)
    if after_step is not None:
      after_step()
  global_batch = config.training.batch_size
  median = statistics.median(times)
  device_mem = None
  stats = jax.local_devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    device_mem = stats['peak_bytes_in_use']
  return {
      'images_per_sec': global_batch / median,
      'step_ms': 1000 * median,
      'compile_sec': compile_sec,
      'xla_memory_mb': memory / 2**20 if memory else None,
      'device_peak_mb': device_mem / 2**20 if device_mem else None,
      'num_devices': n,
      # XLA's count for the whole step (two views, online + target), per
      # image of the global batch.
      'gflops_per_image': (flops * n / global_batch / 1e9
                           if flops else None),
  }


def time_input(config, steps=20):
  """images/s of the host PRETRAIN pipeline at this size."""
  from byol import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  it = dataset_lib.load(
      dataset_lib.Split.TRAIN_AND_VALID,
      preprocess_mode=dataset_lib.PreprocessMode.PRETRAIN,
      batch_dims=[config.training.batch_size], dataset=config.data.dataset,
      image_size=config.data.image_size, deterministic=False)
  for _ in range(3):
    next(it)
  t = time.perf_counter()
  for _ in range(steps):
    next(it)
  return config.training.batch_size * steps / (time.perf_counter() - t)


def main(argv):
  del argv
  variants = {}
  for name in _NORMS.value:
    try:
      variants[name] = parse_variant(name)
    except ValueError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  cpu_devices = max(o.get('distributed.cpu_devices', 0)
                    for _, o in variants.values())
  if cpu_devices:
    # Before anything starts JAX's backends; only the CPU backend uses it.
    distributed.set_cpu_devices(cpu_devices)
  platform = jax.devices()[0].platform
  results = {'platform': platform, 'device': str(jax.devices()[0].device_kind),
             'num_devices': jax.device_count(), 'dtype': _DTYPE.value,
             'steps': _STEPS.value, 'sizes': {}}
  print(f'# BYOL train step, {jax.device_count()} x {results["device"]} '
        f'({platform}), {_DTYPE.value}, median of {_STEPS.value} steps')
  header = ('| size | norm | batch | images/s | time/bn | step ms | compile s | '
            'XLA MB | GFLOP/img |')
  print(header)
  print('|' + '---|' * (header.count('|') - 1))
  for size in _SIZES.value:
    if size not in SIZES:
      print(f'error: unknown size {size!r}; choose from {", ".join(SIZES)}',
            file=sys.stderr)
      sys.exit(2)
    row = {}
    for name in _NORMS.value:
      base, overrides, config = variant_config(size, name)
      torch_ref = None
      if _TORCH_PYTHON.value and base in TORCH_VARIANTS:
        torch_ref = TorchReference(_TORCH_PYTHON.value, TORCH_VARIANTS[base],
                                   config.training.batch_size,
                                   config.data.image_size)
      if base.endswith('_naive'):
        context = naive_group_norm()
      else:
        context = contextlib.nullcontext()
      augment = augments(name)
      with context:
        r = time_step(config, torch_ref and torch_ref.step, augment=augment)
      if torch_ref:
        torch_ref.close()
        torch_median = statistics.median(torch_ref.times)
        r['torch'] = dict(torch_ref.info, step_ms=1000 * torch_median,
                          images_per_sec=(config.training.batch_size /
                                          torch_median))
        r['vs_torch'] = r['images_per_sec'] / r['torch']['images_per_sec']
      row[name] = r
      # Step time relative to BatchNorm's: <= 1.00 means no slower than BN.
      ratio = (r['step_ms'] / row['bn']['step_ms'] if 'bn' in row
               else float('nan'))
      r['step_time_vs_bn'] = ratio
      r['config_overrides'] = overrides
      r['augment'] = augment
      print(f'| {size} | {name} | {config.training.batch_size} | '
            f'{r["images_per_sec"]:.1f} | {ratio:.2f} | {r["step_ms"]:.1f} | '
            f'{r["compile_sec"]:.1f} | '
            f'{r["xla_memory_mb"] or float("nan"):.0f} | '
            f'{r["gflops_per_image"] or float("nan"):.2f} |', flush=True)
      if 'torch' in r:
        print(f'| {size} | {name}: PyTorch {r["torch"]["torch"]} | '
              f'{config.training.batch_size} | '
              f'{r["torch"]["images_per_sec"]:.1f} | JAX/PyTorch '
              f'{r["vs_torch"]:.2f} | {r["torch"]["step_ms"]:.1f} | | | |',
              flush=True)
    if _INPUT.value and SIZES[size][2]:
      config = make_config(size, 'gn', True)
      row['input_pipeline_images_per_sec'] = time_input(config)
      print(f'| {size} | input pipeline | {config.training.batch_size} | '
            f'{row["input_pipeline_images_per_sec"]:.1f} | | | | | |',
            flush=True)
    results['sizes'][size] = row
  path = _JSON.value or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'results',
      f'benchmark_{platform}.json')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  print(f'# written to {path}')


if __name__ == '__main__':
  app.run(main)
