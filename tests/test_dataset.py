"""Tests of byol.dataset: split sizes, crops, sharding, determinism, resume."""

import collections
import hashlib
import math
import os

import chex
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from byol import dataset
from byol import errors
from byol.data import crops
from byol.data import fashion_mnist
from byol.data import splits

Split, Mode = dataset.Split, dataset.PreprocessMode

_FASHION_DIR = (os.environ.get(fashion_mnist.FASHION_MNIST_ENV) or
                fashion_mnist.FASHION_MNIST_DEBIAN_DIR)
needs_fashion_mnist = pytest.mark.skipif(
    not all(os.path.isfile(os.path.join(_FASHION_DIR, f))
            for f in fashion_mnist.FASHION_MNIST_FILES.values()),
    reason=f'Fashion-MNIST idx files not in {_FASHION_DIR} '
           '(apt-get install dataset-fashion-mnist)')


def _fashion(split, mode, batch_dims, **kwargs):
  kwargs.setdefault('image_size', 24)
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  return dataset.load(split, preprocess_mode=mode, batch_dims=batch_dims,
                      dataset='fashion_mnist', **kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# --- split sizes, classes, normalization -----------------------------------


@pytest.mark.parametrize('name, sizes', [
    ('imagenet2012', (1_281_167, 1_271_167, 10_000, 50_000)),
    ('fashion_mnist', (60_000, 50_000, 10_000, 10_000)),
])
def test_num_examples(name, sizes):
  every = (Split.TRAIN_AND_VALID, Split.TRAIN, Split.VALID, Split.TEST)
  assert tuple(dataset.num_examples(s, name) for s in every) == sizes
  assert (dataset.num_examples(Split.TRAIN, name) +
          dataset.num_examples(Split.VALID, name) ==
          dataset.num_examples(Split.TRAIN_AND_VALID, name))


def test_num_classes():
  assert [dataset.num_classes(d) for d in dataset.DATASETS] == [1000, 10, 1000]


def test_normalize_numpy_and_jax():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  mean = np.asarray(dataset.IMAGENET_MEAN, np.float32)
  std = np.asarray(dataset.IMAGENET_STD, np.float32)
  x = np.stack([mean, mean + std])
  out_np = dataset.normalize(x, 'imagenet2012')
  out_jnp = dataset.normalize(jnp.asarray(x), 'mock')
  assert isinstance(out_np, np.ndarray)
  np.testing.assert_allclose(out_np, [[0, 0, 0], [1, 1, 1]], atol=1e-6)
  np.testing.assert_allclose(np.asarray(out_jnp), out_np, atol=1e-6)
  np.testing.assert_allclose(
      dataset.normalize(np.full((2, 3), 0.2860406), 'fashion_mnist'), 0.,
      atol=1e-6)


@needs_fashion_mnist
def test_fashion_mnist_stats_match_train_set():
  pixels = fashion_mnist.read_idx(os.path.join(
      _FASHION_DIR, fashion_mnist.FASHION_MNIST_FILES['train_images'])) / 255.
  mean, std = dataset.normalization_stats('fashion_mnist')
  assert abs(pixels.mean() - mean[0]) < 1e-6
  assert abs(pixels.std() - std[0]) < 1e-6


# --- crop sampling -----------------------------------------------------------


def _boxes(height, width, n, seed=(3, 5), **kwargs):
  return crops.sample_crop_boxes(np.asarray(seed, np.int64), height, width,
                                 n, **kwargs).numpy()


def _rule_reference(height, width, n, seed=0):
  """NumPy Monte Carlo of DeepMind's crop rule: one draw, sides rounded and
  clipped to the image. Returns float64 (crop_height, crop_width)."""
  rng = np.random.default_rng(seed)
  area = rng.uniform(0.08, 1., n) * height * width
  ratio = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), n))
  return (np.minimum(np.round(np.sqrt(area / ratio)), height),
          np.minimum(np.round(np.sqrt(area * ratio)), width))


def _crop_stats(h, w, height, width):
  """Per-crop (area fraction, spans full height or width, aspect outside
  [3/4, 4/3]) as float arrays."""
  ratio = w / h
  return (h * w / (height * width), ((h == height) | (w == width)) * 1.,
          ((ratio < 3 / 4) | (ratio > 4 / 3)) * 1.)


