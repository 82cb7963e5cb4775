"""What every input pipeline shares: datasets, splits, shards, random streams.

The datasets' names and split sizes, the preprocessing modes, the errors of
bad input, each process's contiguous shard of a split (and the padding that
gives every process the same number of evaluation batches), and the
stateless seeds every random choice is drawn with. TensorFlow and tfds are
imported here, lazily, for the pipelines' modules.
"""

from __future__ import annotations

import enum
import importlib
import types
from typing import Optional, Tuple, Union

import numpy as np

from byol import errors


class _LazyModule(types.ModuleType):
  """A module imported on first attribute access.

  TensorFlow and tfds take seconds to import; a command that stops at a bad
  config, and every code path that never builds an input pipeline, should
  not pay for them.
  """

  def __getattr__(self, attr):
    # Called only for names not yet here: after the first import, the real
    # module's namespace is copied in and lookups no longer come through.
    module = importlib.import_module(self.__name__)
    self.__dict__.update(vars(module))
    return getattr(module, attr)


tf = _LazyModule('tensorflow')
tfds = _LazyModule('tensorflow_datasets')

# The built-in names; `check_dataset` also accepts the prefixed sources of
# `byol/data/registry.py`.
DATASETS = ('imagenet2012', 'fashion_mnist', 'mock')

# Number of examples per split when `load` mocks tfds itself (dataset='mock'
# outside a caller's `tfds.testing.mock_data` context).
MOCK_NUM_EXAMPLES = 64


class DatasetError(errors.UserError, ValueError):
  """A user error about the input data (bad name, shape or setting)."""


class DatasetNotFoundError(DatasetError):
  """The requested dataset is not available on this machine."""


class Split(enum.Enum):
  """Splits as DeepMind's BYOL: VALID is held out of the train set.

  UNLABELLED is a source's split of images without labels (STL-10's
  `unlabelled`; label -1), pretraining only; TRAIN_AND_VALID_AND_UNLABELLED
  is it after TRAIN_AND_VALID. Only sources that have one know them.
  """
  TRAIN_AND_VALID = 1
  TRAIN = 2
  VALID = 3
  TEST = 4
  UNLABELLED = 5
  TRAIN_AND_VALID_AND_UNLABELLED = 6

  @classmethod
  def from_string(cls, name: str) -> 'Split':
    try:
      return cls[name.upper()]
    except KeyError:
      raise DatasetError(
          f'unknown split {name!r}; choose from '
          f'{", ".join(s.name.lower() for s in cls)}') from None


# The splits without labels (every label -1), which only pretraining reads.
UNLABELLED_SPLITS = (Split.UNLABELLED, Split.TRAIN_AND_VALID_AND_UNLABELLED)
# Examples without a label carry this one (as STL-10's in tfds).
NO_LABEL = -1


class PreprocessMode(enum.Enum):
  """PRETRAIN: two random crops; LINEAR_TRAIN: crop + flip; EVAL: centre."""
  PRETRAIN = 1
  LINEAR_TRAIN = 2
  EVAL = 3


# (tfds split name, first example, number of examples) of each split.
IMAGENET_SPLITS = {
    Split.TRAIN_AND_VALID: ('train', 0, 1_281_167),
    Split.TRAIN: ('train', 10_000, 1_271_167),
    Split.VALID: ('train', 0, 10_000),
    Split.TEST: ('validation', 0, 50_000),
}
FASHION_MNIST_SPLITS = {
    Split.TRAIN_AND_VALID: ('train', 0, 60_000),
    Split.TRAIN: ('train', 10_000, 50_000),
    Split.VALID: ('train', 0, 10_000),
    Split.TEST: ('test', 0, 10_000),
}


def check_dataset(dataset: str) -> str:
  """`dataset` if it names a dataset (`DATASETS`, or a `tfds:`, `tfds_dir:`
  or `folder:` source); `DatasetError` otherwise."""
  from byol.data import registry  # pylint: disable=g-import-not-at-top
  return registry.check_name(dataset)


def as_split(split: Union[Split, str]) -> Split:
  """`split` as a `Split`, given one or its name."""
  return split if isinstance(split, Split) else Split.from_string(split)


def _builtin_split(table, split: Split, dataset: str):
  if split not in table:
    raise DatasetError(f'{dataset} has no {split.name} split')
  return table[split]


def num_examples(split: Union[Split, str],
                 dataset: str = 'imagenet2012',
                 data_dir: Optional[str] = None) -> int:
  """The number of examples of `split` (over all processes).

  For 'mock' this is MOCK_NUM_EXAMPLES, what `load` mocks when no caller's
  `tfds.testing.mock_data` context is active. For a `tfds:`, `tfds_dir:` or
  `folder:` source its registry entry counts them (`data_dir`: the tfds
  data dir of a `tfds:` source).
  """
  split = as_split(split)
  dataset = check_dataset(dataset)
  if dataset == 'fashion_mnist':
    return _builtin_split(FASHION_MNIST_SPLITS, split, dataset)[2]
  if dataset == 'mock':
    _builtin_split(IMAGENET_SPLITS, split, dataset)
    return MOCK_NUM_EXAMPLES
  if dataset == 'imagenet2012':
    return _builtin_split(IMAGENET_SPLITS, split, dataset)[2]
  from byol.data import registry  # pylint: disable=g-import-not-at-top
  return registry.resolve(dataset, data_dir or None).num_examples(split)


def num_classes(dataset: str = 'imagenet2012',
                data_dir: Optional[str] = None) -> int:
  """The number of label classes of `dataset` (1 for an unlabelled folder)."""
  dataset = check_dataset(dataset)
  if dataset == 'fashion_mnist':
    return 10
  if dataset in ('imagenet2012', 'mock'):
    return 1000
  from byol.data import registry  # pylint: disable=g-import-not-at-top
  return registry.resolve(dataset, data_dir or None).num_classes()


def shard_range(start: int, count: int, process_index: int,
                process_count: int) -> Tuple[int, int]:
  """[begin, end) of the process's contiguous shard (as tfds.even_splits)."""
  begin = start + count * process_index // process_count
  end = start + count * (process_index + 1) // process_count
  return begin, end


def eval_padded_size(largest_shard: int, batch_size: int) -> int:
  """Examples per process after padding: the largest shard rounded up to
  whole batches, so that every process yields the same number of batches."""
  return -(-largest_shard // batch_size) * batch_size


# Salts that make the random streams of one seed independent of each other.
SALT_SHUFFLE, SALT_VIEW1, SALT_VIEW2, SALT_LINEAR = 11, 23, 37, 41
INT64_MAX = np.iinfo(np.int64).max


def seed_base(seed: int, process_index: int, salt: int) -> int:
  """One int32-range key per (seed, process, stream); the second word of a
  stateless seed then carries the position, epoch or batch index."""
  return (seed * 1_000_003 + process_index * 7_919 + salt) % (2**31 - 1)


def stateless_seed(seed: int, process_index: int, salt: int, counter):
  """A [2] stateless-op seed: the stream's key and a position, epoch or
  batch index (a scalar int64 tensor)."""
  return tf.stack([tf.constant(seed_base(seed, process_index, salt), tf.int64),
                   tf.cast(counter, tf.int64)])


def first_line(error: BaseException, limit: int = 160) -> str:
  """The first line of an exception's message, for a one-line `error:`."""
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return text[:limit]
