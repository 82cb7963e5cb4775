"""Input pipelines (tf.data on the host) for BYOL pretraining and evaluation.

The public entry of the input side; its parts are in `byol/data/`: `splits`
(datasets, splits, shards, seeds), `crops` (crop windows, crop and resize),
`registry` (the one place that resolves a dataset name), one module per
source (`fashion_mnist`, `imagenet`, `tfds_source`, `folder`) and `encoded`
(the stream every source of encoded images shares).

Every dataset has one interface, `load(split, preprocess_mode=..., ...)`,
which yields dicts of numpy arrays shaped `batch_dims + [...]`:

  imagenet2012   through tfds; the user places the ILSVRC2012 archives in tfds'
                 manual dir and tfds prepares the dataset on the first load.
  fashion_mnist  the offline default: the four original idx `.gz` files, read
                 with numpy from `data_dir`, else `$BYOL_FASHION_MNIST_DIR`,
                 else Debian's `/usr/share/datasets/fashion-mnist/`; failing
                 that, tfds' own copy (downloaded only when no folder was
                 named).
  tfds:NAME[/CONFIG], tfds_dir:PATH, folder:PATH
                 any tfds image-classification dataset, a prepared tfds
                 folder, a folder of image files; their split rules are in
                 `byol/data/tfds_source.py` and `byol/data/folder.py`.
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

from typing import Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from byol.data import fashion_mnist
from byol.data import imagenet
from byol.data import registry
# The public names of the input side, for `dataset.X` callers.
from byol.data.crops import centre_crop_box  # pylint: disable=unused-import
from byol.data.splits import (DATASETS, DatasetError, DatasetNotFoundError,  # pylint: disable=unused-import
                              PreprocessMode, Split, as_split, check_dataset,
                              num_classes, num_examples, tf)

Batch = Mapping[str, np.ndarray]

# ImageNet statistics (per RGB channel, images in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fashion-MNIST's own statistics: the mean and (population) standard deviation
# of all 60,000 x 28 x 28 train pixels scaled to [0, 1], computed once with
# numpy from train-images-idx3-ubyte.gz (0.28604060, 0.35302424), and
# replicated to the three channels the gray images are given.
FASHION_MNIST_MEAN = (0.2860406,) * 3
FASHION_MNIST_STD = (0.3530242,) * 3


def normalization_stats(dataset: str,
                        data_dir: Optional[str] = None,
                        split: Split = Split.TRAIN_AND_VALID
                        ) -> Tuple[np.ndarray, np.ndarray]:
  """Per-channel (mean, std) float32 arrays of shape [3].

  ImageNet's for imagenet2012 and mock, Fashion-MNIST's own for
  fashion_mnist; for a `tfds:`, `tfds_dir:` or `folder:` source, those of a
  fixed sample of `split` (the pretraining split), computed once per process
  (see `byol/data/registry.py`; `data_dir`: the tfds data dir of a `tfds:`
  one). `data_normalization` adds the statistics a config gives.
  """
  dataset = check_dataset(dataset)
  if dataset == 'fashion_mnist':
    mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
  elif dataset in ('imagenet2012', 'mock'):
    mean, std = IMAGENET_MEAN, IMAGENET_STD
  else:
    _hide_accelerators_from_tf()
    return registry.resolve(dataset, data_dir or None).stats_of(split)
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


# The channels of every image the pipelines yield (gray images are given
# three equal ones), hence the length of `data.mean` and `data.std`.
CHANNELS = 3


def given_stats(data) -> Optional[Tuple[np.ndarray, np.ndarray]]:
  """The (mean, std) a config's `data` block gives, None when it gives none.

  `data.mean` and `data.std` go together: both empty (the dataset's known or
  sampled statistics) or both `CHANNELS` finite numbers, every std > 0.
  Configs written before these fields existed give none.

  Raises:
    DatasetError: one given without the other, a wrong length, a
      non-finite value or a std <= 0.
  """
  mean, std = tuple(data.get('mean', ()) or ()), tuple(data.get('std', ()) or ())
  if not mean and not std:
    return None
  if not mean or not std:
    raise DatasetError('give data.mean and data.std together (or neither: '
                       "the dataset's own statistics)")
  for field, values in (('mean', mean), ('std', std)):
    if len(values) != CHANNELS:
      raise DatasetError(
          f'data.{field} must hold {CHANNELS} values, one per RGB channel '
          f'(gray images have three equal ones), got {len(values)}')
    if not all(isinstance(v, (int, float, np.number)) and
               not isinstance(v, bool) and np.isfinite(v) for v in values):
      raise DatasetError(f'data.{field} must hold finite numbers, got '
                         f'{values}')
  if min(std) <= 0:
    raise DatasetError(f'data.std must be > 0 in every channel, got {std}')
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def pretrain_split(data) -> Split:
  """The split a config's `data` block pretrains on.

  `data.pretrain_split` names it; '' (the default) is TRAIN_AND_VALID, then
  the source's UNLABELLED images where it has some (STL-10's `unlabelled`,
  a folder's `unlabelled/`): TRAIN_AND_VALID_AND_UNLABELLED. TEST is never
  pretrained on.

  Raises:
    DatasetError: an unknown split, TEST, or a split the source lacks.
  """
  name = data.get('pretrain_split', '') or ''
  dataset = check_dataset(data.dataset)
  if not name:
    if dataset in registry.BUILTIN:
      return Split.TRAIN_AND_VALID
    source = registry.resolve(dataset, data.data_dir or None)
    return (Split.TRAIN_AND_VALID_AND_UNLABELLED
            if source.has_split(Split.UNLABELLED) else Split.TRAIN_AND_VALID)
  split = Split.from_string(name)
  if split == Split.TEST:
    raise DatasetError('data.pretrain_split=test: TEST is what results are '
                       'reported on, never trained on')
  num_examples(split, dataset, data.data_dir or None)  # it exists
  return split


def data_normalization(data) -> Tuple[np.ndarray, np.ndarray]:
  """The (mean, std) of a config's `data` block: those it gives, else the
  dataset's known ones or those of a sample of its pretraining split."""
  given = given_stats(data)
  if given is not None:
    return given
  return normalization_stats(data.dataset, data.data_dir or None,
                             pretrain_split(data))


