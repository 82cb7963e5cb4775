"""The one place that resolves a `data.dataset` name to its data source.

  fashion_mnist        the offline default (`byol/data/fashion_mnist.py`)
  imagenet2012, mock   ImageNet through tfds, and its mock (`imagenet.py`)
  tfds:NAME[/CONFIG]   any tfds image-classification dataset (`tfds_source.py`)
  tfds_dir:PATH        a prepared tfds dataset folder (`tfds_source.py`)
  folder:PATH          a directory of image files (`folder.py`)

The three built-in names keep their own pipelines and numbers; every other
source yields (encoded image, label) records that `encoded.make_stream` turns
into batches with the same crops, seeds, sharding and resumption.

A source (`Source`) says its class count, the size of each split, this
process's records of a split, its labels, and its normalisation statistics:
the known ones for the built-in names, for the others the per-channel mean
and standard deviation of a fixed sample of the pretraining split (centre
crops of its first `STATS_EXAMPLES` examples, in the source's fixed order, at
`STATS_IMAGE_SIZE` px), computed once per process and written with the
source's manifest to the workdir (`write_manifest`). Statistics given in the
config (`data.mean`, `data.std`) replace both.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from byol.data import encoded
from byol.data import splits
from byol.data.splits import DatasetError, Split

BUILTIN = ('fashion_mnist', 'imagenet2012', 'mock')
PREFIXES = ('tfds:', 'tfds_dir:', 'folder:')
SYNTAX = ('imagenet2012, fashion_mnist, mock, tfds:NAME[/CONFIG], '
          'tfds_dir:PATH or folder:PATH')
MANIFEST_NAME = 'dataset.json'
STATS_EXAMPLES = 1000
STATS_IMAGE_SIZE = 64


def check_name(name: str) -> str:
  """`name` if it is a built-in name or a prefixed source; `DatasetError`
  otherwise. Says nothing of whether the data exists."""
  if not isinstance(name, str):
    raise DatasetError(f'data.dataset must be a string, got {name!r}')
  if name in BUILTIN:
    return name
  for prefix in PREFIXES:
    if name.startswith(prefix):
      if not name[len(prefix):].strip():
        raise DatasetError(f'data.dataset={name!r} names no '
                           f'{prefix[:-1]} after {prefix!r}')
      return name
  raise DatasetError(f'unknown dataset {name!r}; choose from {SYNTAX}')


def is_builtin(name: str) -> bool:
  return check_name(name) in BUILTIN


class Source:
  """A dataset of encoded images: what the registry needs of each source.

  Subclasses set `name`, `labelled`, `class_names` and implement
  `num_examples`, `records` and `labels`.
  """

  name: str = ''
  labelled: bool = True
  class_names: Tuple[str, ...] = ()

  def num_classes(self) -> int:
    # An unlabelled source trains the online classifier on one class (every
    # label is 0): the pretraining network keeps its shape, the classifier
    # measures nothing.
    return max(1, len(self.class_names))

  def num_examples(self, split: Split) -> int:
    raise NotImplementedError

  def records(self, split: Split, process_index: int, process_count: int,
              deterministic: bool, seed: int, subset=None):
    """(records, n, largest shard): this process's (bytes, int32 label)."""
    raise NotImplementedError

  def labels(self, split: Split) -> np.ndarray:
    """Every label of `split`, in the split's order (int32)."""
    raise NotImplementedError

  def require_labels(self, what: str) -> None:
    if not self.labelled:
      raise DatasetError(
          f'{self.name} is unlabelled (its images lie directly in the '
          f'folder): {what} needs labels; put the images in one subfolder '
          'per class (PATH/<class>/*.jpg)')

  def make_dataset(self, split, mode, batch_size, image_size, seed,
                   deterministic, process_index, process_count, start_step,
                   subset=None):
    """This process's stream of unshaped batches (see `byol.dataset.load`)."""
    if mode == splits.PreprocessMode.LINEAR_TRAIN:
      self.require_labels('supervised training')
      if split in splits.UNLABELLED_SPLITS:
        raise DatasetError(f'{split.name} of {self.name} has no labels: '
                           'supervised training reads TRAIN or '
                           'TRAIN_AND_VALID')
    ds, n, max_shard = self.records(split, process_index, process_count,
                                    deterministic, seed, subset)
    if n <= 0:
      raise DatasetError(f'process {process_index} of {process_count} has '
                         f'no examples of {split.name} of {self.name}')
    return encoded.make_stream(
        ds, n, max_shard, mode, batch_size, image_size, seed, process_index,
        start_step, random_crop=encoded.random_crop_any,
        centre_crop=encoded.centre_crop_any)

  @property
  def stats(self) -> Tuple[np.ndarray, np.ndarray]:
    """`stats_of(TRAIN_AND_VALID)`."""
    return self.stats_of(Split.TRAIN_AND_VALID)

  def stats_of(self, split: Split) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) over a fixed sample of `split` (see the
    module doc); computed once per split."""
    cache = self.__dict__.setdefault('_stats', {})
    if split not in cache:
      cache[split] = self._sample_stats(split)
    return cache[split]

  def _sample_stats(self, split: Split) -> Tuple[np.ndarray, np.ndarray]:
    ds = self.make_dataset(
        split, splits.PreprocessMode.EVAL, 100, STATS_IMAGE_SIZE, 0, True, 0,
        1, 0)
    total = np.zeros(3)
    squares = np.zeros(3)
    pixels = 0
    seen = 0
    for batch in ds.as_numpy_iterator():
      images = batch['images'][batch['mask'] > 0]
      images = images[:STATS_EXAMPLES - seen].astype(np.float64)
      total += images.sum(axis=(0, 1, 2))
      squares += (images ** 2).sum(axis=(0, 1, 2))
      pixels += images.shape[0] * images.shape[1] * images.shape[2]
      seen += images.shape[0]
      if seen >= STATS_EXAMPLES or images.shape[0] == 0:
        break
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean ** 2, 0.0))
    # A constant channel would divide by zero; 1 leaves it centred.
    std = np.where(std > 1e-6, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)

  def has_split(self, split: Split) -> bool:
    """Whether the source has `split` (UNLABELLED only where it has such
    images)."""
    try:
      self.num_examples(split)
    except DatasetError:
      return False
    return True

  def manifest(self, pretrain_split: Split = Split.TRAIN_AND_VALID,
               given: Optional[Stats] = None) -> Dict[str, Any]:
    """What a run read: the source's name, classes, split sizes, the
    pretraining split and the normalisation statistics (`given`: those of
    the config, else the sampled ones)."""
    sizes = {}
    for split in Split:
      try:
        sizes[split.name] = self.num_examples(split)
      except DatasetError:
        sizes[split.name] = 0
    return {'dataset': self.name, 'labelled': self.labelled,
            'classes': list(self.class_names), 'num_examples': sizes,
            'pretrain_split': pretrain_split.name,
            'normalization': (
                stats_record(given, None) if given is not None else
                stats_record(self.stats_of(pretrain_split), pretrain_split))}


Stats = Tuple[np.ndarray, np.ndarray]


def stats_record(stats: Stats, sampled_from: Optional[Split]) -> Dict[str, Any]:
  """The manifest's `normalization`: mean, std and where they come from."""
  mean, std = stats
  out = {'mean': np.asarray(mean).tolist(), 'std': np.asarray(std).tolist()}
  if sampled_from is None:
    out['source'] = 'config'
  else:
    out.update(source='sample', split=sampled_from.name,
               examples=STATS_EXAMPLES, image_size=STATS_IMAGE_SIZE)
  return out


