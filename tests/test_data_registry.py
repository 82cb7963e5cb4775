"""The dataset registry: folder:, tfds: and tfds_dir: sources.

Every test builds its own data (`data_fixtures`): a folder of JPEG and PNG
files of non-square shapes, gray and RGBA among them, a corrupt JPEG and a
text file; a tiny tfds dataset prepared into a temporary data dir.
"""

import hashlib
import json
import os

import chex
import ml_collections
import numpy as np
import pytest

from byol import dataset
from byol.data import crops
from byol.data import registry
from byol.data import splits
import data_fixtures

Split = dataset.Split
Mode = dataset.PreprocessMode
LABELLED = (Split.TRAIN_AND_VALID, Split.TRAIN, Split.VALID, Split.TEST)


@pytest.fixture(scope='module')
def labelled(tmp_path_factory):
  root = tmp_path_factory.mktemp('labelled')
  written = data_fixtures.write_image_folder(str(root))
  return f'folder:{root}', written


@pytest.fixture(scope='module')
def tiny_tfds(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  builder = data_fixtures.prepare_tiny_tfds(data_dir)
  return str(data_dir), str(builder.data_dir)


def _load(name, split, mode, batch=4, **kwargs):
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  return dataset.load(split, preprocess_mode=mode, batch_dims=[batch],
                      dataset=name, image_size=16, deterministic=True,
                      **kwargs)


def _eval_labels(name, split, **kwargs):
  labels = []
  for batch in _load(name, split, Mode.EVAL, **kwargs):
    labels += batch['labels'][batch['mask'] > 0].tolist()
  return labels


def test_folder_classes_labels_and_skips(labelled):
  name, written = labelled
  source = registry.resolve(name)
  assert dataset.num_classes(name) == 3
  assert source.class_names == data_fixtures.CLASSES
  manifest = source.manifest()
  files = {p: l for s in ('TRAIN_AND_VALID', 'TEST')
           for p, l in manifest['files'][s]}
  # Every written image, with its folder's label; the two bad files skipped.
  assert files == written
  assert manifest['num_skipped'] == 2
  assert sorted(s.split(':')[0] for s in manifest['skipped']) == [
      os.path.join('cat', 'broken.jpg'), os.path.join('dog', 'notes.txt')]
  # The pipeline's labels are the files' labels, in the split's path order.
  test = manifest['files']['TEST']
  assert _eval_labels(name, Split.TEST) == [l for _, l in test]


def test_folder_split_rule(labelled):
  name, written = labelled
  source = registry.resolve(name)
  # The rule, computed here independently: order by SHA-1 of the path.
  order = sorted(written, key=lambda p: hashlib.sha1(p.encode()).hexdigest())
  n_test = max(1, round(len(order) / 10))
  rest = order[n_test:]
  n_valid = max(1, round(len(rest) / 10))
  expected = {'TEST': sorted(order[:n_test]),
              'VALID': sorted(rest[:n_valid]),
              'TRAIN': sorted(rest[n_valid:]),
              'TRAIN_AND_VALID': sorted(rest)}
  got = {s: [p for p, _ in e] for s, e in source.manifest()['files'].items()}
  assert got == expected
  for split in LABELLED:
    assert dataset.num_examples(split, name) == len(expected[split.name])


def test_folder_train_test_layout(tmp_path):
  data_fixtures.write_image_folder(str(tmp_path / 'train'), per_class=4)
  data_fixtures.write_image_folder(str(tmp_path / 'test'), per_class=2,
                                   seed=5)
  source = registry.resolve(f'folder:{tmp_path}')
  assert source.layout == 'train/test'
  files = source.manifest()['files']
  assert all(p.startswith('test' + os.sep) for p, _ in files['TEST'])
  assert len(files['TEST']) == 6
  assert len(files['TRAIN_AND_VALID']) == 12
  assert [l for _, l in files['TEST']] == [0, 0, 1, 1, 2, 2]


def test_images_are_rgb_in_range(labelled):
  name, _ = labelled
  batch = next(_load(name, Split.TRAIN, Mode.PRETRAIN, batch=8))
  for view in ('view1', 'view2'):
    chex.assert_shape(batch[view], (8, 16, 16, 3))
    assert batch[view].dtype == np.float32
    assert 0.0 <= batch[view].min() and batch[view].max() <= 1.0
  # The gray PNGs come out with three equal channels.
  gray = [p for p in registry.resolve(name).manifest()['files']['TEST']]
  del gray  # (the split may hold none; check one gray image directly)
  from byol.data import encoded  # pylint: disable=g-import-not-at-top
  root = registry.resolve(name).root
  with open(os.path.join(root, 'cat', '2.png'), 'rb') as f:
    image = encoded.centre_crop_any(f.read(), 16).numpy()
  chex.assert_trees_all_close(image[..., 0], image[..., 1])
  chex.assert_trees_all_close(image[..., 0], image[..., 2])
  # An RGBA PNG keeps its colours and drops the alpha channel.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rgba_path = os.path.join(root, 'cat', '3.png')
  rgba = np.asarray(Image.open(rgba_path))
  assert rgba.shape[-1] == 4
  with open(rgba_path, 'rb') as f:
    decoded = encoded.decode_rgb(f.read()).numpy()
  np.testing.assert_array_equal(decoded, rgba[..., :3])


def test_two_processes_share_every_example_once(labelled):
  name, _ = labelled
  for split in (Split.TEST, Split.TRAIN):
    whole = _eval_labels(name, split)
    parts = [_eval_labels(name, split, process_index=i, process_count=2)
             for i in range(2)]
    assert parts[0] + parts[1] == whole
    # Both processes yield the same number of (padded) batches.
    counts = [sum(1 for _ in _load(name, split, Mode.EVAL, process_index=i,
                                   process_count=2)) for i in range(2)]
    assert counts[0] == counts[1]
  # Pretraining streams of the two processes read disjoint shards.
  a = next(_load(name, Split.TRAIN, Mode.PRETRAIN, process_index=0,
                 process_count=2, batch=2))
  b = next(_load(name, Split.TRAIN, Mode.PRETRAIN, process_index=1,
                 process_count=2, batch=2))
  assert not np.allclose(a['view1'], b['view1'])


def test_exact_resume(labelled):
  name, _ = labelled
  fresh = _load(name, Split.TRAIN_AND_VALID, Mode.PRETRAIN, seed=7)
  batches = [next(fresh) for _ in range(9)]  # several epochs of 22 images
  resumed = _load(name, Split.TRAIN_AND_VALID, Mode.PRETRAIN, seed=7,
                  start_step=5)
  for k in range(5, 9):
    chex.assert_trees_all_close(next(resumed), batches[k], rtol=0, atol=0)


def test_crop_windows_on_non_square_images(tmp_path):
  # One 30 x 90 image whose pixel value is its column: a crop's mean tells
  # which columns it covers. Every crop must be DeepMind's window for its
  # (seed, process, position) key on a 30 x 90 image.
  height, width = 30, 90
  column = np.linspace(0, 255, width).round().astype(np.uint8)
  image = np.broadcast_to(column[None, :, None], (height, width, 3))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.ascontiguousarray(image)).save(tmp_path / 'g.png')
  name = f'folder:{tmp_path}'
  stream = dataset.load(Split.TRAIN_AND_VALID, preprocess_mode=Mode.PRETRAIN,
                        batch_dims=[32], dataset=name, image_size=32, seed=3,
                        deterministic=True, process_index=0, process_count=1)
  batch = next(stream)
  seeds = [splits.stateless_seed(3, 0, splits.SALT_VIEW1, p)
           for p in range(32)]
  boxes = np.stack([crops.sample_crop_boxes(s, height, width)[0].numpy()
                    for s in seeds])
  expected = np.array([column[x:x + w].mean() / 255.
                       for _, x, _, w in boxes])
  got = batch['view1'].mean(axis=(1, 2, 3))
  chex.assert_trees_all_close(got, expected, atol=0.01)
  # The windows follow DeepMind's rule on this elongated image: area
  # fraction at most 1 and at least ~0.08 of the image (before clipping),
  # and a good part of them cut to the full height.
  area = boxes[:, 2] * boxes[:, 3] / (height * width)
  assert area.max() <= 1.0 and area.min() > 0.05
  assert np.mean(boxes[:, 2] == height) > 0.2


