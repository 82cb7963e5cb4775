r"""Low-label and transfer evaluation at CPU scale (BYOL's Tables 2 and 3, small).

One GN+WS BYOL pretraining of `configs/byol.py:local` on Fashion-MNIST, and
the same network at initialisation, each evaluated on 1% and 10% of the
TRAIN labels (the same seeded, class-balanced subsets for every row):

  byol_finetune     the pretrained network fine-tuned (low-label protocol,
                    byol/evaluation/lowlabel.py: rate x epochs chosen on VALID)
  scratch_finetune  the same protocol from the initial weights: a supervised
                    network trained from scratch on the same labels
  byol_linear       a linear head on the frozen pretrained encoder, trained on
                    the same labels (rate chosen on VALID)
  init_linear       the same on the frozen encoder at initialisation

and one transfer pair that runs offline: the experiment writes Fashion-MNIST's
10,000 test images as an unlabelled folder of PNGs and pretrains on it
(`folder:`), writes the first 10,000 images of the train half as a labelled
folder (`<class>/`), and evaluates both the pretrained and the initial encoder
on it with the linear protocol (`transfer_byol_linear`, `transfer_init_linear`).

Every run is resumable: pretraining resumes from its checkpoint, a finished
evaluation (its summary.json) is skipped; finished results are also kept in
experiments/results/runs/lowlabel_study_<dataset>_<epochs>ep/ and the table
and plot go to experiments/results/lowlabel_study_<epochs>ep_<dataset>.{md,png}.
The grid is smaller than BYOL's ({0.01, 0.02, 0.05, 0.1, 0.005} x {30, 50}
epochs): `--lr_grid` and `--epochs_grid` set it.

Commands:

  python -m experiments.lowlabel_study                  # 5 epochs pretraining
  python -m experiments.lowlabel_study --epochs=20 --workdir_root=workdirs/lowlabel_20
  python -m experiments.lowlabel_study --smoke          # tiny, minutes
"""

import datetime
import json
import os
import sys
import time
from typing import Dict, List, Sequence

from absl import flags
import numpy as np

from byol import checkpointing
from byol import dataset as dataset_lib
from byol import devices
from byol import eval_experiment
from byol import experiment
from byol import files
from byol import metrics as metrics_lib
from byol import model
from byol import train_loop
from byol.errors import UserError
from byol.evaluation import sources
from configs import byol as byol_config
from configs import eval as eval_config
from experiments import study

FRACTIONS = (('1pct', 0.01), ('10pct', 0.1))
# (row, pretraining workdir, protocol); the low-label rows run per fraction.
LOWLABEL_ROWS = (('byol_finetune', 'byol', 'lowlabel'),
                 ('scratch_finetune', 'init', 'lowlabel'),
                 ('byol_linear', 'byol', 'linear'),
                 ('init_linear', 'init', 'linear'))
TRANSFER_ROWS = (('transfer_byol_linear', 'folder_byol', 'linear'),
                 ('transfer_init_linear', 'folder_init', 'linear'))
TRANSFER_IMAGES = 10_000
SMOKE_IMAGES = 200

FLAGS = flags.FlagValues()
_EPOCHS = flags.DEFINE_float('epochs', 5.0, 'Pretraining epochs.',
                             flag_values=FLAGS)
_LR_GRID = flags.DEFINE_list('lr_grid', ['0.02', '0.05', '0.1'],
                             'Fine-tuning base rates.', flag_values=FLAGS)
_EPOCHS_GRID = flags.DEFINE_list('epochs_grid', ['20'],
                                 'Fine-tuning epochs.', flag_values=FLAGS)
_LINEAR_EPOCHS = flags.DEFINE_integer('linear_epochs', 30,
                                    'Epochs of the linear rows.',
                                    flag_values=FLAGS)
_WORKDIR_ROOT, _RESULTS_DIR = study.define_output_flags(
    FLAGS, 'workdirs/lowlabel_<epochs>ep')
_ONLY = flags.DEFINE_list('only', [], 'Run only these rows (default: all).',
                          flag_values=FLAGS)
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny network and data, few '
                           'steps.', flag_values=FLAGS)


