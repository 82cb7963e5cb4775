"""Input pipelines (tf.data on the host) for BYOL pretraining and evaluation.

Three datasets share one interface, `load(split, preprocess_mode=..., ...)`,
which yields dicts of numpy arrays shaped `batch_dims + [...]`:

  imagenet2012   through tfds; the user places the ILSVRC2012 archives in tfds'
                 manual dir and tfds prepares the dataset on the first load.
  fashion_mnist  the offline default: the four original idx `.gz` files, read
                 with numpy from `data_dir`, else `$BYOL_FASHION_MNIST_DIR`,
                 else Debian's `/usr/share/datasets/fashion-mnist/`; failing
                 that, tfds' own copy (downloaded only when no folder was
                 named).
  mock           the imagenet2012 code path fed by `tfds.testing.mock_data`:
                 the same builder, decoders and JPEG crops run on random JPEGs.
                 Inside a caller's `tfds.testing.mock_data(...)` context the
                 caller's settings apply; otherwise `load` enters
                 `mock_data(num_examples=MOCK_NUM_EXAMPLES)` by itself. Mocked
                 tfds ignores split slicing, so every split and every process
                 sees the same mocked examples; evaluation padding therefore
                 uses the mocked stream's own length.

The host does only what needs the source image: decoding and random resized
crops (two independent ones per example for pretraining). Flips, colour
jitter, blur and solarization run on the accelerator (`byol.augmentations`),
and so does normalization (`normalize`).

Determinism and exact resumption. Every random choice is a stateless function
of the seed: the order of an epoch is a function of (seed, process, epoch), a
crop of (seed, process, stream position) -- for fashion_mnist, whose crops are
sampled a batch at a time, of (seed, process, batch index). `start_step=k`
therefore starts the stream at epoch `k*B // n` and position `k*B % n` of that
epoch (B the process batch, n the shard size) and yields exactly what a fresh
stream yields after k batches; the skipped examples are neither decoded nor
cropped (for imagenet2012 the skipped part of the current epoch is still read
from disk, in its undecoded form). With `deterministic=True`, tf.data keeps its
element order too, so two loads with one seed give identical batches.
"""

from __future__ import annotations

import enum
import functools
import gzip
import importlib
import inspect
import math
import os
import types
from typing import Iterator, Mapping, Optional, Sequence, Tuple, Union

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

Batch = Mapping[str, np.ndarray]

DATASETS = ('imagenet2012', 'fashion_mnist', 'mock')

FASHION_MNIST_ENV = 'BYOL_FASHION_MNIST_DIR'
FASHION_MNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist/'
FASHION_MNIST_FILES = {
    'train_images': 'train-images-idx3-ubyte.gz',
    'train_labels': 'train-labels-idx1-ubyte.gz',
    'test_images': 't10k-images-idx3-ubyte.gz',
    'test_labels': 't10k-labels-idx1-ubyte.gz',
}

# Number of examples per split when `load` mocks tfds itself (dataset='mock'
# outside a caller's `tfds.testing.mock_data` context).
MOCK_NUM_EXAMPLES = 64

# ImageNet statistics (per RGB channel, images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fashion-MNIST's own statistics: the mean and (population) standard deviation
# of all 60,000 x 28 x 28 train pixels scaled to [0, 1], computed once with
# numpy from train-images-idx3-ubyte.gz (0.28604060, 0.35302424), and
# replicated to the three channels the gray images are given.
FASHION_MNIST_MEAN = (0.2860406,) * 3
FASHION_MNIST_STD = (0.3530242,) * 3

# Random-resized-crop ranges (Szegedy et al. 2015, as in BYOL): the crop covers
# a fraction U[0.08, 1] of the image area, with log(width / height) uniform.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3. / 4., 4. / 3.)
# Evaluation centre crop: image_size / (image_size + 32) of the shorter side
# (224 / 256 at 224 px), truncated.
EVAL_CROP_PADDING = 32

# Salts that make the random streams of one seed independent of each other.
_SALT_SHUFFLE, _SALT_VIEW1, _SALT_VIEW2, _SALT_LINEAR = 11, 23, 37, 41
_INT64_MAX = np.iinfo(np.int64).max


class DatasetError(errors.UserError, ValueError):
  """A user error about the input data (bad name, shape or setting)."""