@pytest.mark.parametrize('height, width, expected', [
    # (mean area, full height or width, aspect outside [3/4, 4/3]) of the
    # rule, from 4M NumPy draws; the retrying sampler this replaced gave
    # 0.432 / 0.006 / 0.001 and 0.225 / 0.051 / 0.040.
    (375, 500, (0.5186, 0.2626, 0.0011)),
    (200, 600, (0.3950, 0.7212, 0.4352)),
])
def test_crop_statistics_match_deepminds_rule(height, width, expected):
  n = 20_000
  y, x, h, w = _boxes(height, width, n).T
  assert ((y >= 0) & (x >= 0) & (y + h <= height) & (x + w <= width)).all()
  ours = _crop_stats(h, w, height, width)
  reference = _crop_stats(*_rule_reference(height, width, 400_000), height,
                          width)
  for name, a, b, e in zip(('area', 'full', 'outside'), ours, reference,
                           expected):
    se = math.sqrt(a.var() / a.size + b.var() / b.size)
    assert abs(a.mean() - b.mean()) < 4 * se, (name, a.mean(), b.mean())
    assert abs(b.mean() - e) < 0.005, (name, b.mean(), e)
  # Offsets are uniform over the free range of each axis.
  for offset, free in ((y, height - h), (x, width - w)):
    room = free > 0
    frac = offset[room] / free[room]
    assert abs(frac.mean() - 0.5) < 4 * math.sqrt(1 / 12 / room.sum())


def test_crop_area_and_aspect_distribution():
  # On a large square image rounding is negligible: the area fraction a is
  # U[0.08, 1] and the log ratio l U[-L/2, L/2], L = log(16/9); sides longer
  # than the image are cut, so a crop covers min(1, sqrt(a e^l)) x
  # min(1, sqrt(a e^-l)) of it (no retries).
  n, side = 20_000, 2_000
  y, x, h, w = _boxes(side, side, n).T
  assert (y >= 0).all() and (x >= 0).all()
  assert (y + h <= side).all() and (x + w <= side).all()
  area = h * w / side**2
  log_ratio = np.log(w / h)
  half = math.log(4 / 3)
  assert area.min() >= 0.08 - 1e-3 and area.max() <= 1.
  # Rounding moves each side (>= 489 px) by at most half a pixel.
  assert np.abs(log_ratio).max() <= half + 2 * 0.5 / 489
  # The expected area by a midpoint rule on a 2000 x 2000 grid: 0.5337 (the
  # retrying sampler gave 0.4778).
  grid_a = 0.08 + 0.92 * (np.arange(2_000) + 0.5) / 2_000
  grid_l = half * (2 * (np.arange(2_000) + 0.5) / 2_000 - 1)
  cover = lambda s: np.minimum(1., np.sqrt(grid_a[:, None] * np.exp(s)))
  expected_mean = (cover(grid_l[None]) * cover(-grid_l[None])).mean()
  assert abs(expected_mean - 0.5337) < 1e-4
  se = area.std() / math.sqrt(n)
  assert abs(area.mean() - expected_mean) < 4 * se
  # Up to a = 3/4 nothing is cut (a e^|l| <= 1): there the crop keeps its
  # a ~ U[0.08, 0.75] and l ~ U[-L/2, L/2], independently, with mass
  # 0.67 / 0.92 = 0.7283; a cut crop covers at least sqrt(3/4 * 3/4).
  small = area < 0.75
  p_small = 0.67 / 0.92
  assert abs(small.mean() - p_small) < 4 * math.sqrt(p_small *
                                                      (1 - p_small) / n)
  a, l = area[small], log_ratio[small]
  assert abs(a.mean() - 0.415) < 4 * 0.67 / math.sqrt(12 * a.size)
  assert abs(l.mean()) < 4 * 2 * half / math.sqrt(12 * l.size)
  assert abs(l.var() - (2 * half)**2 / 12) < 0.03 * (2 * half)**2 / 12
  quarters = np.histogram(l, bins=4, range=(-half, half))[0] / l.size
  assert np.abs(quarters - 0.25).max() < 4 * math.sqrt(0.25 * 0.75 / l.size)
  # A cut crop spans the whole height or width; a crop is cut when
  # a > e^-|l|: with probability (1 - (1 - e^(-L/2)) / (L/2)) / 0.92 = 0.1424.
  p_cut = (1 - (1 - math.exp(-half)) / half) / 0.92
  full = ((h == side) | (w == side)).mean()
  assert abs(full - p_cut) < 4 * math.sqrt(p_cut * (1 - p_cut) / n)


def test_crop_boxes_on_28_pixel_images():
  y, x, h, w = _boxes(28, 28, 5_000).T
  assert ((y >= 0) & (x >= 0) & (y + h <= 28) & (x + w <= 28)).all()
  area = h * w / 28**2
  assert area.min() >= 0.07 and area.max() <= 1.
  # The rule's mean with its rounding (NumPy, 4M draws): 0.5339, sd 0.257.
  assert abs(area.mean() - 0.5339) < 4 * 0.257 / math.sqrt(5_000)


