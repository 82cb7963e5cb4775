r"""Step by step: is batch B as k accumulated micro-batches the batch-B run?

The batch study's accumulation pair (batch 256 as 8 x 32) ends a whole run
apart from its twin by about as much as two seeds do: training amplifies any
difference, float rounding included. This check looks at the start instead.
For each normalization it builds the batch study's two configs (one batch of
B; k micro-batches of B/k, gradients averaged), starts both from the same
parameters on the same images with the same augmentations, and after every
step compares their online parameters:

  relative difference = ||p_accumulated - p_one_batch|| /
                        ||p_one_batch - p_initial||

i.e. the gap as a fraction of how far training has moved the parameters. GN+WS
has no statistic across examples, so its gap starts at float rounding (~1e-6)
and grows only as training amplifies rounding; BatchNorm normalizes each
micro-batch by its own B/k examples, a different update from the first step.

Outputs `accumulation_check_<dataset>.md` (the table) and `.png` (the gap by
step, log scale) in --results_dir.

Commands:

  python -m experiments.accumulation_check               # B=256, k=8, 30 steps
  python -m experiments.accumulation_check --smoke --results_dir=/tmp/acc
"""

import os
import sys
import tempfile
from typing import Dict, List, Sequence

from absl import flags
import jax
import numpy as np

from byol import dataset as dataset_lib
from byol import devices
from byol import distributed
from byol import experiment
from byol.errors import UserError
from experiments import batch_study
from experiments import study

FLAGS = flags.FlagValues()
_BATCH = flags.DEFINE_integer('batch', 256, 'The batch size B.',
                              flag_values=FLAGS)
_ACCUMULATION = flags.DEFINE_integer(
    'accumulation', batch_study.ACCUMULATION, 'k: B as k micro-batches.',
    flag_values=FLAGS)
_STEPS = flags.DEFINE_integer('steps', 30, 'Steps compared.',
                              flag_values=FLAGS)
_EPOCHS = flags.DEFINE_float(
    'epochs', batch_study.DEFAULT_EPOCHS, 'The schedules are those of a run '
    'this long (the batch study\'s), of which --steps are run.',
    flag_values=FLAGS)
_NORMS = flags.DEFINE_list('norms', list(batch_study.NORMS),
                           'Normalizations (gnws, bn).', flag_values=FLAGS)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of both runs.',
                             flag_values=FLAGS)
_DATASET = flags.DEFINE_enum('dataset', 'fashion_mnist', dataset_lib.DATASETS,
                             'Dataset.', flag_values=FLAGS)
_RESULTS_DIR = flags.DEFINE_string('results_dir', '',
                                   'Default: experiments/results.',
                                   flag_values=FLAGS)
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny network (the studies\' '
                           'smoke settings), at most 3 steps.',
                           flag_values=FLAGS)


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel()
                         for x in jax.tree.leaves(tree)])


def trajectory(config, steps: int) -> Dict[str, List]:
  """Online parameters (flat) at init and after each step, and the losses."""
  with tempfile.TemporaryDirectory() as workdir:
    exp = experiment.PretrainExperiment(config, workdir, printer=lambda s: None)
    exp.restore_or_init()
    params = [_flat(devices.unreplicate(exp.state).online_params)]
    losses = []
    batches = exp.input(0)
    for step in range(steps):
      logs = exp.step(next(batches), step)
      losses.append(float(np.mean(np.asarray(logs['loss']))))
      params.append(_flat(devices.unreplicate(exp.state).online_params))
  return {'params': params, 'losses': losses}


def gaps(one: Dict[str, List], accumulated: Dict[str, List]) -> Dict:
  """The relative parameter gap and loss gap after every step."""
  p0 = one['params'][0]
  if not np.array_equal(p0, accumulated['params'][0]):
    raise AssertionError('the two runs do not start from the same parameters')
  rel, loss = [], []
  for a, b, la, lb in zip(one['params'][1:], accumulated['params'][1:],
                          one['losses'], accumulated['losses']):
    moved = np.linalg.norm(a - p0)
    # nan until training moves the parameters (the warm-up's first step has
    # learning rate 0).
    rel.append(float(np.linalg.norm(b - a) / moved) if moved > 0
               else float('nan'))
    loss.append(float(abs(lb - la) / max(abs(la), 1e-30)))
  return {'param_gap': rel, 'loss_gap': loss}


def shown_steps(steps: int) -> List[int]:
  """1, 2, 3, 5, 10, 20, 30, ... up to `steps` (1-based), and the last."""
  out = [s for s in (1, 2, 3, 5, 10, 20) if s <= steps]
  out += list(range(30, steps + 1, 10))
  if steps not in out:
    out.append(steps)
  return out