class DatasetNotFoundError(DatasetError):
  """The requested dataset is not available on this machine."""


class Split(enum.Enum):
  """Splits as DeepMind's BYOL: VALID is held out of the train set."""
  TRAIN_AND_VALID = 1
  TRAIN = 2
  VALID = 3
  TEST = 4

  @classmethod
  def from_string(cls, name: str) -> 'Split':
    try:
      return cls[name.upper()]
    except KeyError:
      raise DatasetError(
          f'unknown split {name!r}; choose from '
          f'{", ".join(s.name.lower() for s in cls)}') from None


class PreprocessMode(enum.Enum):
  """PRETRAIN: two random crops; LINEAR_TRAIN: crop + flip; EVAL: centre."""
  PRETRAIN = 1
  LINEAR_TRAIN = 2
  EVAL = 3


# (tfds split name, first example, number of examples) of each split.
_IMAGENET_SPLITS = {
    Split.TRAIN_AND_VALID: ('train', 0, 1_281_167),
    Split.TRAIN: ('train', 10_000, 1_271_167),
    Split.VALID: ('train', 0, 10_000),
    Split.TEST: ('validation', 0, 50_000),
}
_FASHION_MNIST_SPLITS = {
    Split.TRAIN_AND_VALID: ('train', 0, 60_000),
    Split.TRAIN: ('train', 10_000, 50_000),
    Split.VALID: ('train', 0, 10_000),
    Split.TEST: ('test', 0, 10_000),
}


def _check_dataset(dataset: str) -> str:
  if dataset not in DATASETS:
    raise DatasetError(f'unknown dataset {dataset!r}; choose from '
                       f'{", ".join(DATASETS)}')
  return dataset


def _as_split(split: Union[Split, str]) -> Split:
  return split if isinstance(split, Split) else Split.from_string(split)


def num_examples(split: Union[Split, str],
                 dataset: str = 'imagenet2012') -> int:
  """The number of examples of `split` (over all processes).

  For 'mock' this is MOCK_NUM_EXAMPLES, what `load` mocks when no caller's
  `tfds.testing.mock_data` context is active.
  """
  split = _as_split(split)
  if _check_dataset(dataset) == 'fashion_mnist':
    return _FASHION_MNIST_SPLITS[split][2]
  if dataset == 'mock':
    return MOCK_NUM_EXAMPLES
  return _IMAGENET_SPLITS[split][2]


def num_classes(dataset: str = 'imagenet2012') -> int:
  """The number of label classes of `dataset`."""
  return 10 if _check_dataset(dataset) == 'fashion_mnist' else 1000


def normalization_stats(dataset: str) -> Tuple[np.ndarray, np.ndarray]:
  """Per-channel (mean, std) float32 arrays of shape [3]."""
  if _check_dataset(dataset) == 'fashion_mnist':
    mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
  else:
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def normalize(images, dataset: str):
  """(images - mean) / std over the last (channel) axis.

  Works on numpy arrays and on jax arrays inside jit/pmap alike: the
  statistics are numpy constants, so the result has the type of `images`.
  """
  mean, std = normalization_stats(dataset)
  return (images - mean) / std


def _shard_range(start: int, count: int, process_index: int,
                 process_count: int) -> Tuple[int, int]:
  """[begin, end) of the process's contiguous shard (as tfds.even_splits)."""
  begin = start + count * process_index // process_count
  end = start + count * (process_index + 1) // process_count
  return begin, end


def _seed_base(seed: int, process_index: int, salt: int) -> int:
  """One int32-range key per (seed, process, stream); the second word of a
  stateless seed then carries the position, epoch or batch index."""
  return (seed * 1_000_003 + process_index * 7_919 + salt) % (2**31 - 1)


def _stateless_seed(seed: int, process_index: int, salt: int, counter):
  """A [2] stateless-op seed: the stream's key and a position, epoch or
  batch index (a scalar int64 tensor)."""
  return tf.stack([tf.constant(_seed_base(seed, process_index, salt), tf.int64),
                   tf.cast(counter, tf.int64)])


