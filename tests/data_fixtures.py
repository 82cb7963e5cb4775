"""Small image datasets the data tests write for themselves.

`write_image_folder` writes a labelled folder of JPEG and PNG files of
several shapes and channel counts, plus a corrupt JPEG and a text file;
`TinyImages` is a tfds builder of a few PNG-encoded images, prepared into a
temporary data dir by `prepare_tiny_tfds`; `prepare_tiny_stl` prepares one
arranged as STL-10 (train, test and an `unlabelled` split of label -1).
"""

import os

import numpy as np
from PIL import Image

CLASSES = ('cat', 'dog', 'emu')
# (height, width) of the images, cycled: none is square.
SHAPES = ((20, 36), (41, 23), (30, 50), (17, 29))


def _pixels(rng, shape, channels):
  return rng.randint(0, 256, shape + ((channels,) if channels > 1 else ()),
                     dtype=np.uint8)


def write_image_folder(root, per_class=6, seed=0, classes=CLASSES):
  """Writes root/<class>/<i>.{jpg,png}; returns {relative path: label}.

  Per class: JPEG RGB, PNG RGB, PNG gray and PNG RGBA images in turn, every
  one non-square. Besides these, root/cat/broken.jpg (a truncated JPEG) and
  root/dog/notes.txt are written: two files the source must skip.
  """
  rng = np.random.RandomState(seed)
  written = {}
  for label, name in enumerate(classes):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    for i in range(per_class):
      shape = SHAPES[i % len(SHAPES)]
      kind = i % 4
      if kind == 0:
        rel = f'{name}/{i}.jpg'
        Image.fromarray(_pixels(rng, shape, 3)).save(
            os.path.join(root, rel), quality=95)
      else:
        channels, mode = ((3, 'RGB'), (1, 'L'), (4, 'RGBA'))[kind - 1]
        rel = f'{name}/{i}.png'
        Image.fromarray(_pixels(rng, shape, channels), mode).save(
            os.path.join(root, rel))
      written[rel] = label
  if 'cat' in classes:
    buf = os.path.join(root, 'cat', 'full.jpg.tmp')
    Image.fromarray(_pixels(rng, (40, 40), 3)).save(buf, format='JPEG')
    with open(buf, 'rb') as f:
      data = f.read()
    os.remove(buf)
    with open(os.path.join(root, 'cat', 'broken.jpg'), 'wb') as f:
      f.write(data[:len(data) // 3])
  if 'dog' in classes:
    with open(os.path.join(root, 'dog', 'notes.txt'), 'w') as f:
      f.write('not an image\n')
  return written


def write_flat_folder(root, count=5, shape=(30, 90), seed=1):
  """Unlabelled: `count` PNG images directly in root."""
  rng = np.random.RandomState(seed)
  os.makedirs(root, exist_ok=True)
  for i in range(count):
    Image.fromarray(_pixels(rng, shape, 3)).save(
        os.path.join(root, f'img{i}.png'))


def _tiny_builders():
  """The two builder classes, made (and registered with tfds) once."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if _BUILDERS:
    return _BUILDERS

  def make(image, name, split_sizes):

    def info(self):
      image_feature = (tfds.features.Image(shape=(None, None, 3)) if image
                       else tfds.features.Tensor(shape=(4,), dtype=np.uint8))
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              'image': image_feature,
              'label': tfds.features.ClassLabel(names=list(CLASSES))}),
          supervised_keys=('image', 'label'))

    def split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(count, seed, split in UNLABELLED)
              for seed, (split, count) in enumerate(split_sizes)}

    def generate_examples(self, count, seed, unlabelled):
      del self
      rng = np.random.RandomState(seed)
      for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        value = (_pixels(rng, shape, 3) if image else
                 np.arange(4, dtype=np.uint8) + i)
        # STL-10 stores -1 as the label of its unlabelled images.
        yield i, {'image': value, 'label': -1 if unlabelled else i % 3}

    return type(name,
                (tfds.core.GeneratorBasedBuilder,),
                {'VERSION': tfds.core.Version('1.0.0'), '_info': info,
                 '_split_generators': split_generators,
                 '_generate_examples': generate_examples,
                 '__module__': __name__})

  _BUILDERS[True] = make(True, 'ByolTinyImages',
                         (('train', 30), ('validation', 9)))
  _BUILDERS[False] = make(False, 'ByolTinyTensors',
                          (('train', 30), ('validation', 9)))
  _BUILDERS['stl'] = make(True, 'ByolTinyStl', STL_SPLITS)
  _BUILDERS['no_train'] = make(True, 'ByolTinyNoTrain', (('test', 4),))
  return _BUILDERS


_BUILDERS = {}
UNLABELLED = ('unlabelled',)
# The splits of `prepare_tiny_stl`, in STL-10's arrangement.
STL_SPLITS = (('train', 12), ('test', 6), ('unlabelled', 20))


def prepare_tiny_tfds(data_dir, image=True):
  """Prepares a tiny tfds dataset in `data_dir`; returns its builder.

  30 train and 9 validation images of 3 classes (label i % 3), non-square.
  Its tfds name is byol_tiny_images; `image=False` prepares
  byol_tiny_tensors, whose 'image' is a plain tensor (not an image dataset).
  """
  builder = _tiny_builders()[image](data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder


def prepare_tiny_stl(data_dir, kind='stl'):
  """Prepares byol_tiny_stl in `data_dir` (`STL_SPLITS`); returns its builder.

  As STL-10: labelled train and test splits (label i % 3) and an
  `unlabelled` split whose stored labels are -1. `kind='no_train'` prepares
  byol_tiny_no_train instead: 4 test images and no train split.
  """
  builder = _tiny_builders()[kind](data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder


def write_folder_with_unlabelled(root, count=7, seed=2):
  """A labelled folder (`write_image_folder`) plus root/unlabelled/ with
  `count` PNG images (in a nested folder too); returns the labelled files."""
  written = write_image_folder(root)
  rng = np.random.RandomState(seed)
  os.makedirs(os.path.join(root, 'unlabelled', 'more'), exist_ok=True)
  for i in range(count):
    sub = 'more' if i % 2 else ''
    Image.fromarray(_pixels(rng, (26, 18), 3)).save(
        os.path.join(root, 'unlabelled', sub, f'u{i}.png'))
  return written