@functools.lru_cache(maxsize=16)
def resolve(name: str, data_dir: Optional[str] = None) -> Source:
  """The source of a prefixed name (built-in names have no `Source`).

  Cached: a folder is scanned and a tfds builder opened once per process.
  """
  check_name(name)
  # Imported here: each source imports this module for `Source`.
  from byol.data import folder  # pylint: disable=g-import-not-at-top
  from byol.data import tfds_source  # pylint: disable=g-import-not-at-top
  prefix, _, rest = name.partition(':')
  if prefix == 'folder':
    return folder.FolderSource(name, rest)
  if prefix == 'tfds_dir':
    return tfds_source.TfdsSource.from_directory(name, rest)
  if prefix == 'tfds':
    return tfds_source.TfdsSource.from_name(name, rest, data_dir or None)
  raise DatasetError(f'{name!r} is a built-in dataset, not a source')


def write_manifest(name: str, data_dir: Optional[str], workdir: str,
                   pretrain_split: Split = Split.TRAIN_AND_VALID,
                   given: Optional[Stats] = None) -> None:
  """Writes the manifest of the data a run reads to `<workdir>/dataset.json`.

  For a folder it lists every file of every split and every skipped file,
  so that a run can be repeated on the same images. A built-in dataset has
  a manifest only when the config gives its statistics (`given`), which it
  then records.
  """
  from byol import files  # pylint: disable=g-import-not-at-top
  if is_builtin(name):
    if given is None:
      return
    manifest = {'dataset': name, 'pretrain_split': pretrain_split.name,
                'normalization': stats_record(given, None)}
  else:
    manifest = resolve(name, data_dir or None).manifest(pretrain_split, given)
  files.write_json(os.path.join(workdir, MANIFEST_NAME), manifest)


