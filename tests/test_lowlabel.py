"""Low-label fine-tuning and transfer evaluation on data the tests write."""

import json
import os

import chex
import jax
import numpy as np
import pytest

from byol import checkpointing
from byol import dataset
from byol import eval_experiment
from byol import experiment
from byol import model
from byol import update
from byol.errors import ConfigError
from byol.evaluation import lowlabel
import data_fixtures
from test_eval import _eval_config
from test_experiment import tiny_config


def test_balanced_subset_counts_and_seed():
  labels = np.repeat(np.arange(4), [10, 20, 30, 3])
  subset = lowlabel.balanced_subset(labels, 0.1, seed=0)
  counts = np.bincount(labels[subset], minlength=4)
  np.testing.assert_array_equal(counts, [1, 2, 3, 1])  # at least one each
  assert np.all(np.diff(subset) > 0)
  np.testing.assert_array_equal(
      subset, lowlabel.balanced_subset(labels, 0.1, seed=0))
  assert not np.array_equal(subset,
                            lowlabel.balanced_subset(labels, 0.1, seed=1))
  np.testing.assert_array_equal(lowlabel.balanced_subset(labels, 1.0, 0),
                                np.arange(63))
  with pytest.raises(ConfigError, match='fraction'):
    lowlabel.balanced_subset(labels, 0.0, 0)


def _workdir(root, dataset_name):
  """A pretraining workdir of a tiny network (its initial state) on
  `dataset_name`."""
  workdir = str(root)
  config = tiny_config('local', **{'data.dataset': dataset_name})
  init = jax.jit(experiment.make_init_fn(
      model.Network(config), update.make_optimizer(config, 2, 0)))
  state = init(jax.random.PRNGKey(0), np.zeros((2, 16, 16, 3), np.float32))
  chex.assert_tree_all_finite(state)
  checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints')).save(
      0, jax.tree.map(np.asarray, state))
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  return workdir


@pytest.fixture(scope='module')
def folder_run(tmp_path_factory):
  images = tmp_path_factory.mktemp('images')
  data_fixtures.write_image_folder(str(images), per_class=8)
  name = f'folder:{images}'
  return name, _workdir(tmp_path_factory.mktemp('run'), name)


@pytest.mark.slow
def test_lowlabel_chooses_on_valid_and_lists_its_images(folder_run):
  name, workdir = folder_run
  config = _eval_config('local,10pct', **{
      'lowlabel.fraction': 0.5, 'lowlabel.lr_grid': (0.4, 0.05),
      'lowlabel.epochs_grid': (1,), 'training.batch_size': 8,
      'training.max_steps': 2, 'training.log_every_steps': 1,
      'data.image_size': 8})
  result = eval_experiment.run(config, workdir, printer=lambda _: None)
  out = os.path.join(workdir, 'eval_lowlabel_10pct')
  with open(os.path.join(out, 'subset.json')) as f:
    subset = json.load(f)
  train = dataset.num_examples(dataset.Split.TRAIN, name)
  labels = [l for _, l in sorted(
      (p, l) for p, l in zip(subset['positions'], subset['labels']))]
  counts = np.bincount(labels, minlength=3)
  # Half of each class of TRAIN, rounded, and each file in its class folder.
  from byol.data import registry  # pylint: disable=g-import-not-at-top
  train_labels = registry.resolve(name).labels(dataset.Split.TRAIN)
  np.testing.assert_array_equal(
      counts, np.round(np.bincount(train_labels, minlength=3) * 0.5))
  assert all(f.split(os.sep)[0] == data_fixtures.CLASSES[l]
             for f, l in zip(subset['files'], subset['labels']))
  assert result['num_train_examples'] == len(subset['positions']) < train
  grid = result['grid']
  assert len(grid) == 2 and result['selected_on'] == 'VALID'
  best = max(grid, key=lambda r: r['valid_top1_accuracy'])
  assert result['top1_accuracy'] == best['top1_accuracy']
  assert result['base_learning_rate'] == best['base_learning_rate']
  with open(os.path.join(out, 'summary.json')) as f:
    assert json.load(f)['top1_accuracy'] == result['top1_accuracy']


def test_transfer_linear_eval_reads_the_other_dataset(folder_run, tmp_path):
  _, workdir = folder_run
  other = tmp_path / 'other'
  data_fixtures.write_image_folder(str(other), per_class=5, seed=9,
                                   classes=('ant', 'bee', 'cow', 'doe'))
  config = _eval_config('local', **{
      'data.dataset': f'folder:{other}', 'training.batch_size': 8,
      'training.max_steps': 2, 'training.lr_grid': (0.4, 0.1),
      'data.image_size': 8, 'output_name': 'eval_transfer'})
  result = eval_experiment.run(config, workdir, printer=lambda _: None)
  name = f'folder:{other}'
  assert result['num_test_examples'] == dataset.num_examples('TEST', name)
  assert result['num_valid_examples'] == dataset.num_examples('VALID', name)
  assert result['num_train_examples'] == dataset.num_examples('TRAIN', name)
  assert 0.0 <= result['top1_accuracy'] <= result['top5_accuracy'] == 1.0


def test_evaluating_on_unlabelled_images_is_a_user_error(tmp_path):
  images = tmp_path / 'flat'
  data_fixtures.write_flat_folder(str(images))
  workdir = _workdir(tmp_path / 'run', f'folder:{images}')
  config = _eval_config('local', **{'training.max_steps': 1})
  with pytest.raises(dataset.DatasetError, match='unlabelled'):
    eval_experiment.run(config, workdir, printer=lambda _: None)
  assert not os.path.exists(os.path.join(workdir, 'eval_linear'))


def test_imagenet_lowlabel_uses_the_fixed_subsets():
  c = _eval_config('1pct')
  assert (c.mode, c.lowlabel.fraction, c.output_name) == (
      'lowlabel', 0.01, 'eval_lowlabel_1pct')
  assert lowlabel.IMAGENET_SUBSETS[0.1] == 'tfds:imagenet2012_subset/10pct'