def pretrain_config(dataset: str, epochs: float, smoke: bool):
  """The GN+WS `local` config on `dataset` (tiny under --smoke)."""
  c = byol_config.get_config('local')
  c.unlock()
  c.data.dataset = dataset
  c.training.epochs = float(epochs)
  c.training.checkpoint_every_steps = 100
  if smoke:
    c.update_from_flattened_dict(dict(study.SMOKE_OVERRIDES))
    c.evaluators.schedule = ()  # nothing measured during the tiny runs
  c.lock()
  return c


def pretrain(config, workdir: str, printer) -> None:
  """Pretrains (or resumes, or skips a finished run)."""
  os.makedirs(workdir, exist_ok=True)
  train_loop.train(experiment.PretrainExperiment(config, workdir,
                                                 printer=printer))


def write_initial(config, workdir: str) -> None:
  """A workdir holding the network at initialisation (checkpoint of step 0)."""
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  if ckpt.latest_step() is not None:
    return
  os.makedirs(workdir, exist_ok=True)
  exp = experiment.PretrainExperiment(config, workdir, printer=lambda _: None)
  ckpt.save(0, devices.unreplicate(exp.initial_state()))
  files.write_text(os.path.join(workdir, 'config.json'),
                   config.to_json_best_effort(indent=2, sort_keys=True))