def sample_crop_boxes(
    seed, height, width, num_boxes: int = 1, *,
    area_range: Sequence[float] = CROP_AREA_RANGE,
    aspect_ratio_range: Sequence[float] = CROP_ASPECT_RATIO_RANGE
) -> tf.Tensor:
  """Samples random-resized-crop windows, statelessly, as DeepMind's BYOL.

  One draw per box, no retries: an area fraction uniform in `area_range` and
  a log aspect ratio (width / height) uniform between the logs of
  `aspect_ratio_range` give the sides sqrt(area * ratio) and
  sqrt(area / ratio), rounded (half to even, as `tf.round`); a side longer
  than the image is cut to the image's. So on a 375 x 500 image about a
  quarter of the crops span the full height or width, and on elongated
  images many crops leave the aspect range. The offset is uniform over the
  positions that keep the box inside the image. Sides are at least 1 pixel
  (which matters only for images of a few pixels).

  Args:
    seed: a stateless seed, shape [2] integer.
    height: image height(s), a scalar or a [num_boxes] integer vector.
    width: image width(s), like `height`.
    num_boxes: how many boxes to draw.
    area_range: (min, max) fraction of the image area.
    aspect_ratio_range: (min, max) of width / height.

  Returns:
    int32 [num_boxes, 4] boxes (offset_y, offset_x, crop_height, crop_width).
  """
  height = tf.broadcast_to(tf.cast(height, tf.float32), [num_boxes])
  width = tf.broadcast_to(tf.cast(width, tf.float32), [num_boxes])
  u = tf.random.stateless_uniform([num_boxes, 4], seed=seed)
  area = height * width * (area_range[0] +
                           (area_range[1] - area_range[0]) * u[:, 0])
  log_lo = math.log(aspect_ratio_range[0])
  log_hi = math.log(aspect_ratio_range[1])
  ratio = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])
  crop_w = tf.clip_by_value(tf.round(tf.sqrt(area * ratio)), 1., width)
  crop_h = tf.clip_by_value(tf.round(tf.sqrt(area / ratio)), 1., height)
  # u < 1, but u * n can round up to n in float32 for large n: hence the min.
  off_y = tf.minimum(tf.floor(u[:, 2] * (height - crop_h + 1)),
                     height - crop_h)
  off_x = tf.minimum(tf.floor(u[:, 3] * (width - crop_w + 1)), width - crop_w)
  return tf.cast(tf.stack([off_y, off_x, crop_h, crop_w], axis=-1), tf.int32)


def centre_crop_box(height, width, image_size: int = 224) -> tf.Tensor:
  """The evaluation crop of an image (or of many), as DeepMind's BYOL.

  A square of side int(image_size / (image_size + 32) * shorter side), the
  product truncated (224 / 256 = 0.875 at 224 px; computed in integers, so
  exactly), at offset ((side of the image - crop side) + 1) // 2 on each
  axis.

  Args:
    height: image height(s), an integer scalar or tensor.
    width: image width(s), broadcastable with `height`.
    image_size: the output size the crop is resized to.

  Returns:
    int32 [..., 4] boxes (offset_y, offset_x, side, side).
  """
  height = tf.cast(height, tf.int64)
  width = tf.cast(width, tf.int64)
  side = (image_size * tf.minimum(height, width)) // (
      image_size + EVAL_CROP_PADDING)
  side = tf.maximum(side, 1)
  box = tf.stack([(height - side + 1) // 2, (width - side + 1) // 2,
                  side, side], axis=-1)
  return tf.cast(box, tf.int32)


# ---------------------------------------------------------------------------
# Fashion-MNIST: in-memory arrays, crops resized a batch at a time.


def _read_idx(path: str) -> np.ndarray:
  """Reads one gzipped idx file (uint8 data) into a numpy array."""
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise DatasetError(f'{path} is not an idx file of unsigned bytes')
  ndim = raw[3]
  dims = np.frombuffer(raw, '>u4', count=ndim, offset=4).astype(int)
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise DatasetError(f'{path} is truncated or corrupt: header says '
                       f'{tuple(dims)}, found {data.size} values')
  return data.reshape(dims)


def _first_line(error: BaseException, limit: int = 160) -> str:
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return text[:limit]


