"""Throughput of the PRETRAIN input pipeline: host, device, and both chained.

  python -m experiments.bench_input [--batch_size=256] [--steps=30]
      [--json=experiments/results/bench_input.json]

Rows: fashion_mnist at 24 px (the `local` preset), and the mock ImageNet path
at 224 px twice: with tfds' own mock JPEGs (random 5..49 px sources, so the
crop is an upscale and decoding is nearly free) and with ImageNet-sized JPEGs
(`--mock_source_size`, ~ImageNet's average 400 x 350) that make decoding cost
what it does on the real data. Columns, in examples per second (one example is
two views):

  host     the tf.data iterator alone (decode, two random resized crops, batch)
  device   jitted `augmentations.postprocess` on one fixed batch (CPU here)
  chained  iterator -> device_put -> postprocess, as the training loop feeds it

The host and device parts share the same cores when JAX runs on the CPU, so
`chained` is below the smaller of the two.
"""

import functools
import json
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

# byol first: it settles TensorFlow's start-up before TensorFlow is imported.
from byol import augmentations
from byol import dataset
import tensorflow as tf  # pylint: disable=g-bad-import-order
import tensorflow_datasets as tfds  # pylint: disable=g-bad-import-order
from configs import byol as byol_config

_BATCH = flags.DEFINE_integer('batch_size', 256, 'Batch of the 24 px row.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed steps per row.')
_IMAGENET_BATCH = flags.DEFINE_integer(
    'imagenet_batch_size', 64, 'Batch of the 224 px rows (CPU-sized).')
_MOCK_SOURCE_SIZE = flags.DEFINE_integer(
    'mock_source_size', 400, 'JPEG width of the ImageNet-sized mock row (0 '
    'skips that row).')
_JSON = flags.DEFINE_string('json', '', 'Also write the rows to this JSON '
                            'file.')


def _rate(fn, steps, batch_size):
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  return steps * batch_size / (time.perf_counter() - start)


def _imagenet_sized_mock(source_size, num_examples, pool=32):
  """An `as_dataset_fn` for `tfds.testing.mock_data`: a pool of smooth random
  JPEGs of about source_size x 0.875 source_size, cycled."""
  rng = np.random.default_rng(0)
  jpegs = []
  for _ in range(pool):
    small = rng.uniform(0, 255, (source_size // 16, source_size // 14, 3))
    image = tf.image.resize(small, [source_size * 7 // 8, source_size])
    jpegs.append(tf.io.encode_jpeg(tf.cast(image, tf.uint8), quality=90))
  jpegs = tf.stack(jpegs)
  labels = tf.constant(rng.integers(0, 1000, pool), tf.int64)

  def as_dataset(self, split, decoders=None, read_config=None,
                 shuffle_files=False):
    del self, split, decoders, read_config, shuffle_files
    ds = tf.data.Dataset.from_tensor_slices({
        'image': jpegs, 'label': labels,
        'file_name': tf.fill([pool], 'mock.JPEG')})
    return ds.repeat().take(num_examples)

  return as_dataset


def bench(name, load_kwargs, aug_config, batch_size, steps, mock=None):
  """Host, device and chained examples/s of one pipeline."""
  def make_iterator():
    return dataset.load(dataset.Split.TRAIN,
                        preprocess_mode=dataset.PreprocessMode.PRETRAIN,
                        batch_dims=[batch_size], process_index=0,
                        process_count=1, **load_kwargs)

  if mock is not None:
    with mock:
      it = make_iterator()
  else:
    it = make_iterator()
  warm = max(3, steps // 10)
  for _ in range(warm):
    batch = next(it)
  host = _rate(lambda: next(it), steps, batch_size)

  postprocess = jax.jit(functools.partial(augmentations.postprocess,
                                          config=aug_config))
  on_device = jax.device_put(batch)
  keys = iter(jax.random.split(jax.random.key(0), 4 * steps + 16))
  start = time.perf_counter()
  jax.block_until_ready(postprocess(on_device, next(keys)))
  compile_s = time.perf_counter() - start
  device = _rate(lambda: jax.block_until_ready(
      postprocess(on_device, next(keys))), steps, batch_size)

  def chained_step():
    jax.block_until_ready(postprocess(jax.device_put(next(it)), next(keys)))
  for _ in range(warm):
    chained_step()
  chained = _rate(chained_step, steps, batch_size)
  return dict(pipeline=name, image_size=load_kwargs['image_size'],
              batch_size=batch_size, host=host, device=device, chained=chained,
              compile_s=compile_s)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = byol_config.get_config()
  rows = [bench('fashion_mnist', dict(dataset='fashion_mnist', image_size=24),
                config.data.augmentations, _BATCH.value, _STEPS.value)]
  mock_rows = [('mock (tfds JPEGs, 5-49 px)',
                tfds.testing.mock_data(num_examples=1000))]
  if _MOCK_SOURCE_SIZE.value:
    mock_rows.append((
        f'mock (JPEGs {_MOCK_SOURCE_SIZE.value} px)',
        tfds.testing.mock_data(as_dataset_fn=_imagenet_sized_mock(
            _MOCK_SOURCE_SIZE.value, 1000))))
  for name, mock in mock_rows:
    rows.append(bench(name, dict(dataset='mock', image_size=224),
                      config.data.augmentations, _IMAGENET_BATCH.value,
                      max(5, _STEPS.value // 3), mock=mock))

  print(f'{jax.device_count()} {jax.devices()[0].platform} device(s), '
        f'{os.cpu_count()} CPU cores; examples/s (two views each)')
  header = (f'{"pipeline":30s} {"px":>4s} {"batch":>6s} {"host":>9s} '
            f'{"device":>9s} {"chained":>9s} {"compile s":>10s}')
  print(header)
  print('-' * len(header))
  for r in rows:
    print(f'{r["pipeline"]:30s} {r["image_size"]:4d} {r["batch_size"]:6d} '
          f'{r["host"]:9.0f} {r["device"]:9.0f} {r["chained"]:9.0f} '
          f'{r["compile_s"]:10.1f}')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(dict(device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
                     rows=rows), f, indent=1)


if __name__ == '__main__':
  app.run(main)
