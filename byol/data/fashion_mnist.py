"""Fashion-MNIST: the idx files, and its tf.data pipeline over in-memory arrays.

The four original idx `.gz` files are read with numpy from `data_dir`, else
`$BYOL_FASHION_MNIST_DIR`, else Debian's `/usr/share/datasets/fashion-mnist/`;
failing that, from tfds' own copy (downloaded only when no folder was named).
The decoded arrays stay in memory; crops are sampled and resized a batch at a
time, so a crop is a function of (seed, process, batch index).
"""

from __future__ import annotations

import functools
import gzip
import os
from typing import Mapping, Optional

import numpy as np

from byol.data import crops
from byol.data import splits
from byol.data.splits import tf, tfds

FASHION_MNIST_ENV = 'BYOL_FASHION_MNIST_DIR'
FASHION_MNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist/'
FASHION_MNIST_FILES = {
    'train_images': 'train-images-idx3-ubyte.gz',
    'train_labels': 'train-labels-idx1-ubyte.gz',
    'test_images': 't10k-images-idx3-ubyte.gz',
    'test_labels': 't10k-labels-idx1-ubyte.gz',
}


def read_idx(path: str) -> np.ndarray:
  """Reads one gzipped idx file (uint8 data) into a numpy array."""
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise splits.DatasetError(f'{path} is not an idx file of unsigned bytes')
  ndim = raw[3]
  dims = np.frombuffer(raw, '>u4', count=ndim, offset=4).astype(int)
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise splits.DatasetError(f'{path} is truncated or corrupt: header says '
                              f'{tuple(dims)}, found {data.size} values')
  return data.reshape(dims)


@functools.lru_cache(maxsize=4)
def _arrays(folder: str, tfds_data_dir: Optional[str],
            download: bool) -> Mapping[str, np.ndarray]:
  """Decoded Fashion-MNIST (uint8 [N, 28, 28] images, int32 labels), cached."""
  paths = {k: os.path.join(folder, f) for k, f in FASHION_MNIST_FILES.items()}
  if all(os.path.isfile(p) for p in paths.values()):
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for part, count in (('train', 60_000), ('test', 10_000)):
      images, labels = arrays[f'{part}_images'], arrays[f'{part}_labels']
      if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise splits.DatasetError(
            f'unexpected Fashion-MNIST {part} shapes in {folder}: '
            f'{images.shape} images, {labels.shape} labels')
      arrays[f'{part}_labels'] = labels.astype(np.int32)
    return arrays
  try:
    loaded = tfds.as_numpy(tfds.load(
        'fashion_mnist', split=['train', 'test'], batch_size=-1,
        as_supervised=True, data_dir=tfds_data_dir, download=download))
  except Exception as e:  # pylint: disable=broad-except
    raise splits.DatasetNotFoundError(
        f'fashion_mnist not found: no idx .gz files in {folder} and tfds '
        f'could not load it ({splits.first_line(e)}); install them with '
        '`apt-get install dataset-fashion-mnist` (or run '
        "`tfds.load('fashion_mnist')` once on a networked machine), or point "
        f'data_dir / ${FASHION_MNIST_ENV} at a folder holding the four idx '
        '.gz files') from None
  (train_x, train_y), (test_x, test_y) = loaded
  return {
      'train_images': train_x[..., 0], 'train_labels': train_y.astype(np.int32),
      'test_images': test_x[..., 0], 'test_labels': test_y.astype(np.int32)}


def _source_arrays(data_dir: Optional[str]) -> Mapping[str, np.ndarray]:
  # A folder named by the caller is read offline; only the default location
  # lets tfds download.
  folder = (data_dir or os.environ.get(FASHION_MNIST_ENV) or
            FASHION_MNIST_DEBIAN_DIR)
  return _arrays(folder, data_dir, download=not data_dir)


def make_dataset(split, mode, batch_size, image_size, data_dir, seed,
                 process_index, process_count, start_step, subset=None):
  """This process's shard of `split` as a tf.data stream of unshaped batches.

  Arguments as `byol.dataset.load`'s, resolved (`split` a `Split`,
  `batch_size` the process batch); `load` shapes and finishes the stream.
  """
  arrays = _source_arrays(data_dir)
  part, start, count = splits.FASHION_MNIST_SPLITS[split]
  if subset is None:
    begin, end = splits.shard_range(start, count, process_index,
                                    process_count)
    rows = slice(begin, end)
  else:
    # A low-label subset (positions in the split): the processes share its
    # examples as they share a whole split.
    count = len(subset)
    begin, end = splits.shard_range(0, count, process_index, process_count)
    rows = start + np.asarray(subset[begin:end], np.int64)
  images = tf.constant(arrays[f'{part}_images'][rows])
  labels = tf.constant(arrays[f'{part}_labels'][rows])
  n = end - begin
  source = int(images.shape[1])

  if mode == splits.PreprocessMode.EVAL:
    padded = splits.eval_padded_size(-(-count // process_count), batch_size)
    whole = tf.constant([[0, 0, source, source]], tf.int32)

    def eval_batch(positions):
      mask = positions < n
      index = tf.minimum(positions, n - 1)
      out = crops.crop_resize_gray(
          tf.gather(images, index),
          tf.tile(whole, [tf.shape(index)[0], 1]), image_size)
      out = out * tf.cast(mask, tf.float32)[:, None, None, None]
      return {'images': out,
              'labels': tf.where(mask, tf.gather(labels, index), 0),
              'mask': tf.cast(mask, tf.float32)}

    ds = tf.data.Dataset.range(padded).batch(batch_size).skip(start_step)
    return ds.map(eval_batch, num_parallel_calls=tf.data.AUTOTUNE)

  if n == 0:
    raise splits.DatasetError(f'process {process_index} of {process_count} '
                              f'has no examples of {split.name}')

  def key(salt, counter):
    return splits.stateless_seed(seed, process_index, salt, counter)

  def epoch(epoch_index):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=key(splits.SALT_SHUFFLE, epoch_index))
    return tf.data.Dataset.from_tensor_slices(order)

  start_pos = start_step * batch_size
  ds = tf.data.Dataset.range(start_pos // n, splits.INT64_MAX).flat_map(epoch)
  ds = ds.skip(start_pos % n).batch(batch_size, drop_remainder=True)
  ds = tf.data.Dataset.zip(
      ds, tf.data.Dataset.range(start_step, splits.INT64_MAX))

  def crop(index, batch_index, salt):
    boxes = crops.sample_crop_boxes(key(salt, batch_index), source, source,
                                    batch_size)
    return crops.crop_resize_gray(tf.gather(images, index), boxes, image_size)

  def train_batch(index, batch_index):
    if mode == splits.PreprocessMode.PRETRAIN:
      return {'view1': crop(index, batch_index, splits.SALT_VIEW1),
              'view2': crop(index, batch_index, splits.SALT_VIEW2),
              'labels': tf.gather(labels, index)}
    out = crop(index, batch_index, splits.SALT_LINEAR)
    flip_key = key(splits.SALT_LINEAR + 1, batch_index)
    flip = tf.random.stateless_uniform([batch_size], seed=flip_key) < 0.5
    out = tf.where(flip[:, None, None, None], out[:, :, ::-1], out)
    return {'images': out, 'labels': tf.gather(labels, index)}

  return ds.map(train_batch, num_parallel_calls=tf.data.AUTOTUNE)