def test_normalization_stats_of_a_folder(tmp_path):
  # Solid-colour images: the centre crops are those colours exactly, so the
  # statistics are the colours' mean and population std.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  colours = {'a': [(10, 200, 30), (60, 20, 90)],
             'b': [(250, 0, 128), (0, 0, 0)]}
  for cls, values in colours.items():
    os.makedirs(tmp_path / cls)
    for i, c in enumerate(values):
      Image.new('RGB', (21, 13), c).save(tmp_path / cls / f'{i}.png')
  name = f'folder:{tmp_path}'
  source = registry.resolve(name)
  used = [c for p, _ in source.manifest()['files']['TRAIN_AND_VALID']
          for c in [colours[p.split(os.sep)[0]][int(p[-5])]]]
  values = np.asarray(used, np.float64) / 255.
  mean, std = dataset.normalization_stats(name)
  chex.assert_trees_all_close(mean, values.mean(0).astype(np.float32),
                              atol=1e-5)
  chex.assert_trees_all_close(std, values.std(0).astype(np.float32),
                              atol=1e-5)
  # The built-in datasets keep their constants.
  chex.assert_trees_all_close(dataset.normalization_stats('fashion_mnist')[0],
                              np.full(3, 0.2860406, np.float32))
  chex.assert_trees_all_close(dataset.normalization_stats('imagenet2012')[1],
                              np.asarray([0.229, 0.224, 0.225], np.float32))


