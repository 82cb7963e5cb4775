"""ImageNet (and its mock): tfds records, each JPEG decoded within its crop.

imagenet2012 comes through tfds: the user places the ILSVRC2012 archives in
tfds' manual dir and tfds prepares the dataset on the first load. 'mock' runs
the same builder, decoders and JPEG crops on `tfds.testing.mock_data`'s
random JPEGs. Random choices are functions of (seed, process, stream
position); the shuffle, of (seed, process, epoch).
"""

from __future__ import annotations

import inspect
import os

from byol.data import encoded
from byol.data import splits
from byol.data.splits import tf, tfds


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
    raise splits.DatasetNotFoundError(
        f'imagenet2012 is not prepared in {builder.data_dir_root} and '
        f'{", ".join(missing)} is missing from {manual_dir}: place both '
        'archives there (tfds prepares the dataset on the next run), set '
        'data_dir to a prepared tfds folder, or use dataset=fashion_mnist')
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except
    raise splits.DatasetError(
        f'preparing imagenet2012 from {manual_dir} failed: '
        f'{type(e).__name__}: {splits.first_line(e)}') from e


def _tfds_split(dataset, split, data_dir, process_index, process_count,
                deterministic, seed):
  """This process's shard of the imagenet2012 split, images undecoded.

  Returns (dataset, shard size, largest shard size over processes).
  """
  name, start, count = splits.IMAGENET_SPLITS[split]
  begin, end = splits.shard_range(start, count, process_index, process_count)
  kwargs = dict(split=f'{name}[{begin}:{end}]',
                decoders={'image': tfds.decode.SkipDecoding()},
                shuffle_files=not deterministic,
                read_config=tfds.ReadConfig(shuffle_seed=seed))
  if dataset == 'mock':
    if _tfds_is_mocked():
      ds = tfds.builder('imagenet2012').as_dataset(**kwargs)
    else:
      with tfds.testing.mock_data(num_examples=splits.MOCK_NUM_EXAMPLES):
        ds = tfds.builder('imagenet2012').as_dataset(**kwargs)
    # Mocked tfds ignores the slice: every shard is the whole mock.
    n = int(ds.cardinality())
    if n < 0:
      raise splits.DatasetError('the mocked imagenet2012 stream has no known '
                                'length; give the mock a finite cardinality')
    return ds, n, n
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  _prepare_imagenet(builder)
  return builder.as_dataset(**kwargs), end - begin, -(-count // process_count)


def make_dataset(dataset, split, mode, batch_size, image_size, data_dir,
                 seed, deterministic, process_index, process_count,
                 start_step, subset=None):
  """This process's shard of `split` as a tf.data stream of unshaped batches.

  Arguments as `byol.dataset.load`'s, resolved (`split` a `Split`,
  `batch_size` the process batch); `load` shapes and finishes the stream.
  """
  if subset is not None:
    # A low-label subset: this process's part of the chosen examples, read by
    # position from the whole shard.
    count = splits.IMAGENET_SPLITS[split][2]
    begin, end = splits.shard_range(0, count, process_index, process_count)
    local = subset[(subset >= begin) & (subset < end)] - begin
  ds, n, max_shard = _tfds_split(dataset, split, data_dir, process_index,
                                 process_count, deterministic, seed)
  if subset is not None:
    ds = encoded.keep_positions(ds, local)
    n = max_shard = len(local)
  if n <= 0:
    raise splits.DatasetError(f'process {process_index} of {process_count} '
                              f'has no examples of {split.name}')
  ds = ds.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)))
  return encoded.make_stream(ds, n, max_shard, mode, batch_size, image_size,
                             seed, process_index, start_step)
