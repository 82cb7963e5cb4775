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

  +fastconv / +lax / +onednn
                    model.encoder.conv_impl=fast_conv / lax / onednn
                    (`byol.fast_conv.conv2d`, the convolution whose backward
                    pass is arranged for XLA:CPU; lax's own; oneDNN's kernels
                    as custom calls, `byol.onednn_conv.conv2d`)
  +onepass          training.images_per_pass=0: both views in one pass
  +passN            training.images_per_pass=N (e.g. +pass128)
  +noaug            the step without its on-device augmentations (the views
                    as given, normalised only), as the PyTorch reference
  +cpuN             distributed.cpu_devices=N: the step on N CPU devices (e.g.
                    one per core; +cpu1: one), the batch split over them by
                    pmap; BatchNorm keeps the statistics of the whole batch

e.g. `gn+ws+lax+onepass` (the `local` step before the CPU preset's
settings), `gn+ws+fastconv+pass128`, `bn+fastconv`.

Without `+cpuN` a variant runs on the CPU devices main.py would give its
config (`distributed.cpu_devices=0`, automatic: a BatchNorm network one per
core, others one); `+cpu1` keeps one. The process starts as many CPU devices
as the most any variant takes; each runs on its own first ones.

Every variant is compiled first; then `--reps` repetitions (default 3) each
time `--steps` steps of every variant, the order rotating by one per
repetition, so that drifting load falls on all alike. A variant's images/s
is the median over repetitions of each repetition's median step, reported
with its range (min-max).

`--torch_python=PYTHON` also times `experiments/torch_reference.py`, the same
network and step in PyTorch (BN and GN+WS), in a second process run by that
Python: one PyTorch step after each timed JAX step, so that both see the same
load, and the ratio `vs_torch` (JAX images/s over PyTorch's, per
repetition, then their median and range) is reported.
PyTorch is not a dependency of the project; the reference times the step
without the augmentations, which the JAX step includes unless `+noaug`.

