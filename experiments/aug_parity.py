"""Measures the augmentations and crops against DeepMind's BYOL (issue 11, 1-4).

  cd REPO && python experiments/aug_parity.py

It imports `byol` from the current directory, so running it from a checkout of
an older commit (e.g. `git worktree add /tmp/before COMMIT`, then
`cd /tmp/before && python /path/to/experiments/aug_parity.py`) measures that
commit's code. Prints, per item:

  1. saturation: max |ours - tf.image.adjust_saturation| over random 24 px
     images and factors 0.8 ... 1.2 (and the fraction of pixels off by more
     than 1e-3); hue against tf.image.adjust_hue likewise;
  2. blur: the corner and edge-middle value of a blurred constant 0.8 image at
     224 px and 24 px (sigma 1 and 2, and the mean over sigma ~ U[0.1, 2]),
     and the number of taps at 16, 24 and 224 px;
  3. random-resized crop: mean area fraction, fraction spanning the full height
     or width, fraction of aspect ratios outside [3/4, 4/3], over 100,000
     draws on 375 x 500 and 200 x 600 images;
  4. centre crop: the fraction of shorter sides 200..800 whose crop side
     differs from DeepMind's int(224 / 256 x side), for a rounded side (the
     rule before) and for this code, and the box of 375 x 500.
"""

import os
import sys

sys.path.insert(0, os.getcwd())

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from byol import augmentations as aug  # pylint: disable=g-import-not-at-top,wrong-import-position
from byol import dataset  # pylint: disable=g-import-not-at-top,wrong-import-position
from byol.data import crops as crops_lib  # pylint: disable=g-import-not-at-top,wrong-import-position


def saturation_and_hue():
  images = np.random.default_rng(0).uniform(size=(64, 24, 24, 3))
  images = images.astype(np.float32)
  saturation = jax.jit(aug.adjust_saturation)
  for factor in (0.8, 0.9, 1.1, 1.2):
    diff = np.abs(np.asarray(saturation(images, factor)) -
                  tf.image.adjust_saturation(images, factor).numpy())
    print(f'1. saturation {factor}: max |ours - tf| {diff.max():.2e}, '
          f'pixels off by > 1e-3: {(diff.max(-1) > 1e-3).mean():.1%}')
  hue = jax.jit(aug.adjust_hue)
  worst = max(float(np.abs(np.asarray(hue(images, d)) -
                           tf.image.adjust_hue(images, d).numpy()).max())
              for d in (-0.1, -0.03, 0.05, 0.1))
  print(f'1. hue: max |ours - tf| {worst:.2e}')


def blur():
  blur_fn = jax.jit(aug.gaussian_blur, static_argnums=2)
  sigmas = np.round(np.linspace(0.1, 2.0, 39), 2)
  for side in (224, 24):
    taps = aug.blur_kernel_size(side, 0.1)
    image = jnp.full((side, side, 3), 0.8)
    corners = {float(s): np.asarray(blur_fn(image, float(s), taps))
               for s in sigmas}
    for sigma in (1.0, 2.0):
      out = corners[sigma]
      print(f'2. blur {side} px, {taps} taps, sigma {sigma}: corner '
            f'{out[0, 0, 0]:.4f}, edge middle {out[0, side // 2, 0]:.4f}')
    mean = np.mean([c[0, 0, 0] for c in corners.values()])
    print(f'2. blur {side} px: corner averaged over sigma U[0.1, 2] {mean:.4f}')
  print('2. taps at 16 / 24 / 224 px:',
        [aug.blur_kernel_size(s, 0.1) for s in (16, 24, 224)])


def crops():
  for height, width in ((375, 500), (200, 600)):
    boxes = crops_lib.sample_crop_boxes(np.asarray((3, 5), np.int64), height,
                                        width, 100_000).numpy()
    _, _, h, w = boxes.T
    area = h * w / (height * width)
    full = ((h == height) | (w == width)).mean()
    ratio = w / h
    outside = ((ratio < 3 / 4) | (ratio > 4 / 3)).mean()
    print(f'3. crop {height} x {width}: mean area {area.mean():.4f}, full '
          f'height or width {full:.1%}, aspect outside [3/4, 4/3] '
          f'{outside:.1%}')


def centre_crop():
  sides = np.arange(200, 801)
  rounded = np.round(224 / 256 * sides).astype(np.int64)
  print(f'4. centre crop: a rounded side is off DeepMind\'s for '
        f'{(rounded != (224 / 256 * sides).astype(np.int64)).mean():.1%} '
        'of the sides 200..800')
  if not hasattr(dataset, 'centre_crop_box'):
    print('4. centre crop: no dataset.centre_crop_box in this version')
    return
  ours = dataset.centre_crop_box(sides, sides).numpy()[:, 2]
  deepmind = (224 / 256 * sides).astype(np.int64)
  print(f'4. centre crop: sides 200..800 off DeepMind\'s: '
        f'{(ours != deepmind).mean():.1%}; box of 375 x 500: '
        f'{dataset.centre_crop_box(375, 500).numpy().tolist()}')


if __name__ == '__main__':
  saturation_and_hue()
  blur()
  crops()
  centre_crop()