def test_crop_sides_are_cut_to_the_image():
  # Aspect ratios of 3 to 4 and areas of 90-100% on 100 x 100: every width
  # (sqrt(area * ratio) >= 164) is cut to 100, the heights round to
  # sqrt(9000 / 4) = 47.4 ... sqrt(10000 / 3) = 57.7; no retry, no fallback.
  y, x, h, w = _boxes(100, 100, 2_000, aspect_ratio_range=(3., 4.),
                      area_range=(0.9, 1.)).T
  assert (w == 100).all() and (x == 0).all()
  assert h.min() >= 47 and h.max() <= 58 and h.max() - h.min() >= 8
  assert (y >= 0).all() and (y + h <= 100).all() and y.max() > 40


def test_centre_crop_box_truncates_as_deepmind():
  # Every image size from 200 to 800 on both axes, against NumPy:
  # side = int(224 / 256 * shorter side), offset ((H - side) + 1) // 2.
  sizes = np.arange(200, 801)
  height, width = np.meshgrid(sizes, sizes, indexing='ij')
  boxes = dataset.centre_crop_box(height, width, 224).numpy()
  side = (224 / 256 * np.minimum(height, width)).astype(np.int64)
  expected = np.stack([(height - side + 1) // 2, (width - side + 1) // 2,
                       side, side], -1)
  np.testing.assert_array_equal(boxes, expected)
  # Rounding instead (the old rule) is 1 px off for 43.6% of the sides.
  rounded = np.round(224 / 256 * sizes).astype(np.int64)
  truncated = (224 / 256 * sizes).astype(np.int64)
  assert abs((rounded != truncated).mean() - 0.436) < 1e-3
  np.testing.assert_array_equal(dataset.centre_crop_box(375, 500).numpy(),
                                [24, 86, 328, 328])
  # Other output sizes keep the padding of 32: 24 / 56 of 28 px is 12.
  np.testing.assert_array_equal(dataset.centre_crop_box(28, 30, 24).numpy(),
                                [8, 9, 12, 12])


def test_centre_crop_decodes_that_box():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (203, 317, 3), dtype=np.uint8)
  jpeg = tf.io.encode_jpeg(image, quality=100, chroma_downsampling=False)
  decoded = tf.io.decode_jpeg(jpeg, channels=3)
  y, x, side, _ = dataset.centre_crop_box(203, 317).numpy()
  assert (y, x, side) == (13, 70, 177)  # int(0.875 * 203) = int(177.625)
  window = tf.cast(decoded[y:y + side, x:x + side], tf.float32) / 255.
  expected = tf.clip_by_value(
      tf.image.resize(window, [224, 224], method='bicubic'), 0., 1.)
  out = crops.centre_crop(jpeg, 224)
  np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-6)


def test_crop_boxes_are_a_function_of_the_seed():
  np.testing.assert_array_equal(_boxes(50, 70, 8, seed=(1, 2)),
                                _boxes(50, 70, 8, seed=(1, 2)))
  assert (_boxes(50, 70, 8, seed=(1, 2)) !=
          _boxes(50, 70, 8, seed=(1, 3))).any()


# --- Fashion-MNIST pipelines -------------------------------------------------


def _eval_examples(batches):
  """(count per class, multiset of (label, image hash)) of masked batches."""
  keys = collections.Counter()
  for b in batches:
    images = np.round(b['images'].reshape((-1,) + b['images'].shape[-3:]) *
                      255).astype(np.uint8)
    for image, label, m in zip(images, b['labels'].ravel(), b['mask'].ravel()):
      if m:
        keys[(int(label), hashlib.sha1(image.tobytes()).hexdigest())] += 1
  return keys


@needs_fashion_mnist
def test_fashion_mnist_eval_sees_every_test_example_once():
  batches = list(_fashion(Split.TEST, Mode.EVAL, [2, 256], image_size=28))
  assert len(batches) == math.ceil(10_000 / 512) == 20
  b = batches[0]
  assert b['images'].shape == (2, 256, 28, 28, 3)
  assert b['images'].dtype == np.float32 and b['labels'].shape == (2, 256)
  masks = np.stack([b['mask'] for b in batches])
  assert masks.sum() == 10_000
  assert batches[-1]['mask'].sum() == 10_000 - 19 * 512
  assert batches[-1]['mask'].ravel()[-1] == 0
  labels = np.concatenate([b['labels'].ravel()[b['mask'].ravel() > 0]
                           for b in batches])
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [1000] * 10)
  images = np.stack([b['images'] for b in batches])
  assert images.min() >= 0 and images.max() <= 1
  # Gray -> RGB, and at the source size the "resize" is the identity.
  np.testing.assert_array_equal(b['images'][..., 0], b['images'][..., 2])
  raw = fashion_mnist.read_idx(os.path.join(
      _FASHION_DIR, fashion_mnist.FASHION_MNIST_FILES['test_images']))
  np.testing.assert_allclose(b['images'][0, :, :, :, 1] * 255, raw[:256],
                             atol=1e-2)