def write_data_manifest(data, workdir: str) -> None:
  """`<workdir>/dataset.json` of the run of a config's `data` block (see
  `registry.write_manifest`)."""
  registry.write_manifest(data.dataset, data.data_dir or None, workdir,
                          pretrain_split(data), given_stats(data))


def has_labels(dataset: str, data_dir: Optional[str] = None) -> bool:
  """False for an unlabelled source (a flat `folder:`), which only pretrains."""
  if check_dataset(dataset) in registry.BUILTIN:
    return True
  return registry.resolve(dataset, data_dir or None).labelled


def normalize(images, dataset: str, data_dir: Optional[str] = None):
  """(images - mean) / std over the last (channel) axis, with the dataset's
  `normalization_stats`.

  Works on numpy arrays and on jax arrays inside jit/pmap alike: the
  statistics are numpy constants, so the result has the type of `images`.
  """
  mean, std = normalization_stats(dataset, data_dir)
  return (images - mean) / std


def normalize_as(images, data):
  """`normalize` with the statistics of a config's `data` block
  (`data_normalization`): what the network of that config does."""
  mean, std = data_normalization(data)
  return (images - mean) / std


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
         start_step: int = 0,
         subset: Optional[Sequence[int]] = None,
         threads: int = 0) -> Iterator[Batch]:
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
    dataset: 'imagenet2012', 'fashion_mnist', 'mock', or a source of the
      registry: 'tfds:NAME[/CONFIG]', 'tfds_dir:PATH', 'folder:PATH'.
    image_size: side of the square output images.
    data_dir: tfds data dir (imagenet2012, tfds:); for fashion_mnist the
      folder with the idx .gz files (read offline; also tried as a tfds data
      dir); unused by tfds_dir: and folder: (their path is in the name).
    seed: seed of every random choice.
    deterministic: identical batches on every load with the same arguments.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).
    start_step: start where a fresh stream would be after this many batches.
    subset: positions in `split` of the only examples to read (a low-label
      subset), sorted and distinct; None reads the whole split.
    threads: the size of the pipeline's own thread pool; 0: TensorFlow's
      default, one thread per core. Fewer keep the pipeline off the cores a
      CPU training step runs on, where it is fast enough with them.

  Returns:
    An iterator of dicts of numpy arrays: images float32 in [0, 1] of shape
    batch_dims + [image_size, image_size, 3], labels int32 of shape
    batch_dims (mask float32, 1 for real examples).

  Raises:
    DatasetError: bad arguments; DatasetNotFoundError when the data is absent.
  """
  dataset = check_dataset(dataset)
  split = as_split(split)
  batch_dims = list(batch_dims)
  batch_size, process_index, process_count = _check_load_args(
      preprocess_mode, batch_dims, image_size, start_step, process_index,
      process_count)
  data_dir = data_dir or None
  _hide_accelerators_from_tf()
  if dataset in registry.BUILTIN:
    num_examples(split, dataset, data_dir)  # a split it has
  if subset is not None:
    subset = _check_subset(subset, split, dataset, data_dir)
  if dataset == 'fashion_mnist':
    ds = fashion_mnist.make_dataset(
        split, preprocess_mode, batch_size, image_size, data_dir, seed,
        process_index, process_count, start_step, subset)
  elif dataset in ('imagenet2012', 'mock'):
    ds = imagenet.make_dataset(
        dataset, split, preprocess_mode, batch_size, image_size, data_dir,
        seed, deterministic, process_index, process_count, start_step, subset)
  else:
    ds = registry.resolve(dataset, data_dir).make_dataset(
        split, preprocess_mode, batch_size, image_size, seed, deterministic,
        process_index, process_count, start_step, subset)
  return _finish(ds, batch_dims, deterministic=(
      # Evaluation keeps its order (the padding comes last) at little cost.
      deterministic or preprocess_mode == PreprocessMode.EVAL),
                 threads=threads)


def _check_subset(subset, split, dataset, data_dir) -> np.ndarray:
  """`subset` as sorted int64 positions within `split`; `DatasetError` when
  it is empty, repeats a position or leaves the split."""
  subset = np.asarray(subset, np.int64).reshape(-1)
  count = num_examples(split, dataset, data_dir)
  if (subset.size == 0 or np.any(np.diff(subset) <= 0) or subset[0] < 0 or
      subset[-1] >= count):
    raise DatasetError(f'a subset must hold distinct, sorted positions in '
                       f'[0, {count}) of {split.name}; got {subset.size} '
                       'positions')
  return subset


def _check_load_args(preprocess_mode, batch_dims: Sequence[int],
                     image_size, start_step: int,
                     process_index: Optional[int],
                     process_count: Optional[int]) -> Tuple[int, int, int]:
  """Checks `load`'s arguments; returns (process batch, process, processes).

  Raises:
    DatasetError: an argument no stream could use.
  """
  if not isinstance(preprocess_mode, PreprocessMode):
    raise DatasetError(f'preprocess_mode must be a PreprocessMode, got '
                       f'{preprocess_mode!r}')
  if not batch_dims or any(not isinstance(d, (int, np.integer)) or d < 1
                           for d in batch_dims):
    raise DatasetError(f'batch_dims must be a non-empty list of positive '
                       f'integers, got {batch_dims}')
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
  return int(np.prod(batch_dims)), process_index, process_count


def _finish(ds, batch_dims, *, deterministic: bool,
            threads: int = 0) -> Iterator[Batch]:
  """Shapes the stream's batches to `batch_dims`, prefetches, sets options."""

  def reshape(batch):
    return {k: tf.reshape(v, batch_dims + v.shape[1:].as_list())
            for k, v in batch.items()}

  ds = ds.map(reshape).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = deterministic
  # One thread per map call, parallel calls across cores: avoids the
  # oversubscription of nested thread pools on small hosts.
  options.threading.max_intra_op_parallelism = 1
  if threads:
    options.threading.private_threadpool_size = threads
  ds = ds.with_options(options)
  return ds.as_numpy_iterator()