def _cell(value: float) -> str:
  return '-' if np.isnan(value) else f'{value:.1e}'


def write_table(path: str, results: Dict[str, Dict], *, batch: int,
                accumulation: int, command: str) -> str:
  steps = len(next(iter(results.values()))['param_gap'])
  shown = shown_steps(steps)
  lines = [
      f'# Batch {batch} as {accumulation} accumulated micro-batches of '
      f'{batch // accumulation}, step by step',
      '',
      f'Written by `{command}`. Both runs of a row start from the same '
      'parameters and see the same images with the same augmentations (one '
      'key per example, from its place in the global batch). Parameter gap: '
      '||p_accumulated - p_one_batch|| / ||p_one_batch - p_initial|| after '
      'the step (the gap as a fraction of how far training has moved the '
      'parameters; - while they have not moved: the warm-up\'s first step '
      'has learning rate 0); loss gap: |loss difference| / loss of the step '
      '(computed before its update).',
      '',
      '| normalization | ' + ' | '.join(f'step {s}' for s in shown) + ' |',
      '|---|' + '---:|' * len(shown),
  ]
  for norm, r in results.items():
    label = batch_study.NORM_LABELS.get(norm, norm)
    for key, what in (('param_gap', 'parameter gap'), ('loss_gap',
                                                        'loss gap')):
      lines.append(f'| {label}, {what} | ' + ' | '.join(
          _cell(r[key][s - 1]) for s in shown) + ' |')
  text = '\n'.join(lines) + '\n'
  with open(path, 'w') as f:
    f.write(text)
  return text


def write_plot(path: str, results: Dict[str, Dict], *, batch: int,
               accumulation: int) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for norm, r in results.items():
    steps = np.arange(1, len(r['param_gap']) + 1)
    ax.semilogy(steps, r['param_gap'], marker='o', markersize=3,
                label=batch_study.NORM_LABELS.get(norm, norm))
  ax.set_xlabel('step')
  ax.set_ylabel('parameter gap (relative to the distance moved)')
  ax.set_title(f'Batch {batch} against {accumulation} x {batch // accumulation}'
               ' accumulated')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


@study.exits_as_cli()
def main(argv: Sequence[str], printer=print) -> int:
  FLAGS.unparse_flags()
  FLAGS(['accumulation_check', *argv])
  batch, k, smoke = _BATCH.value, _ACCUMULATION.value, _SMOKE.value
  if batch <= 0 or k <= 1 or batch % k:
    raise UserError(f'--accumulation must be > 1 and divide --batch; got '
                    f'{k} and {batch}')
  steps = min(_STEPS.value, 3) if smoke else _STEPS.value
  if steps <= 0:
    raise UserError(f'--steps must be positive, got {_STEPS.value}')
  bad = [n for n in _NORMS.value if n not in batch_study.NORMS]
  if bad or not _NORMS.value:
    raise UserError(f'--norms must be some of {",".join(batch_study.NORMS)}; '
                    f'got {",".join(_NORMS.value)}')
  configs = {
      (norm, acc): study.row_config(
          batch_study.make_row(norm, batch, acc), dataset=_DATASET.value,
          epochs=_EPOCHS.value, smoke=smoke, seed=_SEED.value)
      for norm in _NORMS.value for acc in (1, k)}
  # Before JAX starts: BatchNorm configs take one CPU device per core.
  distributed.start_cpu_devices(list(configs.values()))
  results = {}
  for norm in _NORMS.value:
    runs = {}
    for acc in (1, k):
      printer(f'[accumulation] {norm}, batch {batch}'
              f'{f" as {acc} x {batch // acc}" if acc > 1 else ""}: '
              f'{steps} steps')
      runs[acc] = trajectory(configs[(norm, acc)], steps)
    results[norm] = gaps(runs[1], runs[k])
  results_dir = _RESULTS_DIR.value or os.path.join(study.ROOT, 'experiments',
                                                   'results')
  os.makedirs(results_dir, exist_ok=True)
  stem = os.path.join(results_dir, f'accumulation_check_{_DATASET.value}')
  command = 'python -m experiments.accumulation_check ' + ' '.join(argv)
  printer(write_table(stem + '.md', results, batch=batch, accumulation=k,
                      command=command.strip()))
  write_plot(stem + '.png', results, batch=batch, accumulation=k)
  printer(f'[accumulation] wrote {stem}.md and {stem}.png')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