Results: a table on stdout, and JSON in --json (default
experiments/results/benchmark_<platform>.json).
"""

import contextlib
import json
import os
import platform as pyplatform
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
from byol import host_memory
from byol import layers
from byol import model
from byol import update as update_lib
from configs import byol as byol_config
from experiments import study

SIZES = {
    # name: (config variants, overrides, whether to time the input pipeline)
    'local': ('local', {}, True),
    # For tests of the benchmark itself: seconds to compile and run.
    # The studies' smoke network (experiments/study.py).
    'tiny': ('local', {
        **{k: v for k, v in study.SMOKE_OVERRIDES.items()
           if k.startswith('model.') and k != 'model.bn_init_batch_size'},
        'data.image_size': 16,
        'training.batch_size': 16,
    }, False),
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
# Convolution suffixes: model.encoder.conv_impl.
CONV_SUFFIXES = {'lax': 'lax', 'fastconv': 'fast_conv', 'onednn': 'onednn'}
# The PyTorch reference's name for each base variant it implements.
TORCH_VARIANTS = {'bn': 'bn', 'gn+ws': 'gn+ws'}


def _split_variant(name):
  """(base variant, [suffixes]) of a name like `gn+ws+lax+pass128`."""
  for base in sorted(NORM_VARIANTS, key=len, reverse=True):
    if name == base or name.startswith(base + '+'):
      return base, name[len(base) + 1:].split('+') if name != base else []
  raise ValueError(f'unknown variant {name!r}; choose from '
                   f'{", ".join(NORM_VARIANTS)} (+fastconv, +lax, +onednn, '
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
    if suffix in CONV_SUFFIXES:
      overrides['model.encoder.conv_impl'] = CONV_SUFFIXES[suffix]
    elif suffix == 'onepass':
      overrides['training.images_per_pass'] = 0
    elif suffix.startswith('pass') and suffix[4:].isdigit():
      overrides['training.images_per_pass'] = int(suffix[4:])
    elif suffix.startswith('cpu') and suffix[3:].isdigit() and int(suffix[3:]):
      overrides['distributed.cpu_devices'] = int(suffix[3:])
    elif suffix != 'noaug':
      raise ValueError(f'unknown suffix {suffix!r} in variant {name!r}; use '
                       '+fastconv, +lax, +onednn, +onepass, +passN, +cpuN or +noaug')
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


_SIZES = flags.DEFINE_list('sizes', ['local', 'resnet18_32', 'resnet50_224'],
                           f'Sizes to measure, among {", ".join(SIZES)}.')
_NORMS = flags.DEFINE_list('norms', ['bn', 'gn+ws', 'none'],
                           f'Variants, among {", ".join(NORM_VARIANTS)}.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per variant and '
                              'repetition.')
_REPS = flags.DEFINE_integer(
    'reps', 3, 'Repetitions, interleaved across variants (and with PyTorch): '
    'each variant\'s figure is the median over them, with their range.')
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


class StepTimer:
  """One variant's compiled update step on a fixed random batch, to time.

  Built (compiled and warmed up) once; `run(steps)` then times steps of it
  whenever it is called, so that the repetitions of several variants can
  interleave. Without `augment` the step skips the on-device augmentations.
  """

  def __init__(self, config, augment=True):
    self.config = config
    # The devices main.py would give this config (a BatchNorm network: one
    # per core), among those the process started with for all variants.
    local = distributed.local_training_devices(config)
    n = len(local)
    per_device = experiment.per_device_batch(config, n)
    s = config.data.image_size
    rng = np.random.RandomState(0)
    shape = (n, 1, per_device, s, s, 3)
    batch = {'view1': rng.uniform(size=shape).astype(np.float32),
             'view2': rng.uniform(size=shape).astype(np.float32),
             'labels': rng.randint(0, 10, size=shape[:3]).astype(np.int32)}
    network = model.Network(config, devices.AXIS)
    optimizer = update_lib.make_optimizer(config, 1000, 10)
    init = jax.pmap(experiment.make_init_fn(network, optimizer),
                    axis_name=devices.AXIS, devices=local)
    update = jax.pmap(
        update_lib.make_update_fn(config, network.forward, optimizer, 1000,
                                  10, augment=augment),
        axis_name=devices.AXIS, donate_argnums=(0,), devices=local)
    sharding = devices.local_mesh_sharding(local)
    self._key = devices.replicate(jax.random.PRNGKey(0), sharding)
    self._state = init(self._key, np.zeros((n, per_device, s, s, 3),
                                           np.float32))
    self._batch = jax.tree.map(lambda x: jax.device_put(x, sharding), batch)
    t0 = time.perf_counter()
    lowered = update.lower(self._state, self._batch, self._key)
    self._step = lowered.compile()
    self.info = {'compile_sec': time.perf_counter() - t0, 'num_devices': n,
                 'xla_memory_mb': None, 'gflops_per_image': None}
    try:
      # Counted on the lowered program, before the backend turns
      # convolutions into library calls (cuDNN) that its own count would
      # leave out.
      cost = lowered.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      flops = float(cost.get('flops', 0.0))
      if flops:
        # XLA's count for the whole step (two views, online + target), per
        # image of the global batch.
        self.info['gflops_per_image'] = (
            flops * n / config.training.batch_size / 1e9)
    except Exception:  # pylint: disable=broad-except
      pass
    try:
      m = self._step.memory_analysis()
      self.info['xla_memory_mb'] = (m.argument_size_in_bytes +
                                    m.output_size_in_bytes +
                                    m.temp_size_in_bytes) / 2**20
    except Exception:  # pylint: disable=broad-except
      pass

  def run(self, steps, after_step=None):
    """Seconds of each of `steps` steps; `after_step()` runs after each one,
    outside its time (the PyTorch reference's step, interleaved)."""
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      self._state, logs = self._step(self._state, self._batch, self._key)
      jax.block_until_ready(logs)
      times.append(time.perf_counter() - t)
      if after_step is not None:
        after_step()
    return times


def spread(values):
  """Median, min and max of per-repetition figures (a list)."""
  return {'median': statistics.median(values), 'min': min(values),
          'max': max(values), 'reps': list(values)}


def summarize_reps(batch_size, jax_times, torch_times=None):
  """The figures of one variant from its repetitions' step times.

  Each repetition gives images/s from its median step (the median damps a
  step hit by a burst of load); the variant's figure is the median over
  repetitions and its range their min and max. With `torch_times` (the
  PyTorch steps interleaved with the same repetitions), the same for
  PyTorch and for the ratio JAX/PyTorch of each repetition.

  Args:
    batch_size: images per step.
    jax_times: per repetition, the seconds of each timed step.
    torch_times: the same for PyTorch, or None.
  """
  rate = lambda times: batch_size / statistics.median(times)
  jax_rates = [rate(t) for t in jax_times]
  r = {'images_per_sec': spread(jax_rates),
       'step_ms': 1000 * statistics.median(
           [statistics.median(t) for t in jax_times]),
       'reps': len(jax_times)}
  median = r['images_per_sec']['median']
  # The stability criterion: the range within +-10% of the median.
  r['range_vs_median'] = [r['images_per_sec']['min'] / median - 1,
                          r['images_per_sec']['max'] / median - 1]
  if torch_times:
    torch_rates = [rate(t) for t in torch_times]
    r['torch_images_per_sec'] = spread(torch_rates)
    r['torch_step_ms'] = 1000 * statistics.median(
        [statistics.median(t) for t in torch_times])
    r['vs_torch'] = spread([j / t for j, t in zip(jax_rates, torch_rates)])
  return r


def _fmt(sp, digits=1):
  return (f'{sp["median"]:.{digits}f} ({sp["min"]:.{digits}f}-'
          f'{sp["max"]:.{digits}f})')


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


def _time_size(size, names, printer=print):
  """Builds every variant of `size`, then times them in interleaved reps.

  Every variant (and its PyTorch reference, in its own process) is compiled
  and warmed up first; then each repetition times `--steps` steps of every
  variant, the order rotating by one each repetition, each JAX step followed
  by one PyTorch step. Drifting load thus falls on all variants and on both
  frameworks alike.
  """
  timers, torch_refs, times, torch_times, configs = {}, {}, {}, {}, {}
  try:
    for name in names:
      base, overrides, config = variant_config(size, name)
      configs[name] = (base, overrides, config)
      context = (naive_group_norm() if base.endswith('_naive')
                 else contextlib.nullcontext())
      with context:
        timers[name] = StepTimer(config, augment=augments(name))
      timers[name].run(_WARMUP.value)
      if _TORCH_PYTHON.value and base in TORCH_VARIANTS:
        torch_refs[name] = TorchReference(
            _TORCH_PYTHON.value, TORCH_VARIANTS[base],
            config.training.batch_size, config.data.image_size)
      times[name], torch_times[name] = [], []
    for rep in range(_REPS.value):
      k = rep % len(names)
      for name in names[k:] + names[:k]:
        ref = torch_refs.get(name)
        before = len(ref.times) if ref else 0
        times[name].append(timers[name].run(_STEPS.value,
                                            ref and ref.step))
        if ref:
          torch_times[name].append(ref.times[before:])
  finally:
    for ref in torch_refs.values():
      ref.close()
  row = {}
  for name in names:
    base, overrides, config = configs[name]
    b = config.training.batch_size
    r = dict(timers[name].info, **summarize_reps(b, times[name],
                                                 torch_times[name]))
    r['config_overrides'] = overrides
    r['augment'] = augments(name)
    if name in torch_refs:
      r['torch_info'] = torch_refs[name].info
    row[name] = r
    # Step time relative to BatchNorm's: <= 1.00 means no slower than BN.
    r['step_time_vs_bn'] = (r['step_ms'] / row['bn']['step_ms']
                            if 'bn' in row else float('nan'))
    printer(f'| {size} | {name} | {b} | {r["num_devices"]} | '
            f'{_fmt(r["images_per_sec"])} | {r["step_time_vs_bn"]:.2f} | '
            f'{r["step_ms"]:.1f} | {r["compile_sec"]:.1f} | '
            f'{r["xla_memory_mb"] or float("nan"):.0f} | '
            f'{r["gflops_per_image"] or float("nan"):.2f} |')
    if 'torch_images_per_sec' in r:
      printer(f'| {size} | {name}: PyTorch {r["torch_info"]["torch"]} | {b} '
              f'| | {_fmt(r["torch_images_per_sec"])} | JAX/PyTorch '
              f'{_fmt(r["vs_torch"], 2)} | {r["torch_step_ms"]:.1f} | | | |')
  return row


def cpu_model() -> str:
  """The host CPU as /proc/cpuinfo names it, with its family and model."""
  fields = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  name = fields.get('model name') or pyplatform.processor() or 'unknown'
  if 'cpu family' in fields and 'model' in fields:
    name += f' (family {fields["cpu family"]}, model {fields["model"]})'
  return name


def main(argv):
  del argv
  # As main.py: freed step buffers are kept for reuse (byol/host_memory.py).
  host_memory.keep_freed_memory()
  names = list(_NORMS.value)
  for size in _SIZES.value:
    if size not in SIZES:
      print(f'error: unknown size {size!r}; choose from {", ".join(SIZES)}',
            file=sys.stderr)
      sys.exit(2)
  try:
    configs = [variant_config(size, name)[2]
               for size in _SIZES.value for name in names]
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if _REPS.value < 1 or _STEPS.value < 1:
    print('error: --reps and --steps must be >= 1', file=sys.stderr)
    sys.exit(2)
  # Before anything starts JAX's backends: as many CPU devices as the most
  # any variant takes (a BatchNorm network: one per core, as main.py gives
  # it); each variant runs on its own first ones.
  distributed.start_cpu_devices(configs)
  platform = jax.devices()[0].platform
  results = {'platform': platform, 'device': str(jax.devices()[0].device_kind),
             'num_devices': jax.device_count(), 'dtype': _DTYPE.value,
             'steps': _STEPS.value, 'reps': _REPS.value,
             'cores': distributed.available_cores(),
             'cpu_model': cpu_model(), 'sizes': {}}
  print(f'# BYOL train step, {jax.device_count()} x {results["device"]} '
        f'({platform}), {_DTYPE.value}: images/s as the median (min-max) '
        f'over {_REPS.value} interleaved repetitions of the median of '
        f'{_STEPS.value} steps')
  header = ('| size | variant | batch | devices | images/s | time/bn | step ms '
            '| compile s | XLA MB | GFLOP/img |')
  print(header)
  print('|' + '---|' * (header.count('|') - 1), flush=True)
  for size in _SIZES.value:
    row = _time_size(size, names, printer=lambda l: print(l, flush=True))
    if _INPUT.value and SIZES[size][2]:
      config = make_config(size, 'gn', True)
      row['input_pipeline_images_per_sec'] = time_input(config)
      print(f'| {size} | input pipeline | {config.training.batch_size} | | '
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
