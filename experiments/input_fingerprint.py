"""SHA-256 of the first batches of every input stream, to compare two commits.

The registry (byol/data/registry.py) must leave `fashion_mnist` and the
imagenet2012 code path (exercised through `mock`) byte-for-byte as they were.
Run this script at two commits and compare its lines:

  python experiments/input_fingerprint.py            # at the new commit
  git archive de6e787 | tar -x -C /tmp/old && cd /tmp/old && \
      python /path/to/experiments/input_fingerprint.py

Each line names (dataset, split, mode, start step) and the SHA-256 of the
bytes of every array of its first `--batches` batches (keys sorted).
"""

import hashlib
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.getcwd())

_BATCHES = flags.DEFINE_integer('batches', 3, 'batches per stream')
_BATCH = flags.DEFINE_integer('batch_size', 16, 'examples per batch')


def fingerprint(dataset_lib, dataset, split, mode, start_step, batches,
                batch_size, image_size):
  """SHA-256 over the arrays of the first `batches` batches of one stream."""
  it = dataset_lib.load(
      split, preprocess_mode=mode, batch_dims=[2, batch_size // 2],
      dataset=dataset, image_size=image_size, seed=3, deterministic=True,
      process_index=0, process_count=1, start_step=start_step)
  digest = hashlib.sha256()
  for _ in range(batches):
    batch = next(it)
    for key in sorted(batch):
      digest.update(key.encode())
      digest.update(batch[key].tobytes())
  return digest.hexdigest()


def main(argv):
  del argv
  from byol import dataset as dataset_lib  # pylint: disable=g-import-not-at-top
  modes = dataset_lib.PreprocessMode
  cases = []
  for dataset, size in (('fashion_mnist', 32), ('mock', 64)):
    for split, mode, start in (('TRAIN_AND_VALID', modes.PRETRAIN, 0),
                               ('TRAIN_AND_VALID', modes.PRETRAIN, 5),
                               ('TRAIN', modes.LINEAR_TRAIN, 0),
                               ('TEST', modes.EVAL, 0)):
      cases.append((dataset, split, mode, start, size))
  for dataset, split, mode, start, size in cases:
    print(f'{dataset:14s} {split:16s} {mode.name:13s} start {start}: '
          f'{fingerprint(dataset_lib, dataset, split, mode, start, _BATCHES.value, _BATCH.value, size)}',
          flush=True)
  for dataset in ('fashion_mnist', 'mock'):
    mean, std = dataset_lib.normalization_stats(dataset)
    print(f'{dataset:14s} stats mean {mean.tolist()} std {std.tolist()} '
          f'classes {dataset_lib.num_classes(dataset)} train_and_valid '
          f'{dataset_lib.num_examples("TRAIN_AND_VALID", dataset)}')


if __name__ == '__main__':
  app.run(main)
