r"""Step-time ratios of benchmark variants, their steps interleaved in one process.

On a shared machine the load moves by 10-30% within a minute, so variants
timed one after another (as `experiments/benchmark.py` does) are compared
under different loads. Here every variant is compiled first; then each round
runs one step of every variant (the order rotating by one each round), and
the ratio of a variant to the first one is the median over rounds of the
ratio of their steps in the same round.

  python -m experiments.interleave --variants=gn+ws+lax+onepass,gn+ws --rounds=10
  python -m experiments.interleave --variants=bn+lax,bn

Variant names are the benchmark's (`bn`, `gn+ws`, with +fastconv, +lax,
+onepass, +passN, +noaug); the size is `local` with its batch of 256, the
update step under `jax.jit` on one device with the state donated, on a fixed
random batch (augmentations included unless +noaug, as in the benchmark).
"""

import statistics
import time

from absl import app
from absl import flags
import jax
import numpy as np

from byol import experiment
from byol import host_memory
from byol import model
from byol import update as update_lib
from experiments import benchmark

_VARIANTS = flags.DEFINE_list('variants', ['gn+ws+lax+onepass', 'gn+ws'],
                              'Benchmark variant names; ratios are to the '
                              'first.')
_ROUNDS = flags.DEFINE_integer('rounds', 10, 'Timed rounds.')
_WARMUP_STEPS = flags.DEFINE_integer('warmup_steps', 2,
                                     'Untimed steps per variant.')


def build(name):
  """(compiled update, state, batch, key, config) of a variant at `local`."""
  _, _, c = benchmark.variant_config('local', name)
  b, s = c.training.batch_size, c.data.image_size
  rng = np.random.RandomState(0)
  batch = {'view1': rng.uniform(size=(1, b, s, s, 3)).astype(np.float32),
           'view2': rng.uniform(size=(1, b, s, s, 3)).astype(np.float32),
           'labels': rng.randint(0, 10, size=(1, b)).astype(np.int32)}
  network = model.Network(c, axis_name=None)
  forward = network.forward
  optimizer = update_lib.make_optimizer(c, 1000, 10)
  init = jax.jit(experiment.make_init_fn(network, optimizer))
  update = jax.jit(update_lib.make_update_fn(
      c, forward, optimizer, 1000, 10, axis_name=None,
      augment=benchmark.augments(name)), donate_argnums=(0,))
  key = jax.random.PRNGKey(0)
  state = init(key, np.zeros((b, s, s, 3), np.float32))
  return update.lower(state, batch, key).compile(), state, batch, key, c


def main(argv):
  del argv
  host_memory.keep_freed_memory()  # as main.py
  runs = []
  for name in _VARIANTS.value:
    t = time.perf_counter()
    compiled, state, batch, key, config = build(name)
    compile_sec = time.perf_counter() - t
    for _ in range(_WARMUP_STEPS.value):
      state, logs = compiled(state, batch, key)
    jax.block_until_ready(state)
    print(f'# {name}: compiled in {compile_sec:.1f} s, loss '
          f'{float(logs["loss"]):.6f}', flush=True)
    runs.append({'name': name, 'step': compiled, 'state': state,
                 'batch': batch, 'key': key, 'times': [],
                 'batch_size': config.training.batch_size})
  for r in range(_ROUNDS.value):
    k = r % len(runs)
    for run in runs[k:] + runs[:k]:
      t = time.perf_counter()
      run['state'], logs = run['step'](run['state'], run['batch'], run['key'])
      jax.block_until_ready(logs)
      run['times'].append(time.perf_counter() - t)
  first = runs[0]['times']
  print(f'| variant | median ms | images/s | step time / {runs[0]["name"]} '
        '(paired median) |')
  print('|---|---:|---:|---:|')
  for run in runs:
    median = statistics.median(run['times'])
    paired = statistics.median(t / f for t, f in zip(run['times'], first))
    print(f'| {run["name"]} | {1000 * median:.1f} | '
          f'{run["batch_size"] / median:.1f} | {paired:.3f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
