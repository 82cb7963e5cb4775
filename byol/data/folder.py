"""`folder:PATH`: a directory of image files, labelled or not.

Layouts (checked in this order):

  PATH/train/<class>/...  (+ PATH/test/<class>/..., or val/ or validation/)
                          labelled, with its own TEST split;
  PATH/<class>/...        labelled: one subfolder per class (two at least),
                          files anywhere below it;
  PATH/*.jpg              unlabelled: pretraining only (every label 0).

Beside the class folders (or train/), a folder `unlabelled/` (or
`unlabeled/`) holds images without labels, files anywhere below it: the
UNLABELLED split (label -1), which pretraining reads after TRAIN_AND_VALID
by default (STL-10's arrangement; `data.pretrain_split`).

Class names are the subfolder names, sorted; the label is the index. Files
are JPEG, PNG, GIF or BMP (any channel count: gray and RGBA become RGB);
every file is decoded once when the folder is first read, and a file that
does not decode (corrupt, truncated, not an image) is skipped and counted,
not fatal.

Held-out splits (a stated, deterministic rule): the images of the pool are
ordered by the SHA-1 of their path relative to PATH; without a test folder
the first max(1, round(n / 10)) are TEST; of the rest, the first max(1,
round(m / 10)) are VALID and the others TRAIN; TRAIN_AND_VALID is TRAIN and
VALID together. A file's split depends only on its path and the number of
files. Within a split the images are in the order of their paths, and each
process reads a contiguous shard of that list. `manifest()` lists them all.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, List, Tuple

import numpy as np

from byol.data import registry
from byol.data import splits
from byol.data.splits import DatasetError, DatasetNotFoundError, Split, tf

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')
TEST_FOLDERS = ('test', 'val', 'validation')
UNLABELLED_FOLDERS = ('unlabelled', 'unlabeled')
HELD_OUT_FRACTION = 0.1

Entry = Tuple[str, int]  # (path relative to the root, label)


def _walk(root: str) -> List[str]:
  """Every regular file below `root`, relative to it, sorted; hidden files
  and folders are left out."""
  found = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in names:
      if not name.startswith('.'):
        found.append(os.path.relpath(os.path.join(folder, name), root))
  return sorted(found)


def _subfolders(path: str) -> List[str]:
  return sorted(d for d in os.listdir(path)
                if not d.startswith('.') and os.path.isdir(os.path.join(path, d)))


def _readable(root: str, paths: List[str]) -> np.ndarray:
  """Which of `paths` TensorFlow decodes (bool per path): the check runs the
  decoder the input pipeline runs, so a kept file never fails later."""
  if not paths:
    return np.zeros([0], bool)
  full = [os.path.join(root, p) for p in paths]
  ds = tf.data.Dataset.from_tensor_slices(
      (tf.range(len(full), dtype=tf.int64), tf.constant(full)))

  def decode(index, path):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3,
                               expand_animations=False)
    return index, tf.reduce_min(tf.shape(image)[:2])

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.apply(tf.data.experimental.ignore_errors())
  ok = np.zeros([len(full)], bool)
  for index, side in ds.as_numpy_iterator():
    ok[index] = side > 0
  return ok


def _held_out_order(entries: List[Entry]) -> List[Entry]:
  return sorted(entries, key=lambda e: hashlib.sha1(e[0].encode()).hexdigest())


def _take(entries: List[Entry], what: str, name: str) -> int:
  count = max(1, int(round(len(entries) * HELD_OUT_FRACTION)))
  if count >= len(entries):
    raise DatasetError(f'{name} has {len(entries)} readable images: too few '
                       f'to hold {what} out (at least 3 are needed)')
  return count


class FolderSource(registry.Source):
  """The images of a folder (see the module doc)."""

  def __init__(self, name: str, path: str):
    self.name = name
    self.root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(self.root):
      raise DatasetNotFoundError(f'{name}: {self.root} is not a folder')
    self.skipped: List[str] = []
    self._unlabelled_dir = None
    self.layout, self.split_entries = self._scan()

  def _scan(self) -> Tuple[str, Dict[Split, List[Entry]]]:
    root = self.root
    subs = _subfolders(root)
    test_dir = next((d for d in TEST_FOLDERS if d in subs), None)
    unl_dir = next((d for d in UNLABELLED_FOLDERS if d in subs), None)
    unlabelled = []
    if unl_dir is not None and len(subs) > 1:
      unlabelled = self._keep([(os.path.join(unl_dir, p), splits.NO_LABEL)
                               for p in _walk(os.path.join(root, unl_dir))])
      subs.remove(unl_dir)
      self._unlabelled_dir = unl_dir
    else:
      unl_dir = None
    if 'train' in subs:
      layout = 'train/test' if test_dir else 'train'
      train_root = os.path.join(root, 'train')
      self.class_names = tuple(_subfolders(train_root))
      self._check_classes(train_root)
      pool = self._labelled('train')
      test = self._labelled(test_dir) if test_dir else None
      stray = [p for p in _walk(root)
               if p.split(os.sep)[0] not in ('train', test_dir, unl_dir)]
      self.skipped += [f'{p}: outside train/ and {test_dir}/' for p in stray]
    else:
      files = [p for p in _walk(root) if p.split(os.sep)[0] != unl_dir]
      nested = [p for p in files if os.sep in p]
      if subs and nested:
        layout = 'classes'
        self.class_names = tuple(
            s for s in subs if any(p.startswith(s + os.sep) for p in nested))
        self._check_classes(root)
        pool = self._labelled('')
        self.skipped += [f'{p}: not in a class folder'
                         for p in files if os.sep not in p]
        test = None
      else:
        layout = 'unlabelled'
        self.labelled = False
        self.class_names = ()
        pool = self._keep([(p, 0) for p in files])
        test = None
    if not pool:
      raise DatasetError(f'{self.name} holds no readable images '
                         f'({len(self.skipped)} files skipped)')
    if not self.labelled:
      return layout, {Split.TRAIN_AND_VALID: pool, Split.TRAIN: pool}
    order = _held_out_order(pool)
    if test is None:
      n_test = _take(order, 'TEST and VALID', self.name)
      test, order = order[:n_test], order[n_test:]
    n_valid = _take(order, 'VALID', self.name)
    valid, train = order[:n_valid], order[n_valid:]
    out = {Split.TEST: sorted(test), Split.VALID: sorted(valid),
           Split.TRAIN: sorted(train),
           Split.TRAIN_AND_VALID: sorted(train + valid)}
    if unlabelled:
      out[Split.UNLABELLED] = sorted(unlabelled)
      out[Split.TRAIN_AND_VALID_AND_UNLABELLED] = (
          out[Split.TRAIN_AND_VALID] + out[Split.UNLABELLED])
    return layout, out

  def _check_classes(self, class_root: str) -> None:
    if len(self.class_names) < 2:
      raise DatasetError(
          f'{self.name}: {class_root} has {len(self.class_names)} class '
          f'folder{"" if len(self.class_names) == 1 else "s"} '
          f'({", ".join(self.class_names) or "none"}); a labelled folder '
          'needs two or more, and unlabelled images go directly in the folder')

  def _labelled(self, sub: str) -> List[Entry]:
    """The readable images of `sub`/<class>/ (class names of the train
    root); an unknown class folder there is skipped with its files."""
    base = os.path.join(self.root, sub) if sub else self.root
    entries = []
    for rel in _walk(base):
      parts = rel.split(os.sep)
      if len(parts) < 2 or (not sub and parts[0] == self._unlabelled_dir):
        continue  # loose files: counted by the caller; unlabelled: read apart
      path = os.path.join(sub, rel) if sub else rel
      if parts[0] not in self.class_names:
        self.skipped.append(f'{path}: class {parts[0]!r} is not a train class')
        continue
      entries.append((path, self.class_names.index(parts[0])))
    return self._keep(entries)

  def _keep(self, entries: List[Entry]) -> List[Entry]:
    named = [e for e in entries
             if e[0].lower().endswith(IMAGE_EXTENSIONS)]
    self.skipped += [f'{p}: not an image file name' for p, _ in entries
                     if not p.lower().endswith(IMAGE_EXTENSIONS)]
    ok = _readable(self.root, [p for p, _ in named])
    self.skipped += [f'{p}: does not decode'
                     for (p, _), good in zip(named, ok) if not good]
    return [e for e, good in zip(named, ok) if good]

  def _entries(self, split: Split) -> List[Entry]:
    if split not in self.split_entries:
      if split not in splits.UNLABELLED_SPLITS:
        self.require_labels(f'the {split.name} split')
      raise DatasetError(f'{self.name} has no {split.name} split (images '
                         'without labels go in PATH/unlabelled/)')
    return self.split_entries[split]

  def num_examples(self, split: Split) -> int:
    return len(self._entries(splits.as_split(split)))

  def labels(self, split: Split) -> np.ndarray:
    return np.asarray([l for _, l in self._entries(split)], np.int32)

  def records(self, split, process_index, process_count, deterministic,
              seed, subset=None):
    del deterministic, seed  # a file list has one order
    entries = self._entries(split)
    if subset is not None:
      entries = [entries[i] for i in subset]
    count = len(entries)
    begin, end = splits.shard_range(0, count, process_index, process_count)
    shard = entries[begin:end]
    paths = [os.path.join(self.root, p) for p, _ in shard]
    labels = np.asarray([l for _, l in shard], np.int32)
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, tf.string), tf.constant(labels, tf.int32)))
    ds = ds.map(lambda path, label: (tf.io.read_file(path), label))
    return ds, len(shard), -(-count // process_count)

  def manifest(self, *args, **kwargs):
    out = super().manifest(*args, **kwargs)
    out.update(root=self.root, layout=self.layout, skipped=self.skipped,
               num_skipped=len(self.skipped),
               files={s.name: [[p, l] for p, l in e]
                      for s, e in self.split_entries.items()
                      if s != Split.TRAIN_AND_VALID_AND_UNLABELLED})
    return out