def test_unlabelled_folder_pretrains_only(tmp_path):
  data_fixtures.write_flat_folder(str(tmp_path), count=5)
  name = f'folder:{tmp_path}'
  assert dataset.num_classes(name) == 1
  assert dataset.num_examples(Split.TRAIN_AND_VALID, name) == 5
  assert not dataset.has_labels(name)
  batch = next(_load(name, Split.TRAIN_AND_VALID, Mode.PRETRAIN))
  chex.assert_shape(batch['view1'], (4, 16, 16, 3))
  np.testing.assert_array_equal(batch['labels'], 0)
  with pytest.raises(dataset.DatasetError, match='unlabelled'):
    dataset.num_examples(Split.TEST, name)
  with pytest.raises(dataset.DatasetError, match='unlabelled'):
    next(_load(name, Split.TRAIN, Mode.LINEAR_TRAIN))


@pytest.mark.parametrize('make, match', [
    (lambda p: None, 'no readable images'),
    (lambda p: data_fixtures.write_image_folder(p, classes=('cat',)),
     'needs two or more'),
])
def test_bad_folders(tmp_path, make, match):
  make(str(tmp_path))
  with pytest.raises(dataset.DatasetError, match=match):
    dataset.num_classes(f'folder:{tmp_path}')


def test_bad_names():
  for name, match in (('cifar99', 'unknown dataset'),
                      ('hub:thing', 'unknown dataset'),
                      ('folder:', 'names no folder'),
                      ('folder:/no/such/dir', 'not a folder'),
                      ('tfds_dir:/no/such/dir', 'not a prepared tfds')):
    with pytest.raises(dataset.DatasetError, match=match):
      dataset.num_classes(name)


def test_tfds_source(tiny_tfds):
  data_dir, _ = tiny_tfds
  name = 'tfds:byol_tiny_images'
  assert dataset.num_classes(name, data_dir) == 3
  # train + validation, no test: TEST = validation, VALID = train[:3].
  sizes = {s: dataset.num_examples(s, name, data_dir) for s in LABELLED}
  assert sizes == {Split.TEST: 9, Split.VALID: 3, Split.TRAIN: 27,
                   Split.TRAIN_AND_VALID: 30}
  # The labels, in tfds' stored order, read with tfds itself.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder('byol_tiny_images', data_dir=data_dir)

  def stored(spec):
    return [int(e['label']) for e in tfds.as_numpy(
        builder.as_dataset(split=spec, shuffle_files=False))]

  assert _eval_labels(name, Split.TEST, data_dir=data_dir) == stored(
      'validation')
  assert _eval_labels(name, Split.VALID, data_dir=data_dir) == stored(
      'train[:3]')
  halves = [_eval_labels(name, Split.TRAIN, data_dir=data_dir,
                         process_index=i, process_count=2) for i in range(2)]
  assert halves[0] + halves[1] == stored('train[3:]')
  fresh = _load(name, Split.TRAIN, Mode.PRETRAIN, data_dir=data_dir)
  batches = [next(fresh) for _ in range(8)]
  resumed = _load(name, Split.TRAIN, Mode.PRETRAIN, data_dir=data_dir,
                  start_step=6)
  chex.assert_trees_all_close(next(resumed), batches[6], rtol=0, atol=0)