@needs_fashion_mnist
def test_fashion_mnist_shards_are_disjoint_and_cover_the_split():
  whole = _eval_examples(_fashion(Split.TEST, Mode.EVAL, [300]))
  shards = [list(_fashion(Split.TEST, Mode.EVAL, [300], process_index=i,
                          process_count=3)) for i in range(3)]
  # Every process yields the same number of batches (ceil(3334 / 300)).
  assert [len(s) for s in shards] == [12, 12, 12]
  counts = [_eval_examples(s) for s in shards]
  assert [sum(c.values()) for c in counts] == [3333, 3333, 3334]
  assert sum(counts, collections.Counter()) == whole
  assert sum(whole.values()) == 10_000


def test_shard_ranges_partition_every_split():
  for count in (10, 1_271_167, 50_000):
    for processes in (1, 3, 7):
      ranges = [splits.shard_range(5, count, i, processes)
                for i in range(processes)]
      assert ranges[0][0] == 5 and ranges[-1][1] == 5 + count
      assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
      sizes = [e - b for b, e in ranges]
      assert max(sizes) - min(sizes) <= 1


@needs_fashion_mnist
def test_fashion_mnist_pretrain_batches():
  b = next(_fashion(Split.TRAIN, Mode.PRETRAIN, [2, 16]))
  assert set(b) == {'view1', 'view2', 'labels'}
  assert b['view1'].shape == b['view2'].shape == (2, 16, 24, 24, 3)
  assert b['labels'].shape == (2, 16) and b['labels'].dtype == np.int32
  for v in (b['view1'], b['view2']):
    assert v.dtype == np.float32 and v.min() >= 0 and v.max() <= 1
  # Two independent crops of each image.
  assert np.abs(b['view1'] - b['view2']).mean() > 0.01
  lin = next(_fashion(Split.TRAIN, Mode.LINEAR_TRAIN, [8]))
  assert set(lin) == {'images', 'labels'}
  assert lin['images'].shape == (8, 24, 24, 3)


@needs_fashion_mnist
def test_fashion_mnist_is_deterministic_given_the_seed():
  run = lambda seed: _take(_fashion(Split.TRAIN, Mode.PRETRAIN, [64],
                                    seed=seed, deterministic=True), 3)
  a, b, c = run(0), run(0), run(1)
  for x, y in zip(a, b):
    chex.assert_trees_all_equal(x, y)
  assert not np.array_equal(a[0]['labels'], c[0]['labels'])
  assert not np.array_equal(a[0]['view1'], c[0]['view1'])


@needs_fashion_mnist
def test_fashion_mnist_start_step_equals_skipping_batches():
  # 50 processes: a shard of 1,000 examples, so that batch 3 (positions
  # 768..1023) straddles the first epoch boundary.
  kwargs = dict(seed=7, deterministic=True, process_index=4, process_count=50)
  fresh = _take(_fashion(Split.TRAIN, Mode.PRETRAIN, [256], **kwargs), 7)
  resumed = _take(_fashion(Split.TRAIN, Mode.PRETRAIN, [256], start_step=3,
                           **kwargs), 4)
  for x, y in zip(fresh[3:], resumed):
    chex.assert_trees_all_equal(x, y)
  # The epoch boundary is a reshuffle: labels of epoch 0 and 1 differ in order.
  epoch0 = np.concatenate([b['labels'] for b in fresh])[:1000]
  epoch1 = np.concatenate([b['labels'] for b in fresh])[1000:1792]
  assert np.bincount(epoch0, minlength=10).sum() == 1000
  assert not np.array_equal(epoch0[:792], epoch1)


# --- mock ImageNet: the imagenet2012 code path -------------------------------


