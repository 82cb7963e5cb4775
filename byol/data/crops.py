"""Crop windows and the crops themselves, as DeepMind's BYOL takes them.

Random resized crops (`sample_crop_boxes`, Szegedy et al. 2015) and the
evaluation centre crop (`centre_crop_box`) as integer windows; the crop and
resize of in-memory gray images a batch at a time (Fashion-MNIST) and of
JPEGs one at a time, decoding only the window (ImageNet).
"""

from __future__ import annotations

import math
from typing import Sequence

from byol.data.splits import tf

# Random-resized-crop ranges (Szegedy et al. 2015, as in BYOL): the crop covers
# a fraction U[0.08, 1] of the image area, with log(width / height) uniform.
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RATIO_RANGE = (3. / 4., 4. / 3.)
# Evaluation centre crop: image_size / (image_size + 32) of the shorter side
# (224 / 256 at 224 px), truncated.
EVAL_CROP_PADDING = 32


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


def crop_resize_gray(images_u8, boxes, image_size: int):
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


def _decode_crop_resize(jpeg, box, image_size: int):
  """Decodes only the [y, x, h, w] window of a JPEG, resizes (bicubic)."""
  image = tf.io.decode_and_crop_jpeg(jpeg, box, channels=3)
  image = tf.image.resize(tf.cast(image, tf.float32) / 255.,
                          [image_size, image_size], method='bicubic')
  return tf.clip_by_value(image, 0., 1.)


def random_crop(jpeg, key, image_size: int):
  """A random resized crop of a JPEG (window drawn with stateless `key`)."""
  shape = tf.image.extract_jpeg_shape(jpeg)
  box = sample_crop_boxes(key, shape[0], shape[1], 1)[0]
  return _decode_crop_resize(jpeg, box, image_size)


def centre_crop(jpeg, image_size: int):
  """The evaluation centre crop of a JPEG, resized to image_size."""
  shape = tf.image.extract_jpeg_shape(jpeg)
  box = centre_crop_box(shape[0], shape[1], image_size)
  return _decode_crop_resize(jpeg, box, image_size)