@functools.lru_cache(maxsize=4)
def _fashion_mnist_arrays(folder: str, tfds_data_dir: Optional[str],
                          download: bool) -> Mapping[str, np.ndarray]:
  """Decoded Fashion-MNIST (uint8 [N, 28, 28] images, int32 labels), cached."""
  paths = {k: os.path.join(folder, f) for k, f in FASHION_MNIST_FILES.items()}
  if all(os.path.isfile(p) for p in paths.values()):
    arrays = {k: _read_idx(p) for k, p in paths.items()}
    for part, count in (('train', 60_000), ('test', 10_000)):
      images, labels = arrays[f'{part}_images'], arrays[f'{part}_labels']
      if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise DatasetError(
            f'unexpected Fashion-MNIST {part} shapes in {folder}: '
            f'{images.shape} images, {labels.shape} labels')
      arrays[f'{part}_labels'] = labels.astype(np.int32)
    return arrays
  try:
    loaded = tfds.as_numpy(tfds.load(
        'fashion_mnist', split=['train', 'test'], batch_size=-1,
        as_supervised=True, data_dir=tfds_data_dir, download=download))
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetNotFoundError(
        f'fashion_mnist not found: no idx .gz files in {folder} and tfds '
        f'could not load it ({_first_line(e)}); install them with '
        '`apt-get install dataset-fashion-mnist` (or run '
        "`tfds.load('fashion_mnist')` once on a networked machine), or point "
        f'data_dir / ${FASHION_MNIST_ENV} at a folder holding the four idx '
        '.gz files') from None
  (train_x, train_y), (test_x, test_y) = loaded
  return {
      'train_images': train_x[..., 0], 'train_labels': train_y.astype(np.int32),
      'test_images': test_x[..., 0], 'test_labels': test_y.astype(np.int32)}


def _fashion_mnist_source(data_dir: Optional[str]) -> Mapping[str, np.ndarray]:
  # A folder named by the caller is read offline; only the default location
  # lets tfds download.
  folder = (data_dir or os.environ.get(FASHION_MNIST_ENV) or
            FASHION_MNIST_DEBIAN_DIR)
  return _fashion_mnist_arrays(folder, data_dir, download=not data_dir)


def _resize_boxes(boxes, source_size: int, image_size: int):
  """Normalised `crop_and_resize` boxes (in a 1-pixel-padded image) that
  reproduce a half-pixel-centred bilinear resize of each integer crop."""
  boxes = tf.cast(boxes, tf.float32)
  y, x, h, w = tf.unstack(boxes, axis=-1)
  scale = float(source_size + 1)  # padded side - 1
  half = 0.5 / image_size
  # Output pixel i samples crop coordinate (i + 0.5) * h / S - 0.5, plus 1
  # for the padding; the box names the first and last output samples.
  y1 = (y + half * h + 0.5) / scale
  y2 = (y + (1 - half) * h + 0.5) / scale
  x1 = (x + half * w + 0.5) / scale
  x2 = (x + (1 - half) * w + 0.5) / scale
  return tf.stack([y1, x1, y2, x2], axis=-1)


def _crop_resize_gray(images_u8, boxes, image_size: int):
  """Crops [B, s, s] uint8 images at integer boxes, resizes to image_size
  (bilinear), returns float32 RGB [B, S, S, 3] in [0, 1]."""
  source_size = images_u8.shape[1]
  images = tf.cast(images_u8, tf.float32)[..., None] / 255.
  # Edge padding makes samples that fall within half a pixel of the border
  # read the border pixel, as an ordinary (clamped) resize does.
  images = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode='SYMMETRIC')
  out = tf.image.crop_and_resize(
      images, _resize_boxes(boxes, source_size, image_size),
      tf.range(tf.shape(images)[0]), [image_size, image_size])
  out = tf.clip_by_value(out, 0., 1.)
  return tf.tile(out, [1, 1, 1, 3])


