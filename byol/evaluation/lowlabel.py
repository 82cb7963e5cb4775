"""Low-label fine-tuning (BYOL's Table 2 protocol), and fine-tuning with selection.

The whole network is fine-tuned (`finetune.FineTuneEvaluator`: SGD Nesterov
0.9, no weight decay, cosine decay, crop + flip) on a fraction of the
training labels, once per point of a grid of base learning rates x epochs
(BYOL: {0.01, 0.02, 0.05, 0.1, 0.005} x {30, 50}); the point best on VALID
is chosen and its TEST accuracy reported. Nothing is selected on TEST.

Which labels:
  imagenet2012   tfds' `imagenet2012_subset/1pct` and `/10pct`, the fixed
                 SimCLR lists (fractions 0.01 and 0.1 only), read as
                 `tfds:imagenet2012_subset/...`; VALID is imagenet2012's
                 (the first 10,000 train images, which may share images
                 with the subset: say so wherever it is reported).
  any other      a seeded, class-balanced subset of TRAIN (`balanced_subset`:
                 round(fraction x n_c) images of each class c, at least one),
                 whose positions (and, for a folder, file paths) are written
                 to `<output>/subset.json`.
A fraction of 1 fine-tunes on all of TRAIN: the transfer protocol's
fine-tuning, its rate and length chosen on VALID.
"""

import itertools
import os
from typing import Any, Dict, Optional, Sequence

import ml_collections
import numpy as np

from byol import dataset as dataset_lib
from byol import files
from byol import model
from byol.data import registry
from byol.errors import ConfigError
from byol.evaluation import finetune as finetune_lib
from byol.evaluation import loop

IMAGENET_SUBSETS = {0.01: 'tfds:imagenet2012_subset/1pct',
                    0.1: 'tfds:imagenet2012_subset/10pct'}


def balanced_subset(labels: np.ndarray, fraction: float,
                    seed: int) -> np.ndarray:
  """Sorted positions of a class-balanced random subset of `labels`.

  Of each class c with n_c examples, max(1, round(fraction * n_c)) are drawn
  without replacement by `np.random.default_rng(seed)`, class by class in
  label order; the same labels, fraction and seed give the same subset.
  """
  if not 0 < fraction <= 1:
    raise ConfigError(f'lowlabel.fraction must be in (0, 1], got {fraction}')
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    count = max(1, int(round(fraction * len(members))))
    chosen.append(rng.choice(members, size=count, replace=False))
  return np.sort(np.concatenate(chosen)).astype(np.int64)