def test_tfds_dir_source_reads_the_same(tiny_tfds):
  data_dir, folder = tiny_tfds
  via_dir = f'tfds_dir:{folder}'
  assert dataset.num_classes(via_dir) == 3
  a = next(_load(via_dir, Split.TEST, Mode.EVAL, batch=9))
  b = next(_load('tfds:byol_tiny_images', Split.TEST, Mode.EVAL, batch=9,
                 data_dir=data_dir))
  chex.assert_trees_all_close(a, b, rtol=0, atol=0)


def test_tfds_not_an_image_dataset(tmp_path):
  data_fixtures.prepare_tiny_tfds(tmp_path, image=False)
  with pytest.raises(dataset.DatasetError, match='not an image-class'):
    dataset.num_classes('tfds:byol_tiny_tensors', str(tmp_path))
  with pytest.raises(dataset.DatasetError, match='has no dataset'):
    dataset.num_classes('tfds:byol_no_such_dataset', str(tmp_path))


def test_subset_reads_only_those_examples(labelled, tiny_tfds):
  name, _ = labelled
  train = registry.resolve(name).labels(Split.TRAIN)
  subset = [1, 4, 5]
  batch = next(_load(name, Split.TRAIN, Mode.LINEAR_TRAIN, batch=3,
                     subset=subset))
  assert sorted(batch['labels'].tolist()) == sorted(train[subset].tolist())
  data_dir, _ = tiny_tfds
  batch = next(_load('tfds:byol_tiny_images', Split.TRAIN, Mode.LINEAR_TRAIN,
                     batch=3, subset=[0, 1, 3], data_dir=data_dir))
  # TRAIN is train[3:]: positions 0, 1, 3 of it.
  train = registry.resolve('tfds:byol_tiny_images', data_dir).labels(
      Split.TRAIN)
  assert len(train) == 27
  assert sorted(batch['labels'].tolist()) == sorted(train[[0, 1, 3]].tolist())
  with pytest.raises(dataset.DatasetError, match='distinct, sorted'):
    next(_load(name, Split.TRAIN, Mode.LINEAR_TRAIN, subset=[3, 1]))


def test_fashion_mnist_subset():
  batch = next(_load('fashion_mnist', Split.TRAIN, Mode.EVAL, batch=4,
                     subset=[0, 2, 7, 9]))
  whole = next(_load('fashion_mnist', Split.TRAIN, Mode.EVAL, batch=10))
  chex.assert_trees_all_close(batch['images'], whole['images'][[0, 2, 7, 9]])
  np.testing.assert_array_equal(batch['labels'], whole['labels'][[0, 2, 7, 9]])