def _load_fashion_mnist(split, mode, batch_size, image_size, data_dir, seed,
                        process_index, process_count, start_step):
  arrays = _fashion_mnist_source(data_dir)
  part, start, count = _FASHION_MNIST_SPLITS[split]
  begin, end = _shard_range(start, count, process_index, process_count)
  images = tf.constant(arrays[f'{part}_images'][begin:end])
  labels = tf.constant(arrays[f'{part}_labels'][begin:end])
  n = end - begin
  source = int(images.shape[1])

  if mode == PreprocessMode.EVAL:
    padded = _eval_padded_size(-(-count // process_count), batch_size)
    whole = tf.constant([[0, 0, source, source]], tf.int32)

    def eval_batch(positions):
      mask = positions < n
      index = tf.minimum(positions, n - 1)
      out = _crop_resize_gray(
          tf.gather(images, index),
          tf.tile(whole, [tf.shape(index)[0], 1]), image_size)
      out = out * tf.cast(mask, tf.float32)[:, None, None, None]
      return {'images': out,
              'labels': tf.where(mask, tf.gather(labels, index), 0),
              'mask': tf.cast(mask, tf.float32)}

    ds = tf.data.Dataset.range(padded).batch(batch_size).skip(start_step)
    return ds.map(eval_batch, num_parallel_calls=tf.data.AUTOTUNE)

  if n == 0:
    raise DatasetError(f'process {process_index} of {process_count} has no '
                       f'examples of {split.name}')
  def epoch(epoch_index):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64),
        seed=_stateless_seed(seed, process_index, _SALT_SHUFFLE, epoch_index))
    return tf.data.Dataset.from_tensor_slices(order)

  start_pos = start_step * batch_size
  ds = tf.data.Dataset.range(start_pos // n, _INT64_MAX).flat_map(epoch)
  ds = ds.skip(start_pos % n).batch(batch_size, drop_remainder=True)
  ds = tf.data.Dataset.zip(ds, tf.data.Dataset.range(start_step, _INT64_MAX))

  def crops(index, batch_index, salt):
    key = _stateless_seed(seed, process_index, salt, batch_index)
    boxes = sample_crop_boxes(key, source, source, batch_size)
    return _crop_resize_gray(tf.gather(images, index), boxes, image_size)

  def train_batch(index, batch_index):
    if mode == PreprocessMode.PRETRAIN:
      return {'view1': crops(index, batch_index, _SALT_VIEW1),
              'view2': crops(index, batch_index, _SALT_VIEW2),
              'labels': tf.gather(labels, index)}
    out = crops(index, batch_index, _SALT_LINEAR)
    key = _stateless_seed(seed, process_index, _SALT_LINEAR + 1, batch_index)
    flip = tf.random.stateless_uniform([batch_size], seed=key) < 0.5
    out = tf.where(flip[:, None, None, None], out[:, :, ::-1], out)
    return {'images': out, 'labels': tf.gather(labels, index)}

  return ds.map(train_batch, num_parallel_calls=tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------
# ImageNet (and mock): per-example JPEG decoding with the crop.


def _decode_crop_resize(jpeg, box, image_size: int):
  """Decodes only the [y, x, h, w] window of a JPEG, resizes (bicubic)."""
  image = tf.io.decode_and_crop_jpeg(jpeg, box, channels=3)
  image = tf.image.resize(tf.cast(image, tf.float32) / 255.,
                          [image_size, image_size], method='bicubic')
  return tf.clip_by_value(image, 0., 1.)


def _random_crop(jpeg, key, image_size: int):
  shape = tf.image.extract_jpeg_shape(jpeg)
  box = sample_crop_boxes(key, shape[0], shape[1], 1)[0]
  return _decode_crop_resize(jpeg, box, image_size)


def _centre_crop(jpeg, image_size: int):
  shape = tf.image.extract_jpeg_shape(jpeg)
  box = centre_crop_box(shape[0], shape[1], image_size)
  return _decode_crop_resize(jpeg, box, image_size)


def _tfds_is_mocked() -> bool:
  """Whether a caller's `tfds.testing.mock_data` context is active.

  The mock patches DatasetBuilder's methods with functions of its own module;
  the class attribute is read statically (plain access builds a new wrapper
  each time).
  """
  method = inspect.getattr_static(tfds.core.DatasetBuilder, 'as_dataset')
  return getattr(method, '__module__', '').startswith(
      'tensorflow_datasets.testing')


_IMAGENET_ARCHIVES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


def _prepare_imagenet(builder) -> None:
  """Prepares imagenet2012 from the manual archives once, or says how."""
  if builder.is_prepared():
    return
  manual_dir = os.path.join(str(builder.data_dir_root), 'downloads', 'manual')
  missing = [f for f in _IMAGENET_ARCHIVES
             if not os.path.isfile(os.path.join(manual_dir, f))]
  if missing:
    raise DatasetNotFoundError(
        f'imagenet2012 is not prepared in {builder.data_dir_root} and '
        f'{", ".join(missing)} is missing from {manual_dir}: place both '
        'archives there (tfds prepares the dataset on the next run), set '
        'data_dir to a prepared tfds folder, or use dataset=fashion_mnist')
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetError(f'preparing imagenet2012 from {manual_dir} failed: '
                       f'{type(e).__name__}: {_first_line(e)}') from e


def _tfds_split(dataset, split, data_dir, process_index, process_count,
                deterministic, seed):
  """This process's shard of the imagenet2012 split, images undecoded.

  Returns (dataset, shard size, largest shard size over processes).
  """
  name, start, count = _IMAGENET_SPLITS[split]
  begin, end = _shard_range(start, count, process_index, process_count)
  kwargs = dict(split=f'{name}[{begin}:{end}]',
                decoders={'image': tfds.decode.SkipDecoding()},
                shuffle_files=not deterministic,
                read_config=tfds.ReadConfig(shuffle_seed=seed))
  if dataset == 'mock':
    if _tfds_is_mocked():
      ds = tfds.builder('imagenet2012').as_dataset(**kwargs)
    else:
      with tfds.testing.mock_data(num_examples=MOCK_NUM_EXAMPLES):
        ds = tfds.builder('imagenet2012').as_dataset(**kwargs)
    # Mocked tfds ignores the slice: every shard is the whole mock.
    n = int(ds.cardinality())
    if n < 0:
      raise DatasetError('the mocked imagenet2012 stream has no known length; '
                         'give the mock a finite cardinality')
    return ds, n, n
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  _prepare_imagenet(builder)
  return builder.as_dataset(**kwargs), end - begin, -(-count // process_count)


def _load_imagenet(dataset, split, mode, batch_size, image_size, data_dir,
                   seed, deterministic, process_index, process_count,
                   start_step):
  ds, n, max_shard = _tfds_split(dataset, split, data_dir, process_index,
                                 process_count, deterministic, seed)
  if n <= 0:
    raise DatasetError(f'process {process_index} of {process_count} has no '
                       f'examples of {split.name}')
  ds = ds.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)))

  if mode == PreprocessMode.EVAL:
    ds = ds.map(lambda jpeg, label: {
        'images': _centre_crop(jpeg, image_size), 'labels': label,
        'mask': tf.constant(1., tf.float32)},
                num_parallel_calls=tf.data.AUTOTUNE)
    pad = _eval_padded_size(max_shard, batch_size) - n
    blank = {'images': tf.zeros([image_size, image_size, 3], tf.float32),
             'labels': tf.constant(0, tf.int32),
             'mask': tf.constant(0., tf.float32)}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(pad))
    return ds.batch(batch_size, drop_remainder=True).skip(start_step)

  # Shuffle buffer: what DeepMind's BYOL used (10 batches), within bounds that
  # keep the undecoded JPEGs (~110 kB each) in a few GB of host memory.
  buffer = int(min(max(10 * batch_size, 1_000), 20_000, n))
  shuffle_key = _seed_base(seed, process_index, _SALT_SHUFFLE)

  def epoch(epoch_index):
    return ds.shuffle(buffer, seed=shuffle_key * 1_000_003 + epoch_index,
                      reshuffle_each_iteration=False)

  start_pos = start_step * batch_size
  stream = tf.data.Dataset.range(start_pos // n, _INT64_MAX).flat_map(epoch)
  stream = stream.skip(start_pos % n)
  stream = tf.data.Dataset.zip(stream,
                               tf.data.Dataset.range(start_pos, _INT64_MAX))

  def key(position, salt):
    return _stateless_seed(seed, process_index, salt, position)

  def pretrain(example, position):
    jpeg, label = example
    crop = lambda salt: _random_crop(jpeg, key(position, salt), image_size)
    return {'view1': crop(_SALT_VIEW1), 'view2': crop(_SALT_VIEW2),
            'labels': label}

  def linear_train(example, position):
    jpeg, label = example
    image = _random_crop(jpeg, key(position, _SALT_LINEAR), image_size)
    flip = tf.random.stateless_uniform(
        [], seed=key(position, _SALT_LINEAR + 1)) < 0.5
    image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
    return {'images': image, 'labels': label}

  fn = pretrain if mode == PreprocessMode.PRETRAIN else linear_train
  stream = stream.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
  return stream.batch(batch_size, drop_remainder=True)


# ---------------------------------------------------------------------------


def _eval_padded_size(largest_shard: int, batch_size: int) -> int:
  """Examples per process after padding: the largest shard rounded up to
  whole batches, so that every process yields the same number of batches."""
  return -(-largest_shard // batch_size) * batch_size


def _hide_accelerators_from_tf():
  # tf.data runs on the host; keep TensorFlow off the accelerators JAX uses.
  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except (RuntimeError, ValueError):
    pass  # Already initialised, or no such device type.


def load(split: Union[Split, str], *,
         preprocess_mode: PreprocessMode,
         batch_dims: Sequence[int],
         dataset: str = 'imagenet2012',
         image_size: int = 224,
         data_dir: Optional[str] = None,
         seed: int = 0,
         deterministic: bool = False,
         process_index: Optional[int] = None,
         process_count: Optional[int] = None,
         start_step: int = 0) -> Iterator[Batch]:
  """Yields batches of this process's shard of `split`.

  Args:
    split: a `Split` (or its name).
    preprocess_mode: PRETRAIN yields {'view1', 'view2', 'labels'} (two
      independent random resized crops); LINEAR_TRAIN {'images', 'labels'}
      (random resized crop and flip); EVAL {'images', 'labels', 'mask'}
      (centre crop; for fashion_mnist the whole image, resized), which visits
      every example exactly once over all processes, the last batches padded
      with mask 0 (and zero images).
    batch_dims: leading dimensions of every array, e.g. [local_devices,
      per_device_batch]; their product is this process's batch.
    dataset: 'imagenet2012', 'fashion_mnist' or 'mock'.
    image_size: side of the square output images.
    data_dir: tfds data dir (imagenet2012); for fashion_mnist the folder with
      the idx .gz files (read offline; also tried as a tfds data dir).
    seed: seed of every random choice.
    deterministic: identical batches on every load with the same arguments.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    start_step: start where a fresh stream would be after this many batches.

  Returns:
    An iterator of dicts of numpy arrays: images float32 in [0, 1] of shape
    batch_dims + [image_size, image_size, 3], labels int32 of shape
    batch_dims (mask float32, 1 for real examples).

  Raises:
    DatasetError: bad arguments; DatasetNotFoundError when the data is absent.
  """
  dataset = _check_dataset(dataset)
  split = _as_split(split)
  if not isinstance(preprocess_mode, PreprocessMode):
    raise DatasetError(f'preprocess_mode must be a PreprocessMode, got '
                       f'{preprocess_mode!r}')
  batch_dims = list(batch_dims)
  if not batch_dims or any(not isinstance(d, (int, np.integer)) or d < 1
                           for d in batch_dims):
    raise DatasetError(f'batch_dims must be a non-empty list of positive '
                       f'integers, got {batch_dims}')
  batch_size = int(np.prod(batch_dims))
  if not isinstance(image_size, (int, np.integer)) or image_size < 1:
    raise DatasetError(f'image_size must be a positive integer, got '
                       f'{image_size!r}')
  if start_step < 0:
    raise DatasetError(f'start_step must be >= 0, got {start_step}')
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise DatasetError(f'process_index {process_index} is not in '
                       f'[0, {process_count})')
  data_dir = data_dir or None
  _hide_accelerators_from_tf()

  if dataset == 'fashion_mnist':
    ds = _load_fashion_mnist(split, preprocess_mode, batch_size, image_size,
                             data_dir, seed, process_index, process_count,
                             start_step)
  else:
    ds = _load_imagenet(dataset, split, preprocess_mode, batch_size,
                        image_size, data_dir, seed, deterministic,
                        process_index, process_count, start_step)

  def reshape(batch):
    return {k: tf.reshape(v, batch_dims + v.shape[1:].as_list())
            for k, v in batch.items()}

  ds = ds.map(reshape).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  # Evaluation keeps its order (the padding comes last) at little cost.
  options.deterministic = (deterministic or
                           preprocess_mode == PreprocessMode.EVAL)
  # One thread per map call, parallel calls across cores: avoids the
  # oversubscription of nested thread pools on small hosts.
  options.threading.max_intra_op_parallelism = 1
  ds = ds.with_options(options)
  return ds.as_numpy_iterator()
