"""Tests of byol.augmentations: each op's values, each view's probabilities."""

import colorsys
import functools
import importlib.util
import itertools
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
import tensorflow as tf

from byol import augmentations as aug

_CONFIG_PATH = os.path.join(os.path.dirname(__file__), '..', 'configs',
                            'byol.py')


def _augmentation_config():
  spec = importlib.util.spec_from_file_location('byol_config', _CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config().data.augmentations


AUG_CONFIG = _augmentation_config()
PROB_FIELDS = ('flip_prob', 'color_jitter_prob', 'grayscale_prob', 'blur_prob',
               'solarize_prob')


def _view(view='view1', **overrides):
  cfg = dict(AUG_CONFIG[view].to_dict())
  cfg.update(overrides)
  return cfg


# Jitted once here: op-by-op (eager) execution compiles every primitive
# separately, which costs seconds per test on a small CPU.
blur = jax.jit(aug.gaussian_blur, static_argnums=2)
adjust_hue = jax.jit(aug.adjust_hue)
adjust_brightness = jax.jit(aug.adjust_brightness)
adjust_contrast = jax.jit(aug.adjust_contrast)
adjust_saturation = jax.jit(aug.adjust_saturation)


# --- single ops --------------------------------------------------------------


def test_solarize():
  x = jnp.asarray([0.25, 0.75, 0.5, 0.0, 1.0])
  np.testing.assert_allclose(aug.solarize(x, 0.5), [0.25, 0.25, 0.5, 0., 0.])


def test_grayscale_of_pure_red():
  red = jnp.zeros((4, 4, 3)).at[..., 0].set(1.)
  np.testing.assert_allclose(aug.to_grayscale(red), 0.2989, atol=1e-7)
  white = jnp.ones((2, 2, 3))
  np.testing.assert_allclose(aug.to_grayscale(white), 0.9999, atol=1e-6)


def test_blur_kernel_size():
  # DeepMind: radius int(side / 10 / 2), so 2 * floor(side / 20) + 1 taps.
  sizes = {224: 23, 64: 7, 40: 5, 39: 3, 24: 3, 20: 3, 19: 1, 16: 1, 8: 1}
  assert {s: aug.blur_kernel_size(s, 0.1) for s in sizes} == sizes
  for side in range(1, 2049):
    assert aug.blur_kernel_size(side, 0.1) == 2 * (side // 20) + 1, side


def test_blur_of_a_constant_image_darkens_at_the_borders():
  # Zero padding, as DeepMind's 'SAME' convolution: the corner keeps only
  # the part of the 2-D kernel inside the image, 0.8 * (k_0 / 2 + 1 / 2)^2
  # for a normalised symmetric 1-D kernel k (k_0 its centre tap).
  cases = [(224, 23, 1.0, 0.3914), (224, 23, 2.0, 0.2877), (24, 3, 2.0, 0.3708)]
  for side, taps, sigma, corner in cases:
    out = np.asarray(blur(jnp.full((side, side, 3), 0.8), sigma, taps))
    k = np.exp(-0.5 * (np.arange(-(taps // 2), taps // 2 + 1) / sigma)**2)
    k0 = k[taps // 2] / k.sum()
    np.testing.assert_allclose(out[0, 0], 0.8 * (k0 / 2 + 0.5)**2, rtol=1e-5)
    np.testing.assert_allclose(out[0, 0], corner, atol=1e-4)
    np.testing.assert_allclose(out[-1, -1], corner, atol=1e-4)
    # Farther than the radius from every border the image stays 0.8.
    r = taps // 2
    np.testing.assert_allclose(out[r:side - r, r:side - r], 0.8, atol=1e-6)
  # A constant patch in a random frame: its interior (more than the kernel
  # radius from the patch edge) keeps its mean and value.
  frame = jax.random.uniform(jax.random.key(0), (64, 64, 3))
  frame = frame.at[10:54, 10:54].set(0.3)
  out = blur(frame, 1.5, 7)
  assert abs(float(out[13:51, 13:51].mean()) - 0.3) < 1e-6


@pytest.mark.parametrize('height, width, taps, sigma', [
    (32, 32, 3, 0.7), (24, 40, 5, 1.3), (17, 9, 7, 2.0),
    (8, 8, 23, 2.0),  # a kernel longer than the image: all outside is zero
])
def test_blur_equals_a_zero_padded_convolution(height, width, taps, sigma):
  image = np.asarray(jax.random.uniform(jax.random.key(taps),
                                        (height, width, 3)))
  r = taps // 2
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma)**2)
  k2 = np.outer(k, k) / k.sum()**2
  expected = np.stack([
      ndimage.correlate(image[..., c].astype(np.float64), k2,
                        mode='constant', cval=0.) for c in range(3)], -1)
  out = np.asarray(blur(jnp.asarray(image), sigma, taps))
  np.testing.assert_allclose(out, expected, atol=1e-6)
  # A 1-tap kernel is the identity.
  np.testing.assert_array_equal(blur(jnp.asarray(image), sigma, 1), image)


def test_blur_impulse_response():
  impulse = jnp.zeros((41, 41, 1)).at[20, 20].set(1.)
  out = np.asarray(blur(impulse, 2.0, 23))[..., 0]
  assert abs(out.sum() - 1.) < 1e-5
  offsets = np.arange(-20, 21)
  var_y = (out.sum(1) * offsets**2).sum()
  var_x = (out.sum(0) * offsets**2).sum()
  # A sampled Gaussian of sigma 2, truncated at 11 taps: variance 4.000.
  assert abs(var_y - 4.0) < 1e-3 and abs(var_x - 4.0) < 1e-3
  np.testing.assert_allclose(out, out.T, atol=1e-7)


def test_hue_shift_of_zero_is_identity():
  x = jax.random.uniform(jax.random.key(1), (32, 32, 3))
  x = x.at[0, :8].set(jnp.asarray([0.5, 0.5, 0.5]))  # gray: hue undefined
  np.testing.assert_allclose(adjust_hue(x, 0.), x, atol=1e-6)
  np.testing.assert_allclose(adjust_hue(x, 1.), x, atol=1e-5)


@pytest.mark.parametrize('delta', [0.1, -0.1, 0.5])
def test_hue_shift_matches_colorsys(delta):
  pixels = np.asarray(jax.random.uniform(jax.random.key(2), (200, 3)))
  expected = []
  for r, g, b in pixels:
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    expected.append(colorsys.hsv_to_rgb((h + delta) % 1., s, v))
  np.testing.assert_allclose(adjust_hue(jnp.asarray(pixels), delta),
                             expected, atol=1e-5)


def test_contrast_and_saturation():
  x = jax.random.uniform(jax.random.key(3), (16, 16, 3), minval=0.3,
                         maxval=0.7)
  x, out = np.asarray(x), np.asarray(adjust_contrast(x, 0.5))
  np.testing.assert_allclose(out.mean((0, 1)), x.mean((0, 1)), atol=1e-6)
  np.testing.assert_allclose(out.std((0, 1)), 0.5 * x.std((0, 1)), atol=1e-6)
  # HSV saturation 0 leaves the value: every channel becomes the pixel's max
  # (not its luma, as a blend with grey would give).
  np.testing.assert_allclose(adjust_saturation(x, 0.),
                             np.broadcast_to(x.max(-1, keepdims=True),
                                             x.shape), atol=1e-6)
  np.testing.assert_allclose(adjust_saturation(x, 1.), x, atol=1e-6)
  np.testing.assert_allclose(adjust_brightness(x, 0.5), np.clip(x + .5, 0, 1))


def _random_images(seed, n=16, side=24):
  """Uniform RGB images with gray, black, white and saturated pixels too."""
  x = np.random.default_rng(seed).uniform(size=(n, side, side, 3))
  x = x.astype(np.float32)
  x[:, 0, :4] = [[0., 0., 0.], [1., 1., 1.], [.4, .4, .4], [1., 0., 0.]]
  x[:, 1, :3] = [[0., 1., .5], [.2, .2, .9], [.9, .9, .2]]
  return x


@pytest.mark.parametrize('factor', [0., 0.5, 0.8, 0.93, 1.07, 1.2, 2.0, 5.0])
def test_saturation_matches_tensorflow(factor):
  # DeepMind's saturation is tf.image.adjust_saturation's rule: HSV, S scaled
  # and clipped to [0, 1]. The blend with grey it replaces was 0.17 off at
  # factor 0.8.
  x = _random_images(12)
  expected = np.clip(tf.image.adjust_saturation(x, factor).numpy(), 0., 1.)
  out = np.asarray(adjust_saturation(jnp.asarray(x), factor))
  assert np.abs(out - expected).max() < 1e-5


@pytest.mark.parametrize('delta', [-0.1, -0.037, 0.05, 0.1, 0.5])
def test_hue_brightness_and_contrast_match_tensorflow(delta):
  x = _random_images(13)
  hue = np.clip(tf.image.adjust_hue(x, delta).numpy(), 0., 1.)
  out = np.asarray(adjust_hue(jnp.asarray(x), delta))
  assert np.abs(out - hue).max() < 1e-5
  brightness = np.clip(tf.image.adjust_brightness(x, 4 * delta).numpy(), 0, 1)
  np.testing.assert_allclose(adjust_brightness(jnp.asarray(x), 4 * delta),
                             brightness, atol=1e-6)
  # Contrast: per image and per channel mean, as TensorFlow (and DeepMind).
  factor = 1. + 4 * delta
  contrast = np.clip(tf.image.adjust_contrast(x, factor).numpy(), 0., 1.)
  out = jax.vmap(lambda im: adjust_contrast(im, factor))(jnp.asarray(x))
  np.testing.assert_allclose(out, contrast, atol=1e-5)


def test_color_jitter_applies_the_four_ops_in_the_drawn_order():
  # The fused implementation must equal TensorFlow's four ops (DeepMind's
  # definitions), each clipped to [0, 1], applied in the order given by
  # ranking u[4:8], with strengths from u[:4]: checked for each of the 24
  # orders.
  cfg = _view()
  image = jax.random.uniform(jax.random.key(4), (8, 8, 3))
  color_jitter = aug._color_jitter  # pylint: disable=protected-access
  jitter = jax.jit(lambda u: color_jitter(image, u, cfg))
  strengths = np.asarray(jax.random.uniform(jax.random.key(5), (24, 4)))
  orders = list(itertools.permutations(range(4)))
  clip = lambda t: tf.clip_by_value(t, 0., 1.)
  for order, t in zip(orders, strengths):
    b, c, s, h = [lo + (hi - lo) * v for (lo, hi), v in zip(
        [(-.4, .4), (.6, 1.4), (.8, 1.2), (-.1, .1)], t)]
    ops = [lambda x: clip(tf.image.adjust_brightness(x, b)),
           lambda x: clip(tf.image.adjust_contrast(x, c)),
           lambda x: clip(tf.image.adjust_saturation(x, s)),
           lambda x: clip(tf.image.adjust_hue(x, h))]
    ranks = np.argsort(order)  # op i comes at position ranks[i]
    u = np.concatenate([t, (ranks + 0.5) / 4]).astype(np.float32)
    expected = tf.constant(np.asarray(image))
    for i in order:
      expected = ops[i](expected)
    np.testing.assert_allclose(jitter(jnp.asarray(u)), expected.numpy(),
                               atol=2e-5)
  assert len(set(orders)) == 24


def test_flip_is_exact():
  # The probabilities are traced arguments: one compilation for both cases.
  @jax.jit
  def augment(image, key, flip_prob):
    cfg = _view(**{f: 0. for f in PROB_FIELDS})
    cfg['flip_prob'] = flip_prob
    return aug.augment_view(image, key, cfg)
  x = jax.random.uniform(jax.random.key(6), (12, 12, 3))
  np.testing.assert_array_equal(augment(x, jax.random.key(0), 1.), x[:, ::-1])
  np.testing.assert_array_equal(augment(x, jax.random.key(0), 0.), x)


# --- per-view probabilities --------------------------------------------------

N_DRAWS = 2_000
SIDE = 8


def _test_images():
  """A [SIDE, SIDE, 3] image per op on which the op's effect is detectable."""
  ramp = jnp.linspace(0.1, 0.9, SIDE, dtype=jnp.float32)
  checker = (jnp.indices((SIDE, SIDE)).sum(0) % 2).astype(jnp.float32)
  colour = jax.random.uniform(jax.random.key(7), (SIDE, SIDE, 3), minval=0.2,
                              maxval=0.8)
  return {
      'flip_prob': jnp.broadcast_to(ramp[None, :, None], (SIDE, SIDE, 3)),
      'color_jitter_prob': colour,
      'grayscale_prob': colour,
      # Even a sigma of 0.1 moves a 0 next to a 1 (by ~1e-22, not rounded).
      'blur_prob': jnp.broadcast_to(checker[..., None], (SIDE, SIDE, 3)),
      'solarize_prob': jnp.full((SIDE, SIDE, 3), 0.75, jnp.float32),
  }


def _applied(before, after):
  """[5] frequencies with which each op (PROB_FIELDS order) was detected,
  each detector meant for its own test image."""
  flipped = after[:, 0, 0, 0] > after[:, 0, -1, 0]
  changed = (after != before).any(axis=(1, 2, 3))
  gray = jnp.ptp(after, axis=-1).max(axis=(1, 2)) < 1e-6
  solarized = (after < 0.5).all(axis=(1, 2, 3))
  return jnp.stack([flipped, changed, gray, changed, solarized]).mean(axis=1)


@jax.jit
def _frequencies(image, key, probs, strengths):
  # One compilation serves every view, op and probability: they are traced
  # arguments (only the kernel fraction, fixed, shapes the computation).
  # 0.4 gives 3 taps at 8 px; 0.1 would give DeepMind's single tap (no blur).
  cfg = dict(strengths, **probs, blur_kernel_fraction=0.4)
  images = jnp.broadcast_to(image, (N_DRAWS,) + image.shape)
  out = aug._augment_images(images, key, cfg)  # pylint: disable=protected-access
  return _applied(images, out)


@pytest.mark.parametrize('view, field',
                         list(itertools.product(('view1', 'view2'),
                                                PROB_FIELDS)))
def test_each_view_probability(view, field):
  config = AUG_CONFIG[view]
  p = float(config[field])
  probs = {f: jnp.float32(0.) for f in PROB_FIELDS}
  probs[field] = jnp.float32(p)  # the op under test alone
  strengths = {k: jnp.float32(v) for k, v in config.items()
               if k not in PROB_FIELDS and k != 'blur_kernel_fraction'}
  key = jax.random.fold_in(jax.random.key(8), PROB_FIELDS.index(field))
  freq = float(_frequencies(_test_images()[field], key, probs, strengths)[
      PROB_FIELDS.index(field)])
  tolerance = 3 * math.sqrt(p * (1 - p) / N_DRAWS)
  assert abs(freq - p) <= tolerance + 1e-9, (view, field, freq, p)


def test_view_probabilities_come_from_the_config():
  assert (AUG_CONFIG.view1.blur_prob, AUG_CONFIG.view2.blur_prob) == (1., .1)
  assert (AUG_CONFIG.view1.solarize_prob,
          AUG_CONFIG.view2.solarize_prob) == (0., .2)


# --- postprocess -------------------------------------------------------------


def _batch(n=8, side=24, seed=9):
  k1, k2 = jax.random.split(jax.random.key(seed))
  views = [jax.random.uniform(k, (n, side, side, 3)) for k in (k1, k2)]
  # Extremes too: ops must keep 0 and 1 in range.
  views[0] = views[0].at[0].set(0.).at[1].set(1.)
  # Leading dims [2, n / 2], as [devices, per_device] or [accum, per_device].
  return jax.tree.map(lambda x: x.reshape((2, n // 2) + x.shape[1:]), {
      'view1': views[0], 'view2': views[1],
      'labels': jnp.arange(n, dtype=jnp.int32)})


@functools.lru_cache(maxsize=None)
def _guarded_postprocess():
  """`postprocess` jitted once for the module, guarded against retracing:
  every call below (several batches' worth of keys) must reuse its one
  compilation."""
  @chex.assert_max_traces(n=1)
  def augment(batch, key):
    return aug.postprocess(batch, key, AUG_CONFIG)
  return jax.jit(augment)


class PostprocessVariantsTest(chex.TestCase):
  """`postprocess` plain (op by op), jitted and pmapped: the same views."""

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_postprocess_equals_the_jitted_form_and_stays_in_range(self):
    batch, key = _batch(), jax.random.PRNGKey(10)
    out = self.variant(
        lambda b, k: aug.postprocess(b, k, AUG_CONFIG))(batch, key)
    reference = _guarded_postprocess()(batch, key)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, batch)
    for k in ('view1', 'view2'):
      chex.assert_trees_all_close(out[k], reference[k], atol=1e-5, rtol=0)
      chex.assert_shape(out[k], (2, 4, 24, 24, 3))
      chex.assert_type(out[k], jnp.float32)
      assert float(out[k].min()) >= 0. and float(out[k].max()) <= 1.
      assert float(jnp.abs(out[k] - batch[k]).mean()) > 0.01
    chex.assert_trees_all_equal(out['labels'], batch['labels'])
    # View 1 always blurs: a blurred image has less pixel-to-pixel variation.
    tv = lambda x: float(jnp.abs(jnp.diff(x, axis=-2)).mean())
    assert tv(out['view1']) < tv(batch['view1'])


def test_postprocess_is_a_function_of_its_key_and_compiles_once():
  batch, key = _batch(), jax.random.PRNGKey(10)
  jitted = _guarded_postprocess()
  out = jitted(batch, key)
  # Different keys, different views; the same key, the same views.
  again = jitted(batch, key)
  other = jitted(batch, jax.random.PRNGKey(11))
  chex.assert_trees_all_equal(again, out)
  assert float(jnp.abs(other['view1'] - out['view1']).max()) > 0.1
  # Another batch shape is another program: the guard says so.
  with pytest.raises(AssertionError, match='assert_max_traces'):
    jitted(jax.tree.map(lambda x: x[:, :2], batch), key)


class ColourOpVariantsTest(chex.TestCase):
  """The single ops, plain, jitted and pmapped, against TensorFlow's."""

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_ops_match_tensorflow(self):
    x = _random_images(14, n=2, side=8)
    variant = lambda fn: self.variant(fn)(jnp.asarray(x))
    checks = [
        (lambda im: aug.adjust_hue(im, 0.1), tf.image.adjust_hue(x, 0.1)),
        (lambda im: aug.adjust_saturation(im, 0.6),
         tf.image.adjust_saturation(x, 0.6)),
        (lambda im: aug.adjust_brightness(im, 0.2),
         tf.image.adjust_brightness(x, 0.2)),
        (jax.vmap(lambda im: aug.adjust_contrast(im, 1.3)),
         tf.image.adjust_contrast(x, 1.3)),
        (aug.to_grayscale, tf.image.rgb_to_grayscale(x)),
        (lambda im: aug.solarize(im, 0.5), tf.where(x < 0.5, x, 1. - x)),
    ]
    for fn, expected in checks:
      out = variant(fn)
      chex.assert_trees_all_close(
          jnp.broadcast_to(out, x.shape), np.broadcast_to(np.clip(
              expected.numpy(), 0., 1.), x.shape), atol=1e-4, rtol=0)

  @chex.variants(with_jit=True, without_jit=True, with_pmap=True)
  def test_blur_equals_a_zero_padded_convolution(self):
    image = _random_images(15, n=1, side=12)[0]
    k = np.exp(-0.5 * (np.arange(-2, 3) / 1.3)**2)
    k2 = np.outer(k, k) / k.sum()**2
    expected = np.stack([ndimage.correlate(
        image[..., c].astype(np.float64), k2, mode='constant', cval=0.)
                         for c in range(3)], -1)
    out = self.variant(lambda im, s: aug.gaussian_blur(im, s, 5))(
        jnp.asarray(image), jnp.float32(1.3))
    chex.assert_trees_all_close(out, expected, atol=1e-6, rtol=0)
