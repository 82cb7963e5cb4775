"""`tfds:NAME[/CONFIG]` and `tfds_dir:PATH`: tfds image-classification datasets.

`tfds:NAME[/CONFIG]` opens `tfds.builder(NAME, data_dir=data.data_dir)`: a
dataset already prepared there is read as it is, any other is downloaded
and prepared by tfds (where the network allows). `tfds_dir:PATH` reads a
prepared dataset folder (the one holding dataset_info.json) with
`tfds.builder_from_directory`, for data converted once or on another machine.

The image is the first feature of the builder's `supervised_keys` (else the
feature `image`) and must be a `tfds.features.Image`; the label the second
(else `label`), a `ClassLabel`, whose `num_classes` is the class count.

Splits, by a stated rule on the tfds split names:
  TEST             `test`; without one, `validation`; without either, the
                   first max(1, n // 10) examples of `train`;
  VALID            `validation` when there is also a `test`; otherwise the
                   first max(1, n // 10) examples of what is left of `train`
                   (as DeepMind holds ImageNet's VALID out of train);
  TRAIN            the rest of `train`;
  TRAIN_AND_VALID  TRAIN and VALID;
  UNLABELLED       `unlabelled` (or `unlabeled`) where the dataset has one,
                   as STL-10: its labels are read as -1 whatever is stored;
  TRAIN_AND_VALID_AND_UNLABELLED  TRAIN_AND_VALID, then UNLABELLED.
So Imagenette (train, validation) tests on validation and holds VALID out
of train, CIFAR-10 (train, test) likewise, and a dataset with train,
validation and test uses each for its namesake.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np

from byol.data import encoded
from byol.data import registry
from byol.data import splits
from byol.data.splits import (DatasetError, DatasetNotFoundError, Split, tf,
                              tfds)

# (tfds split, first example, end) pieces of one of our splits.
Pieces = List[Tuple[str, int, int]]
# tfds' names of a split of images without labels (STL-10's is the first).
UNLABELLED_NAMES = ('unlabelled', 'unlabeled')


def _held_out(n: int) -> int:
  return max(1, n // 10)


class TfdsSource(registry.Source):
  """A tfds image-classification dataset (see the module doc)."""

  def __init__(self, name: str, builder, prepared: bool):
    self.name = name
    self.builder = builder
    self._prepared = prepared
    features = builder.info.features
    keys = builder.info.supervised_keys
    image_key, label_key = (tuple(keys)[:2] if keys and len(keys) >= 2 and
                            all(isinstance(k, str) for k in keys[:2])
                            else ('image', 'label'))
    names = list(features.keys()) if hasattr(features, 'keys') else []
    if image_key not in names or not isinstance(features[image_key],
                                                tfds.features.Image):
      raise DatasetError(
          f'{name} is not an image-classification dataset: it has no image '
          f'feature {image_key!r} (features: {", ".join(names) or "none"})')
    if label_key not in names or not isinstance(features[label_key],
                                                tfds.features.ClassLabel):
      raise DatasetError(
          f'{name} is not an image-classification dataset: it has no class '
          f'label {label_key!r} (features: {", ".join(names)})')
    self.image_key, self.label_key = image_key, label_key
    label = features[label_key]
    self.class_names = tuple(label.names) if label.names else tuple(
        str(i) for i in range(label.num_classes))
    if len(self.class_names) < 2:
      raise DatasetError(f'{name} has {len(self.class_names)} class; a '
                         'classification dataset needs two or more')
    self.image_shape = tuple(features[image_key].shape)

  @classmethod
  def from_name(cls, name: str, tfds_name: str, data_dir) -> 'TfdsSource':
    try:
      builder = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetNotFoundError(
          f'{name}: tfds has no dataset {tfds_name!r} '
          f'({type(e).__name__}: {splits.first_line(e, 100)})') from None
    return cls(name, builder, prepared=False)

  @classmethod
  def from_directory(cls, name: str, path: str) -> 'TfdsSource':
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(path, 'dataset_info.json')):
      raise DatasetNotFoundError(
          f'{name}: {path} is not a prepared tfds dataset folder (no '
          'dataset_info.json; name the folder of one version, e.g. '
          '.../NAME/1.0.0)')
    try:
      builder = tfds.builder_from_directory(path)
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetError(f'{name}: tfds cannot read {path} '
                         f'({splits.first_line(e, 100)})') from None
    return cls(name, builder, prepared=True)

  def _prepare(self) -> None:
    """Prepares the dataset once (download where the network allows)."""
    if self._prepared:
      return
    if not self.builder.is_prepared():
      try:
        self.builder.download_and_prepare()
      except Exception as e:  # pylint: disable=broad-except
        raise DatasetNotFoundError(
            f'{self.name} is not prepared in {self.builder.data_dir_root} '
            f'and tfds could not prepare it ({type(e).__name__}: '
            f'{splits.first_line(e, 100)}); prepare it on a networked '
            'machine and copy it here (data.data_dir, or tfds_dir:PATH)'
        ) from None
    self._prepared = True

  @property
  def split_pieces(self) -> Dict[Split, Pieces]:
    self._prepare()
    sizes = {k: v.num_examples for k, v in self.builder.info.splits.items()}
    if 'train' not in sizes:
      raise DatasetError(f'{self.name} has no train split (its splits: '
                         f'{", ".join(sorted(sizes))})')
    n = sizes['train']
    begin = 0
    if 'test' in sizes:
      test = [('test', 0, sizes['test'])]
    elif 'validation' in sizes:
      test = [('validation', 0, sizes['validation'])]
    else:
      begin = _held_out(n)
      test = [('train', 0, begin)]
    if 'test' in sizes and 'validation' in sizes:
      valid = [('validation', 0, sizes['validation'])]
    else:
      end = begin + _held_out(n - begin)
      valid = [('train', begin, end)]
      begin = end
    if begin >= n:
      raise DatasetError(f'{self.name} has {n} train examples: too few to '
                         'hold VALID and TEST out')
    train = [('train', begin, n)]
    pieces = {Split.TEST: test, Split.VALID: valid, Split.TRAIN: train,
              Split.TRAIN_AND_VALID: sorted(valid + train,
                                            key=lambda p: (p[0] != 'train',
                                                           p[1]))}
    unlabelled = next((u for u in UNLABELLED_NAMES if u in sizes), None)
    if unlabelled is not None:
      pieces[Split.UNLABELLED] = [(unlabelled, 0, sizes[unlabelled])]
      pieces[Split.TRAIN_AND_VALID_AND_UNLABELLED] = (
          pieces[Split.TRAIN_AND_VALID] + pieces[Split.UNLABELLED])
    return pieces

  def _pieces(self, split: Split) -> Pieces:
    split = splits.as_split(split)
    pieces = self.split_pieces
    if split not in pieces:
      raise DatasetError(
          f'{self.name} has no {split.name} split (its tfds splits: '
          f'{", ".join(sorted(self.builder.info.splits.keys()))})')
    return pieces[split]

  def num_examples(self, split: Split) -> int:
    return sum(e - b for _, b, e in self._pieces(split))

  def _specs(self, pieces: Pieces, begin: int, end: int) -> List[str]:
    """tfds split strings of positions [begin, end) of `pieces`: one of the
    labelled splits, then one of the unlabelled split (either may be
    absent), so that the labels of the second can be replaced."""
    labelled, unlabelled, offset = [], [], 0
    for tfds_split, b, e in pieces:
      lo, hi = max(begin, offset), min(end, offset + e - b)
      if lo < hi:
        part = f'{tfds_split}[{b + lo - offset}:{b + hi - offset}]'
        (unlabelled if tfds_split in UNLABELLED_NAMES else
         labelled).append(part)
      offset += e - b
    return ['+'.join(labelled), '+'.join(unlabelled)]

  def _read(self, pieces: Pieces, begin: int, end: int, deterministic: bool,
            seed: int):
    """(encoded image, int32 label) records of positions [begin, end) of
    `pieces`; an unlabelled split's labels are -1 (`splits.NO_LABEL`)."""
    out = None
    for spec, labelled in zip(self._specs(pieces, begin, end), (True, False)):
      if not spec:
        continue
      ds = self.builder.as_dataset(
          split=spec, decoders={self.image_key: tfds.decode.SkipDecoding()},
          shuffle_files=not deterministic,
          read_config=tfds.ReadConfig(shuffle_seed=seed))
      if labelled:
        ds = ds.map(lambda ex: (ex[self.image_key],
                                tf.cast(ex[self.label_key], tf.int32)))
      else:
        # Whatever the builder stored (STL-10: -1), these have no label.
        ds = ds.map(lambda ex: (ex[self.image_key],
                                tf.constant(splits.NO_LABEL, tf.int32)))
      out = ds if out is None else out.concatenate(ds)
    return out

  def labels(self, split: Split) -> np.ndarray:
    pieces = self._pieces(split)
    ds = self._read(pieces, 0, self.num_examples(split), True, 0)
    ds = ds.map(lambda image, label: label).batch(4096)
    return np.concatenate([b for b in ds.as_numpy_iterator()] or
                          [np.zeros([0], np.int32)])

  def records(self, split, process_index, process_count, deterministic,
              seed, subset=None):
    pieces = self._pieces(split)
    count = self.num_examples(split)
    # A subset is chosen by position: the file order must be the fixed one.
    deterministic = deterministic or subset is not None
    begin, end = splits.shard_range(0, count, process_index, process_count)
    if end <= begin:
      return None, 0, 0
    ds = self._read(pieces, begin, end, deterministic, seed)
    n, max_shard = end - begin, -(-count // process_count)
    if subset is not None:
      local = subset[(subset >= begin) & (subset < end)] - begin
      ds = encoded.keep_positions(ds, local)
      n = max_shard = len(local)
    return ds, n, max_shard