def write_folders(root: str, count: int) -> Dict[str, str]:
  """Fashion-MNIST as image folders: the test half unlabelled, the first
  `count` train images labelled; written once (a marker file says done)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from byol.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  out = {'unlabelled': os.path.join(root, 'fmnist_test_unlabelled'),
         'labelled': os.path.join(root, 'fmnist_train_labelled')}
  marker = os.path.join(root, f'folders_{count}.done')
  if os.path.exists(marker):
    return out
  arrays = fashion_mnist._source_arrays(None)  # pylint: disable=protected-access
  names = ('t-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal',
           'shirt', 'sneaker', 'bag', 'boot')
  os.makedirs(out['unlabelled'], exist_ok=True)
  for i, image in enumerate(arrays['test_images'][:count]):
    Image.fromarray(image).save(os.path.join(out['unlabelled'],
                                             f'{i:05d}.png'))
  for i, (image, label) in enumerate(zip(arrays['train_images'][:count],
                                         arrays['train_labels'][:count])):
    folder = os.path.join(out['labelled'], names[label])
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(image).save(os.path.join(folder, f'{i:05d}.png'))
  files.write_text(marker, 'done\n')
  return out


def eval_config_for(protocol: str, fraction_name: str, *, smoke: bool,
                    lr_grid: Sequence[float], epochs_grid: Sequence[float],
                    linear_epochs: float, dataset: str = '',
                    fraction: float = 1.0, output_name: str = ''):
  """The evaluation config of one row."""
  variants = ['local'] + ([fraction_name] if protocol == 'lowlabel' else [])
  c = eval_config.get_config(','.join(variants))
  c.unlock()
  c.data.dataset = dataset
  c.output_name = output_name
  if protocol == 'lowlabel':
    c.lowlabel.lr_grid = tuple(lr_grid)
    c.lowlabel.epochs_grid = tuple(epochs_grid)
  else:
    c.training.epochs = linear_epochs
    c.lowlabel.fraction = fraction
  if smoke:
    c.training.max_steps = 2
    c.training.batch_size = 32
    c.training.log_every_steps = 1
    c.data.image_size = 16
    c.lowlabel.lr_grid = tuple(lr_grid)[:2]
    c.lowlabel.epochs_grid = tuple(epochs_grid)[:1]
  c.lock()
  return c


def run_linear_on_subset(config, workdir: str, fraction: float,
                         printer) -> dict:
  """The linear protocol on the low-label subset (the lowlabel row's)."""
  from byol.evaluation import linear as linear_lib  # pylint: disable=g-import-not-at-top
  from byol.evaluation import loop  # pylint: disable=g-import-not-at-top
  from byol.evaluation import lowlabel  # pylint: disable=g-import-not-at-top
  pretrain, params, state, step = sources.load_pretrained(workdir)
  data = loop.resolve_data(config, pretrain)
  if fraction < 1:
    labels = lowlabel._train_labels(data)  # pylint: disable=protected-access
    subset = lowlabel.balanced_subset(labels, fraction,
                                      config.lowlabel.subset_seed)
    data = data._replace(subset=tuple(int(i) for i in subset))
  t = config.training
  evaluator = linear_lib.LinearEvaluator(
      model.Network(pretrain).single_device().embed,
      num_classes=dataset_lib.num_classes(data.dataset, data.data_dir),
      data=data, batch_size=t.batch_size, epochs=t.epochs,
      max_steps=t.max_steps, base_lrs=tuple(t.lr_grid), momentum=t.momentum,
      train_split=dataset_lib.Split.TRAIN, head_init=t.head_init,
      log_every_steps=t.log_every_steps, seed=config.seed, printer=printer)
  t0 = time.time()
  result = evaluator.run(params, state)
  result.update(mode='linear', checkpoint_step=int(step),
                wall_time_sec=time.time() - t0, fraction=fraction)
  out = os.path.join(workdir, config.output_name)
  os.makedirs(out, exist_ok=True)
  files.write_json(os.path.join(out, 'summary.json'), result)
  return result


def _summary(path: str):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def run(root: str, record: str, *, epochs: float, smoke: bool,
        lr_grid, epochs_grid, linear_epochs, only, printer) -> List[dict]:
  """Runs (or resumes) every row; returns the finished rows' results."""
  results = []
  wanted = lambda row: not only or row in only
  count = SMOKE_IMAGES if smoke else TRANSFER_IMAGES
  folders = write_folders(root, count)
  # --smoke: the low-label rows too run on the small labelled folder, so
  # that every evaluation reads a few hundred images, not Fashion-MNIST's.
  base = pretrain_config(
      f'folder:{folders["labelled"]}' if smoke else 'fashion_mnist', epochs,
      smoke)
  dirs = {'byol': os.path.join(root, 'byol'),
          'init': os.path.join(root, 'init')}
  plan = []
  for fname, fraction in FRACTIONS:
    for row, source, protocol in LOWLABEL_ROWS:
      plan.append((f'{row}_{fname}', source, protocol, fname, fraction, ''))
  for row, source, protocol in TRANSFER_ROWS:
    plan.append((row, source, protocol, 'all', 1.0, 'transfer'))
  plan = [p for p in plan if wanted(p[0])]
  needs = {p[1] for p in plan}
  # Only what the chosen rows read is trained or written.
  if 'byol' in needs:
    pretrain(base, dirs['byol'], printer)
  if 'init' in needs:
    write_initial(base, dirs['init'])
  if {'folder_byol', 'folder_init'} & needs:
    folder_config = pretrain_config(f'folder:{folders["unlabelled"]}',
                                    epochs, smoke)
    dirs['folder_byol'] = os.path.join(root, 'folder_byol')
    dirs['folder_init'] = os.path.join(root, 'folder_init')
    if 'folder_byol' in needs:
      pretrain(folder_config, dirs['folder_byol'], printer)
    if 'folder_init' in needs:
      write_initial(folder_config, dirs['folder_init'])
  for row, source, protocol, fname, fraction, kind in plan:
    workdir = dirs[source]
    output = f'study_{row}'
    kept = os.path.join(record, row, 'summary.json')
    summary = (_summary(os.path.join(workdir, output, 'summary.json')) or
               _summary(kept))
    if summary is None:
      printer(f'[lowlabel-study] {row}')
      dataset = (f'folder:{folders["labelled"]}' if kind == 'transfer'
                 else '')
      config = eval_config_for(
          protocol, fname, smoke=smoke, lr_grid=lr_grid,
          epochs_grid=epochs_grid, linear_epochs=linear_epochs,
          dataset=dataset, fraction=fraction, output_name=output)
      if protocol == 'lowlabel':
        summary = eval_experiment.run(config, workdir, printer=printer)
      else:
        summary = run_linear_on_subset(config, workdir, fraction, printer)
      summary = dict(summary, row=row, fraction_name=fname, kind=kind or
                     'lowlabel', pretrain_epochs=epochs,
                     command_config=json.loads(config.to_json_best_effort()))
      files.write_json(os.path.join(workdir, output, 'summary.json'), summary)
    os.makedirs(os.path.dirname(kept), exist_ok=True)
    files.write_json(kept, summary)
    results.append(summary)
  return results


def write_table(path: str, results: List[dict], *, command: str,
                epochs: float, smoke: bool) -> str:
  """The markdown table of the finished rows."""
  lines = [
      f'# Low-label and transfer evaluation at CPU scale ({epochs:g} epochs '
      f'of GN+WS BYOL on Fashion-MNIST{", smoke" if smoke else ""})', '',
      f'Written by `{command}` on '
      f'{datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}. Low-label rows '
      'train on the same seeded, class-balanced 1% / 10% of TRAIN '
      '(Fashion-MNIST train[10000:]); the rate (and epochs) are chosen on '
      'VALID (train[:10000]) and TEST (the 10,000 test images) is reported. '
      'Transfer rows: pretrained on Fashion-MNIST\'s test images written as '
      'an unlabelled folder, evaluated on the first 10,000 train images '
      'written as a labelled folder (its own VALID/TEST by the folder rule). '
      'Not comparable with ImageNet numbers (BYOL R50: 53.2 / 68.8 top-1 at '
      '1% / 10%).' + (' SMOKE: a tiny network, 3 pretraining steps, 2 '
                      'evaluation steps, and a 200-image labelled folder in '
                      'place of Fashion-MNIST: the numbers mean nothing.'
                      if smoke else ''), '',
      '| row | labels | protocol | train images | chosen | VALID top-1 | '
      'TEST top-1 | TEST top-5 | time |',
      '|---|---|---|---|---|---|---|---|---|']
  for r in results:
    if r.get('mode') == 'lowlabel':
      chosen = f'lr {r["base_learning_rate"]:g}, {r["epochs"]:g} ep'
    else:
      chosen = f'lr {r.get("base_learning_rate", float("nan")):g}'
    lines.append(
        f'| {r["row"]} | {r["fraction_name"]} | {r.get("mode")} | '
        f'{r["num_train_examples"]} | {chosen} | '
        f'{100 * r.get("valid_top1_accuracy", float("nan")):.2f} | '
        f'{100 * r["top1_accuracy"]:.2f} | {100 * r["top5_accuracy"]:.2f} | '
        f'{metrics_lib.format_duration(r.get("wall_time_sec", 0.0))} |')
  text = '\n'.join(lines) + '\n'
  files.write_text(path, text)
  return text


def write_plot(path: str, results: List[dict]) -> None:
  """Bars of TEST top-1 per row."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(9, 3.5))
  names = [r['row'] for r in results]
  values = [100 * r['top1_accuracy'] for r in results]
  ax.barh(np.arange(len(names)), values, color='tab:blue')
  ax.set_yticks(np.arange(len(names)), names, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel('TEST top-1 (%)')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


@study.exits_as_cli(ValueError)
def main(argv: Sequence[str], printer=print) -> int:
  """Runs the study; returns the exit status (2: bad input, one line)."""
  FLAGS.unparse_flags()
  FLAGS(['lowlabel_study', *argv])
  epochs, smoke = _EPOCHS.value, _SMOKE.value
  lr_grid = [float(x) for x in _LR_GRID.value]
  epochs_grid = [float(x) for x in _EPOCHS_GRID.value]
  names = [f'{r}_{f}' for f, _ in FRACTIONS for r, _, _ in LOWLABEL_ROWS]
  names += [r for r, _, _ in TRANSFER_ROWS]
  unknown = [n for n in _ONLY.value if n not in names]
  if unknown:
    raise UserError(f'unknown row(s) {", ".join(unknown)}; choose from '
                    f'{", ".join(names)}')
  suffix = '_smoke' if smoke else ''
  root = _WORKDIR_ROOT.value or os.path.join(
      study.ROOT, 'workdirs', f'lowlabel_{epochs:g}ep{suffix}')
  results_dir = _RESULTS_DIR.value or os.path.join(study.ROOT,
                                                   'experiments', 'results')
  record = study.record_dir(results_dir, f'lowlabel_study{suffix}',
                            'fashion_mnist', epochs)
  results = run(root, record, epochs=epochs, smoke=smoke, lr_grid=lr_grid,
                epochs_grid=epochs_grid,
                linear_epochs=_LINEAR_EPOCHS.value, only=_ONLY.value,
                printer=printer)
  stem = os.path.join(results_dir,
                      f'lowlabel_study_{epochs:g}ep{suffix}_fashion_mnist')
  text = write_table(stem + '.md', results,
                     command='python -m experiments.lowlabel_study ' +
                     ' '.join(argv), epochs=epochs, smoke=smoke)
  write_plot(stem + '.png', results)
  printer(text)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
