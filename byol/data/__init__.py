"""The parts of the input pipelines; `byol/dataset.py` is their public entry.

- `splits`: what every pipeline shares: dataset names, splits and their
  sizes, preprocessing modes, errors, process shards, stateless seeds, and
  the lazily imported TensorFlow and tfds.
- `crops`: random-resized-crop and centre-crop windows, and the crop and
  resize of gray arrays (a batch at a time) and of JPEGs (one at a time).
- `fashion_mnist`: the idx files (or tfds' copy) and their tf.data stream.
- `imagenet`: imagenet2012 (and the mock) through tfds, and its stream.
"""