def test_mock_imagenet_pretrain_and_linear_train():
  with tfds.testing.mock_data(num_examples=12):
    it = dataset.load(Split.TRAIN, preprocess_mode=Mode.PRETRAIN,
                      batch_dims=[2, 3], dataset='mock', image_size=32,
                      process_index=0, process_count=1)
    batches = _take(it, 3)  # 18 > 12 examples: the stream repeats
    lin = next(dataset.load(Split.TRAIN, preprocess_mode=Mode.LINEAR_TRAIN,
                            batch_dims=[5], dataset='mock', image_size=40,
                            process_index=0, process_count=1))
  for b in batches:
    assert b['view1'].shape == b['view2'].shape == (2, 3, 32, 32, 3)
    assert b['labels'].shape == (2, 3)
    assert 0 <= b['labels'].min() and b['labels'].max() < 1000
    for v in (b['view1'], b['view2']):
      assert v.dtype == np.float32 and v.min() >= 0 and v.max() <= 1
      assert v.std() > 0.01
  assert lin['images'].shape == (5, 40, 40, 3) and lin['labels'].shape == (5,)


def test_mock_imagenet_eval_pads_the_last_batch():
  with tfds.testing.mock_data(num_examples=10):
    batches = list(dataset.load(
        Split.TEST, preprocess_mode=Mode.EVAL, batch_dims=[4],
        dataset='mock', image_size=24, process_index=0, process_count=1))
  assert len(batches) == 3
  np.testing.assert_array_equal(batches[-1]['mask'], [1, 1, 0, 0])
  assert sum(b['mask'].sum() for b in batches) == 10
  images = np.stack([b['images'] for b in batches])
  assert images.shape == (3, 4, 24, 24, 3)
  assert images.min() >= 0 and images.max() <= 1
  assert (batches[-1]['images'][2:] == 0).all()


def test_mock_imagenet_start_step_equals_skipping_batches():
  kwargs = dict(preprocess_mode=Mode.PRETRAIN, batch_dims=[4], dataset='mock',
                image_size=16, seed=3, deterministic=True, process_index=0,
                process_count=1)
  with tfds.testing.mock_data(num_examples=10):
    fresh = _take(dataset.load(Split.TRAIN, **kwargs), 6)
    resumed = _take(dataset.load(Split.TRAIN, start_step=3, **kwargs), 3)
  for x, y in zip(fresh[3:], resumed):
    chex.assert_trees_all_equal(x, y)


def test_mock_without_a_context_mocks_itself():
  b = next(dataset.load(Split.VALID, preprocess_mode=Mode.EVAL,
                        batch_dims=[8], dataset='mock', image_size=16,
                        process_index=0, process_count=1))
  assert b['images'].shape == (8, 16, 16, 3) and b['mask'].sum() == 8


# --- errors ------------------------------------------------------------------


def test_missing_fashion_mnist_names_both_remedies(tmp_path):
  # An empty folder: no idx files, and tfds (looking there, no download)
  # finds nothing either.
  with pytest.raises(dataset.DatasetNotFoundError) as info:
    _fashion(Split.TEST, Mode.EVAL, [8], data_dir=str(tmp_path))
  message = str(info.value)
  assert isinstance(info.value, dataset.DatasetError)
  assert isinstance(info.value, ValueError)
  assert isinstance(info.value, errors.UserError)  # main.py: one error line
  assert '\n' not in message
  assert 'apt-get install dataset-fashion-mnist' in message
  assert "tfds.load('fashion_mnist')" in message
  assert str(tmp_path) in message and fashion_mnist.FASHION_MNIST_ENV in message


@pytest.mark.parametrize('kwargs, words', [
    (dict(dataset='cifar10'), 'imagenet2012, fashion_mnist, mock'),
    (dict(batch_dims=[4, 0]), 'positive'),
    (dict(batch_dims=[]), 'non-empty'),
    (dict(image_size=0), 'image_size'),
    (dict(process_index=3, process_count=3), 'process_index'),
    (dict(start_step=-1), 'start_step'),
])
def test_bad_arguments_raise_dataset_error(kwargs, words):
  args = dict(preprocess_mode=Mode.EVAL, batch_dims=[4],
              dataset='fashion_mnist', process_index=0, process_count=1)
  args.update(kwargs)
  with pytest.raises(dataset.DatasetError, match=words):
    dataset.load(Split.TEST, **args)


def test_unknown_split_name():
  with pytest.raises(dataset.DatasetError, match='train_and_valid'):
    dataset.num_examples('training', 'fashion_mnist')
  assert dataset.num_examples('valid', 'fashion_mnist') == 10_000


def test_missing_imagenet_names_the_manual_dir(tmp_path):
  with pytest.raises(dataset.DatasetNotFoundError) as info:
    dataset.load(Split.TRAIN, preprocess_mode=Mode.PRETRAIN, batch_dims=[8],
                 data_dir=str(tmp_path), process_index=0, process_count=1)
  message = str(info.value)
  assert '\n' not in message and 'ILSVRC2012_img_train.tar' in message
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in message
