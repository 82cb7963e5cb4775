"""The stream of encoded images (JPEG, PNG, ...) that every file source shares.

imagenet2012, any tfds image dataset and a folder of image files all arrive as
(encoded bytes, label) records; this module turns a process's records into
the pretraining, linear-training and evaluation batches of `byol.dataset.load`,
with the crops of `crops` and the seeds of `splits`. Only how an image is
decoded differs between sources: JPEG-only sources decode just the crop
window (`crops.random_crop`), the others decode any format to RGB first
(`random_crop_any`), so that gray and RGBA images come out as RGB.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from byol.data import crops
from byol.data import splits
from byol.data.splits import tf

# `crop(image_bytes, key, image_size)` and `centre(image_bytes, image_size)`.
CropFn = Callable[..., 'tf.Tensor']


def decode_rgb(image_bytes):
  """Any JPEG/PNG/GIF/BMP as uint8 RGB [H, W, 3]: gray is replicated to three
  channels, an alpha channel dropped (`decode_image(channels=3)`)."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _crop_resize(image, box, image_size: int):
  """The [y, x, h, w] window of a decoded uint8 image, resized (bicubic), as
  `crops` does for JPEGs: the same resize, the same clip."""
  window = tf.image.crop_to_bounding_box(image, box[0], box[1], box[2],
                                         box[3])
  out = tf.image.resize(tf.cast(window, tf.float32) / 255.,
                        [image_size, image_size], method='bicubic')
  return tf.clip_by_value(out, 0., 1.)


def random_crop_any(image_bytes, key, image_size: int):
  """A random resized crop (DeepMind's window) of an image of any format."""
  image = decode_rgb(image_bytes)
  shape = tf.shape(image)
  box = crops.sample_crop_boxes(key, shape[0], shape[1], 1)[0]
  return _crop_resize(image, box, image_size)


def centre_crop_any(image_bytes, image_size: int):
  """The evaluation centre crop of an image of any format, resized."""
  image = decode_rgb(image_bytes)
  shape = tf.shape(image)
  box = crops.centre_crop_box(shape[0], shape[1], image_size)
  return _crop_resize(image, box, image_size)


def keep_positions(ds, positions: np.ndarray):
  """The records of `ds` at the (sorted, local) `positions`, in their order.

  How a low-label subset is read from a source that can only be streamed:
  every record is read, those not kept are dropped before decoding.
  """
  table = tf.lookup.StaticHashTable(
      tf.lookup.KeyValueTensorInitializer(
          tf.constant(np.asarray(positions, np.int64)),
          tf.ones([len(positions)], tf.int64)), default_value=0)
  ds = ds.enumerate().filter(lambda i, _: table.lookup(i) > 0)
  return ds.map(lambda _, record: record)


def make_stream(ds, n: int, max_shard: int, mode, batch_size: int,
                image_size: int, seed: int, process_index: int,
                start_step: int, *, random_crop: CropFn = crops.random_crop,
                centre_crop: CropFn = crops.centre_crop):
  """Batches of this process's (image bytes, int32 label) records `ds`.

  Args:
    ds: this process's records, in a fixed order when input must be
      deterministic.
    n: the number of records of `ds`.
    max_shard: the largest number of records of any process (evaluation
      pads every process to the same number of batches).
    mode: a `PreprocessMode`.
    batch_size: the process batch.
    image_size: side of the output images.
    seed: seed of every random choice.
    process_index: this process (part of every random key).
    start_step: start where a fresh stream would be after this many batches.
    random_crop: decodes and crops an image at a random window.
    centre_crop: decodes and centre-crops an image.

  Returns:
    A tf.data stream of unshaped batches (`byol.dataset.load` shapes them).
  """
  if mode == splits.PreprocessMode.EVAL:
    ds = ds.map(lambda image, label: {
        'images': centre_crop(image, image_size), 'labels': label,
        'mask': tf.constant(1., tf.float32)},
                num_parallel_calls=tf.data.AUTOTUNE)
    pad = splits.eval_padded_size(max_shard, batch_size) - n
    blank = {'images': tf.zeros([image_size, image_size, 3], tf.float32),
             'labels': tf.constant(0, tf.int32),
             'mask': tf.constant(0., tf.float32)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(pad))
    return ds.batch(batch_size, drop_remainder=True).skip(start_step)

  # Shuffle buffer: what DeepMind's BYOL used (10 batches), within bounds that
  # keep the undecoded JPEGs (~110 kB each) in a few GB of host memory.
  buffer = int(min(max(10 * batch_size, 1_000), 20_000, n))
  shuffle_key = splits.seed_base(seed, process_index, splits.SALT_SHUFFLE)

  def epoch(epoch_index):
    return ds.shuffle(buffer, seed=shuffle_key * 1_000_003 + epoch_index,
                      reshuffle_each_iteration=False)

  start_pos = start_step * batch_size
  stream = tf.data.Dataset.range(start_pos // n, splits.INT64_MAX)
  stream = stream.flat_map(epoch).skip(start_pos % n)
  stream = tf.data.Dataset.zip(
      stream, tf.data.Dataset.range(start_pos, splits.INT64_MAX))

  def key(position, salt):
    return splits.stateless_seed(seed, process_index, salt, position)

  def pretrain(example, position):
    image, label = example
    crop = lambda salt: random_crop(image, key(position, salt), image_size)
    return {'view1': crop(splits.SALT_VIEW1), 'view2': crop(splits.SALT_VIEW2),
            'labels': label}

  def linear_train(example, position):
    image, label = example
    out = random_crop(image, key(position, splits.SALT_LINEAR), image_size)
    flip = tf.random.stateless_uniform(
        [], seed=key(position, splits.SALT_LINEAR + 1)) < 0.5
    out = tf.cond(flip, lambda: out[:, ::-1], lambda: out)
    return {'images': out, 'labels': label}

  fn = pretrain if mode == splits.PreprocessMode.PRETRAIN else linear_train
  stream = stream.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  return stream.batch(batch_size, drop_remainder=True)