@pytest.fixture(scope='module')
def tiny_stl(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('stl')
  data_fixtures.prepare_tiny_stl(data_dir)
  return 'tfds:byol_tiny_stl', str(data_dir)


def _data(name, data_dir=None, **fields):
  return ml_collections.ConfigDict(dict(dict(
      dataset=name, data_dir=data_dir or '', pretrain_split='', mean=(),
      std=()), **fields))


def test_tfds_unlabelled_split_is_the_pretraining_split(tiny_stl):
  name, data_dir = tiny_stl
  # train 12, test 6, unlabelled 20: TEST = test, VALID = train[:1].
  sizes = {s: dataset.num_examples(s, name, data_dir) for s in Split}
  assert sizes == {Split.TEST: 6, Split.VALID: 1, Split.TRAIN: 11,
                   Split.TRAIN_AND_VALID: 12, Split.UNLABELLED: 20,
                   Split.TRAIN_AND_VALID_AND_UNLABELLED: 32}
  assert dataset.num_classes(name, data_dir) == 3
  source = registry.resolve(name, data_dir)
  np.testing.assert_array_equal(source.labels(Split.UNLABELLED), -1)
  both = source.labels(Split.TRAIN_AND_VALID_AND_UNLABELLED)
  np.testing.assert_array_equal(both[:12],
                                source.labels(Split.TRAIN_AND_VALID))
  np.testing.assert_array_equal(both[12:], -1)
  # The rule: automatic -> labelled train then unlabelled; or named.
  assert dataset.pretrain_split(_data(name, data_dir)) == (
      Split.TRAIN_AND_VALID_AND_UNLABELLED)
  assert dataset.pretrain_split(_data(name, data_dir,
                                      pretrain_split='unlabelled')) == (
                                          Split.UNLABELLED)
  with pytest.raises(dataset.DatasetError, match='never trained on'):
    dataset.pretrain_split(_data(name, data_dir, pretrain_split='test'))
  # One epoch of the pretraining stream holds every image once: 12 labelled
  # and 20 with label -1.
  stream = _load(name, Split.TRAIN_AND_VALID_AND_UNLABELLED, Mode.PRETRAIN,
                 batch=8, data_dir=data_dir)
  labels = np.concatenate([next(stream)['labels'] for _ in range(4)])
  assert sorted(labels.tolist()) == sorted(both.tolist())
  # Two processes split it between them, every image once.
  parts = [_eval_labels(name, Split.TRAIN_AND_VALID_AND_UNLABELLED,
                        data_dir=data_dir, process_index=i, process_count=2)
           for i in range(2)]
  assert parts[0] + parts[1] == both.tolist()
  # Supervised training refuses images without labels.
  with pytest.raises(dataset.DatasetError, match='has no labels'):
    next(_load(name, Split.UNLABELLED, Mode.LINEAR_TRAIN, data_dir=data_dir))


def test_statistics_are_sampled_from_the_pretraining_split(tiny_stl):
  name, data_dir = tiny_stl
  data = _data(name, data_dir)
  images = np.concatenate([
      b['images'][b['mask'] > 0] for b in dataset.load(
          Split.TRAIN_AND_VALID_AND_UNLABELLED, preprocess_mode=Mode.EVAL,
          batch_dims=[8], dataset=name, data_dir=data_dir,
          image_size=registry.STATS_IMAGE_SIZE, process_index=0,
          process_count=1)]).astype(np.float64)
  mean, std = dataset.data_normalization(data)
  chex.assert_trees_all_close(mean, images.mean((0, 1, 2)).astype(np.float32),
                              atol=1e-5)
  chex.assert_trees_all_close(std, images.std((0, 1, 2)).astype(np.float32),
                              atol=1e-5)
  labelled_only = dataset.normalization_stats(name, data_dir)
  assert not np.allclose(labelled_only[0], mean, atol=1e-4)


def test_a_split_the_dataset_lacks_is_refused(labelled, tiny_tfds):
  data_dir, _ = tiny_tfds
  for name, where in (('tfds:byol_tiny_images', data_dir),
                      (labelled[0], None), ('fashion_mnist', None)):
    with pytest.raises(dataset.DatasetError, match='has no UNLABELLED split'):
      dataset.num_examples(Split.UNLABELLED, name, where)
    with pytest.raises(dataset.DatasetError, match='has no UNLABELLED split'):
      dataset.pretrain_split(_data(name, where, pretrain_split='unlabelled'))
    # Without one, pretraining reads TRAIN_AND_VALID, as before.
    assert dataset.pretrain_split(_data(name, where)) == Split.TRAIN_AND_VALID
  with pytest.raises(dataset.DatasetError, match='has no UNLABELLED split'):
    next(_load('fashion_mnist', Split.UNLABELLED, Mode.PRETRAIN))
  with pytest.raises(dataset.DatasetError, match='unknown split'):
    dataset.pretrain_split(_data('fashion_mnist', pretrain_split='extra'))


def test_a_tfds_dataset_without_a_train_split_is_refused(tmp_path):
  data_fixtures.prepare_tiny_stl(tmp_path, kind='no_train')
  with pytest.raises(dataset.DatasetError, match='has no train split'):
    dataset.num_examples(Split.TEST, 'tfds:byol_tiny_no_train', str(tmp_path))


def test_folder_unlabelled_subfolder(tmp_path):
  written = data_fixtures.write_folder_with_unlabelled(str(tmp_path), count=7)
  name = f'folder:{tmp_path}'
  source = registry.resolve(name)
  assert source.class_names == data_fixtures.CLASSES
  assert dataset.num_examples(Split.UNLABELLED, name) == 7
  assert dataset.num_examples(Split.TRAIN_AND_VALID_AND_UNLABELLED, name) == (
      dataset.num_examples(Split.TRAIN_AND_VALID, name) + 7)
  manifest = source.manifest(Split.TRAIN_AND_VALID_AND_UNLABELLED)
  assert manifest['pretrain_split'] == 'TRAIN_AND_VALID_AND_UNLABELLED'
  assert [l for _, l in manifest['files']['UNLABELLED']] == [-1] * 7
  labelled_files = {p: l for s in ('TRAIN_AND_VALID', 'TEST')
                    for p, l in manifest['files'][s]}
  assert labelled_files == written and manifest['num_skipped'] == 2
  assert dataset.pretrain_split(_data(name)) == (
      Split.TRAIN_AND_VALID_AND_UNLABELLED)
  np.testing.assert_array_equal(source.labels(Split.UNLABELLED), -1)


def test_statistics_given_in_the_config(labelled, tmp_path):
  name, _ = labelled
  data = _data(name, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
  mean, std = dataset.data_normalization(data)
  chex.assert_trees_all_close(mean, np.asarray([0.1, 0.2, 0.3], np.float32))
  chex.assert_trees_all_close(std, np.asarray([0.5, 0.25, 2.0], np.float32))
  x = np.full((2, 4, 4, 3), 0.6, np.float32)
  chex.assert_trees_all_close(dataset.normalize_as(x, data)[0, 0, 0],
                              np.asarray([1.0, 1.6, 0.15], np.float32),
                              atol=1e-6)
  # Recorded in dataset.json, for a folder and for a built-in dataset.
  for what, folder in ((name, tmp_path / 'a'), ('fashion_mnist',
                                                tmp_path / 'b')):
    folder.mkdir()
    dataset.write_data_manifest(_data(what, mean=(0.1, 0.2, 0.3),
                                      std=(0.5, 0.25, 2.0)), str(folder))
    with open(folder / registry.MANIFEST_NAME) as f:
      norm = json.load(f)['normalization']
    assert norm['source'] == 'config'
    chex.assert_trees_all_close(np.asarray(norm['std']),
                                np.asarray([0.5, 0.25, 2.0]), atol=1e-7)
  # A built-in dataset with its own statistics writes no manifest, as before.
  dataset.write_data_manifest(_data('fashion_mnist'), str(tmp_path))
  assert not (tmp_path / registry.MANIFEST_NAME).exists()
  # And a sampled source says where its statistics come from.
  dataset.write_data_manifest(_data(name), str(tmp_path))
  with open(tmp_path / registry.MANIFEST_NAME) as f:
    norm = json.load(f)['normalization']
  assert norm['source'] == 'sample' and norm['split'] == 'TRAIN_AND_VALID'


@pytest.mark.parametrize('mean, std, match', [
    ((0.5, 0.5), (0.2, 0.2), 'must hold 3 values'),
    ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2), 'must be > 0'),
    ((0.5, 0.5, 0.5), (0.2, -1.0, 0.2), 'must be > 0'),
    ((0.5, float('nan'), 0.5), (0.2, 0.2, 0.2), 'finite numbers'),
    ((0.5, 0.5, 0.5), (), 'together'),
])
def test_bad_statistics_are_refused(mean, std, match):
  with pytest.raises(dataset.DatasetError, match=match):
    dataset.given_stats(_data('fashion_mnist', mean=mean, std=std))