class LowLabelEvaluator:
  """`LowLabelEvaluator(network, **cfg).run(params, state)`."""

  protocol = ('low-label fine-tuning: the whole network fine-tuned on a '
              'fraction of the labels, rate and epochs chosen on VALID')

  def __init__(self, network: model.Network, *,
               data: loop.DataSpec, fraction: float, subset_seed: int,
               lr_grid: Sequence[float], epochs_grid: Sequence[float],
               batch_size: int, max_steps: int, momentum: float,
               head_init: str, log_every_steps: int, seed: int,
               output_dir: Optional[str] = None,
               printer: loop.Printer = print,
               metrics: Optional[loop.MetricsFn] = None):
    if not lr_grid or not epochs_grid:
      raise ConfigError('lowlabel.lr_grid and lowlabel.epochs_grid must not '
                        'be empty')
    if not 0 < fraction <= 1:
      raise ConfigError(f'lowlabel.fraction must be in (0, 1], got '
                        f'{fraction}')
    self.network = network
    self.data = data
    self.fraction = fraction
    self.subset_seed = subset_seed
    self.grid = list(itertools.product(lr_grid, epochs_grid))
    self.kwargs = dict(batch_size=batch_size, max_steps=max_steps,
                       momentum=momentum,
                       train_split=dataset_lib.Split.TRAIN,
                       head_init=head_init, log_every_steps=log_every_steps,
                       seed=seed, printer=printer, metrics=metrics)
    self.output_dir = output_dir
    self.print = printer
    self.train_data, self.subset_record = self._training_data()
    # Every point's evaluator is built now: a bad setting stops the run
    # before anything is trained or written.
    self.evaluators = [self._finetuner(lr, epochs) for lr, epochs in self.grid]

  def _training_data(self):
    d = self.data
    if d.dataset == 'imagenet2012' and self.fraction < 1:
      if self.fraction not in IMAGENET_SUBSETS:
        raise ConfigError(f'imagenet2012 has fixed subsets of 1% and 10% of '
                          f'the labels; lowlabel.fraction={self.fraction} '
                          'is neither 0.01 nor 0.1')
      name = IMAGENET_SUBSETS[self.fraction]
      return d._replace(dataset=name, subset=None), {'dataset': name}
    if self.fraction == 1:
      return d, {'dataset': d.dataset, 'fraction': 1.0}
    labels = _train_labels(d)
    subset = balanced_subset(labels, self.fraction, self.subset_seed)
    record = {'dataset': d.dataset, 'fraction': self.fraction,
              'seed': self.subset_seed, 'split': 'TRAIN',
              'num_examples': int(len(subset)),
              'positions': subset.tolist(),
              'labels': labels[subset].tolist()}
    if d.dataset.startswith('folder:'):
      entries = registry.resolve(d.dataset).split_entries[
          dataset_lib.Split.TRAIN]
      record['files'] = [entries[i][0] for i in subset]
    return d._replace(subset=tuple(int(i) for i in subset)), record

  def _finetuner(self, base_lr, epochs):
    train_split = self.kwargs['train_split']
    if self.train_data.dataset != self.data.dataset:
      # ImageNet's subset: all of its train split.
      train_split = dataset_lib.Split.TRAIN_AND_VALID
    kwargs = dict(self.kwargs, train_split=train_split)
    return finetune_lib.FineTuneEvaluator(
        self.network, data=self.data, epochs=epochs, base_lr=base_lr,
        train_data=self.train_data, **kwargs)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  network: model.Network,
                  **kwargs) -> 'LowLabelEvaluator':
    """The evaluator of an evaluation config (configs/eval.py:1pct etc.)."""
    t, l = config.training, config.lowlabel
    return cls(network,
               data=loop.resolve_data(config, network.config),
               fraction=l.fraction, subset_seed=l.subset_seed,
               lr_grid=tuple(l.lr_grid), epochs_grid=tuple(l.epochs_grid),
               batch_size=t.batch_size, max_steps=t.max_steps,
               momentum=t.momentum, head_init=t.head_init,
               log_every_steps=t.log_every_steps, seed=config.seed, **kwargs)

  def run(self, params, state) -> Dict[str, Any]:
    """Fine-tunes once per grid point; returns the point chosen on VALID."""
    if self.output_dir is not None and 'positions' in self.subset_record:
      files.write_json(os.path.join(self.output_dir, 'subset.json'),
                       self.subset_record)
    runs = []
    for (lr, epochs), evaluator in zip(self.grid, self.evaluators):
      self.print(f'[lowlabel] base lr {lr:g}, {epochs:g} epochs on '
                 f'{evaluator.num_train} labelled images')
      r = evaluator.run(params, state)
      runs.append({'base_learning_rate': lr, 'epochs': epochs,
                   'steps': r['steps'],
                   'valid_top1_accuracy': r['valid_top1_accuracy'],
                   'top1_accuracy': r['top1_accuracy'],
                   'top5_accuracy': r['top5_accuracy']})
    best = int(np.argmax([r['valid_top1_accuracy'] for r in runs]))
    chosen = runs[best]
    return {'protocol': self.protocol, 'fraction': self.fraction,
            'train_dataset': self.train_data.dataset,
            'num_train_examples': self.evaluators[best].num_train,
            'selected_on': 'VALID',
            'base_learning_rate': chosen['base_learning_rate'],
            'epochs': chosen['epochs'],
            'valid_top1_accuracy': chosen['valid_top1_accuracy'],
            'top1_accuracy': chosen['top1_accuracy'],
            'top5_accuracy': chosen['top5_accuracy'],
            # For the record only: choosing among these would select on TEST.
            'grid': runs}


def _train_labels(data: loop.DataSpec) -> np.ndarray:
  """Every label of TRAIN of `data`, in the split's order."""
  if dataset_lib.check_dataset(data.dataset) in registry.BUILTIN:
    labels = []
    for batch in dataset_lib.load(
        dataset_lib.Split.TRAIN,
        preprocess_mode=dataset_lib.PreprocessMode.EVAL, batch_dims=[1000],
        dataset=data.dataset, image_size=8, data_dir=data.data_dir,
        process_index=0, process_count=1):
      labels.append(batch['labels'][batch['mask'] > 0])
    return np.concatenate(labels).astype(np.int32)
  return registry.resolve(data.dataset, data.data_dir).labels(
      dataset_lib.Split.TRAIN)
