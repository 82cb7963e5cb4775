"""On-device BYOL view augmentations (JAX; jit-, vmap- and pmap-able).

The host supplies two random resized crops per example (`byol.dataset`);
here each view gets, per image and with that view's probabilities and
strengths (`config.data.augmentations.view1` / `.view2`, BYOL Table 6):

  1. horizontal flip                      p = flip_prob
  2. colour jitter                        p = color_jitter_prob
       brightness, contrast, saturation and hue, in a random order, each
       clipped to [0, 1] after it is applied
  3. grayscale                            p = grayscale_prob
  4. Gaussian blur                        p = blur_prob
  5. solarization                         p = solarize_prob

Each op has the semantics of DeepMind's BYOL (deepmind-research
`byol/utils/augmentations.py`), which are TensorFlow's: brightness adds a
delta; contrast scales around each channel's mean; saturation and hue act in
HSV (`tf.image.adjust_saturation` clips S to [0, 1]); grayscale takes the
ITU-R 601-2 luma; the blur is zero padded, with 2 * int(fraction * side / 2)
+ 1 taps (so none below 20 px at fraction 0.1).

Randomness: `postprocess` splits its key per view, then per image (or, given
one key per example, splits each example's key per view); each image
then draws one vector of independent uniforms, one per random decision (a
different entry for every op), in a single call: each separate random call is
its own threefry computation, and under vmap on CPU each costs about a second
of compile time. Decisions are per image: under vmap a `lax.cond` on a
per-image predicate becomes a select that evaluates both branches anyway, so
every op is written as "compute, then `jnp.where`". The outputs stay in
[0, 1]; the experiment normalises them (`byol.dataset.normalize`).

Strengths and probabilities are read from the view config each call. They may
be Python numbers or traced arrays (so one compiled function can serve many
probabilities); only `blur_kernel_fraction` must be a Python number, since it
fixes the kernel's length.
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# ITU-R 601-2 luma weights, as PIL's and TensorFlow's rgb_to_grayscale.
GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)

ViewConfig = Mapping[str, Any]  # a ConfigDict or a dict with the fields below
VIEW_FIELDS = (
    'flip_prob', 'color_jitter_prob', 'brightness', 'contrast', 'saturation',
    'hue', 'grayscale_prob', 'blur_prob', 'blur_sigma_min', 'blur_sigma_max',
    'blur_kernel_fraction', 'solarize_prob', 'solarize_threshold')


def _luma(image):
  # Written out rather than as a dot product so that XLA fuses it.
  w_r, w_g, w_b = GRAYSCALE_WEIGHTS
  return w_r * image[..., 0] + w_g * image[..., 1] + w_b * image[..., 2]


def to_grayscale(image: jax.Array) -> jax.Array:
  """Luma of an [..., 3] RGB image, kept as 3 identical channels."""
  return jnp.broadcast_to(_luma(image)[..., None], image.shape)


def adjust_hue(image, delta):
  """Rotates the HSV hue of [..., 3] RGB in [0, 1] by `delta` (in turns).

  HSV value (max) and chroma (max - min) are unchanged by a hue rotation, so
  the RGB -> HSV -> RGB round trip is fused: only the hue is computed, in
  sixths of a turn, and each output channel is found from it directly.
  """
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  chroma = value - jnp.minimum(jnp.minimum(r, g), b)
  safe_chroma = jnp.where(chroma > 0, chroma, 1.)
  # Hue in [-1, 5) sixths of a turn, by which channel is the maximum.
  hue6 = jnp.where(value == r, (g - b) / safe_chroma,
                   jnp.where(value == g, 2. + (b - r) / safe_chroma,
                             4. + (r - g) / safe_chroma))
  hue6 = hue6 + 6. * delta

  # Channel n (R: 5, G: 3, B: 1) lies below the value by the chroma times
  # clip(min(k, 4 - k), 0, 1), k = (n + hue6) mod 6.
  def channel(n):
    k = n + hue6
    k = k - 6. * jnp.floor(k / 6.)
    return value - chroma * jnp.clip(jnp.minimum(k, 4. - k), 0., 1.)

  out = jnp.stack([channel(5.), channel(3.), channel(1.)], axis=-1)
  return jnp.clip(out, 0., 1.)


def adjust_brightness(image, delta):
  """Adds `delta` to every channel, clips to [0, 1]."""
  return jnp.clip(image + delta, 0., 1.)


def adjust_contrast(image, factor):
  """Scales [H, W, C] around each channel's mean by `factor`, clips."""
  mean = jnp.mean(image, axis=(-3, -2), keepdims=True)  # per channel
  return jnp.clip((image - mean) * factor + mean, 0., 1.)


def adjust_saturation(image, factor):
  """Scales the HSV saturation of [..., 3] RGB by `factor`, as TensorFlow.

  TensorFlow's `tf.image.adjust_saturation` (and DeepMind's BYOL) converts to
  HSV, multiplies S by `factor`, clips S to [0, 1] and converts back. Hue and
  value (the max channel V) stay, so the round trip reduces to one closed
  form: each channel keeps its distance below V in units of the chroma
  C = max - min, and the chroma becomes clip(S * factor, 0, 1) * V, i.e.
  C * clip(factor, 0, V / C). Gray pixels (C = 0) are unchanged.
  """
  value = jnp.max(image, axis=-1, keepdims=True)
  chroma = value - jnp.min(image, axis=-1, keepdims=True)
  # Where the chroma is 0 every channel equals V and the scale is immaterial.
  limit = value / jnp.where(chroma > 0, chroma, 1.)
  scale = jnp.clip(factor, 0., limit)
  return jnp.clip(value + (image - value) * scale, 0., 1.)


def solarize(image, threshold=0.5):
  """Inverts the values at or above `threshold`: x < t ? x : 1 - x."""
  return jnp.where(image < threshold, image, 1. - image)


def blur_kernel_size(image_side: int, fraction: float) -> int:
  """Number of blur taps at `image_side`, DeepMind's rule.

  DeepMind's BYOL takes a kernel "size" of side / blur_divider (a float: 22.4
  at 224 px) and a radius of int(size / 2), so 2 * int(fraction * side / 2) + 1
  taps: 23 at 224 px, 3 from 20 to 39 px (the local preset's 24 px included),
  and a single tap, which leaves the image as it is, below 20 px.
  """
  return 2 * int(fraction * image_side / 2) + 1


def gaussian_blur(image: jax.Array, sigma, kernel_size: int) -> jax.Array:
  """Separable Gaussian blur of one [H, W, C] image, zero padded.

  As DeepMind's BYOL (a 'SAME' depthwise convolution): the borders read
  zeros, so an image darkens near its edges (a constant image by up to about
  half per axis at large sigma); the `kernel_size` taps are normalised to sum
  to one before the padding is applied. Each 1-D pass is a matrix product
  with a banded [side, side] matrix whose entries are the taps: matrix units
  (and CPUs) run that far faster than a convolution whose kernel differs per
  image, as it does under vmap. Dropping the taps that fall outside the image
  is exactly zero padding, even where the kernel is longer than the image.
  """
  radius = kernel_size // 2
  offsets = jnp.arange(-radius, radius + 1, dtype=image.dtype)
  norm = jnp.sum(jnp.exp(-0.5 * (offsets / sigma) ** 2))

  def band(size):
    # [size, size]: entry (i, j) weighs input j in output i.
    distance = np.arange(size)[None, :] - np.arange(size)[:, None]
    weights = jnp.exp(-0.5 * (distance.astype(np.float32) / sigma) ** 2)
    return jnp.where(np.abs(distance) <= radius, weights / norm, 0.)

  image = jnp.einsum('ij,jwc->iwc', band(image.shape[-3]), image,
                     precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum('wv,ivc->iwc', band(image.shape[-2]), image,
                    precision=jax.lax.Precision.HIGHEST)


def _blend(image, scale, mean_weight, offset, saturation):
  """clip(k * x + (1 - k) * s * max(x) + mean_weight * mean(x) + offset).

  k is `scale`, except for saturation (s = 1), where it is the per-pixel
  clip(scale, 0, V / C) of `adjust_saturation`. Brightness (1, 0, delta, 0),
  contrast (c, 1 - c, 0, 0) and saturation (f, 0, 0, 1) are each one instance
  of this map, so a randomly chosen one of them costs one evaluation (a
  select of four scalars) rather than one evaluation of every candidate.
  """
  # Channels written out rather than reduced over the last axis, so that XLA
  # fuses the whole map.
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  chroma = value - jnp.minimum(jnp.minimum(r, g), b)
  limit = value / jnp.where(chroma > 0, chroma, 1.)
  k = jnp.where(saturation > 0, jnp.clip(scale, 0., limit), scale)[..., None]
  mean = jnp.mean(image, axis=(-3, -2))  # per channel
  return jnp.clip(k * image + (1. - k) * saturation * value[..., None] +
                  mean_weight * mean + offset, 0., 1.)


def _color_jitter(image, u, cfg: ViewConfig):
  """Brightness, contrast, saturation and hue in a random order.

  Each adjustment is clipped to [0, 1] before the next one. `u` holds eight
  independent U[0, 1) numbers: four strengths, then four order keys.
  """
  lo = jnp.asarray([-cfg['brightness'], 1 - cfg['contrast'],
                    1 - cfg['saturation'], -cfg['hue']], image.dtype)
  hi = jnp.asarray([cfg['brightness'], 1 + cfg['contrast'],
                    1 + cfg['saturation'], cfg['hue']], image.dtype)
  delta_b, factor_c, factor_s, delta_h = lo + (hi - lo) * u[:4]
  # _blend parameters of brightness (0), contrast (1), saturation (2).
  zero = jnp.zeros_like(delta_b)
  params = jnp.stack([
      jnp.stack([zero + 1., zero, delta_b, zero]),
      jnp.stack([factor_c, 1. - factor_c, zero, zero]),
      jnp.stack([factor_s, zero, zero, zero + 1.])])
  identity = jnp.stack([zero + 1., zero, zero, zero])

  # A random order of the four ops: op i comes at position rank[i] (3 = hue).
  # Ranks from pairwise comparisons of uniforms: cheaper to compile under
  # vmap than a sort-based permutation.
  u = u[4:]
  rank = jnp.sum(u[None, :] < u[:, None], axis=1)
  # Hue, the costly op, is evaluated once. The three cheap ops keep their
  # relative order in three slots; a slot runs before hue if its op comes
  # before hue, after it otherwise (the other run of the slot is identity).
  hue_at = rank[3]
  cheap_rank = jnp.sum(u[None, :3] < u[:3, None], axis=1)
  slot_params = [jnp.sum(jnp.where((cheap_rank == t)[:, None], params, 0.),
                         axis=0) for t in range(3)]
  for t in range(3):
    image = _blend(image, *jnp.where(t < hue_at, slot_params[t], identity))
  image = adjust_hue(image, delta_h)
  for t in range(3):
    image = _blend(image, *jnp.where(t >= hue_at, slot_params[t], identity))
  return image


def augment_view(image: jax.Array, rng: jax.Array,
                 view_config: ViewConfig) -> jax.Array:
  """Augments one [H, W, 3] image in [0, 1] with one view's settings.

  Args:
    image: float [H, W, 3] in [0, 1].
    rng: a PRNG key, used for this image only.
    view_config: the view's fields (see VIEW_FIELDS), e.g.
      `config.data.augmentations.view1`.

  Returns:
    The augmented image, same shape and dtype, in [0, 1].
  """
  cfg = view_config
  # All of the image's random numbers in one draw, one (or, for the jitter,
  # eight) per decision: one threefry call instead of one per op, which
  # matters for compile time under vmap on CPU (seconds per call).
  u = jax.random.uniform(rng, (14,), dtype=image.dtype)
  u_flip, u_jitter_on, u_gray, u_blur_on, u_sigma, u_solarize = u[:6]
  u_jitter = u[6:14]

  image = jnp.where(u_flip < cfg['flip_prob'], image[:, ::-1], image)

  image = jnp.where(u_jitter_on < cfg['color_jitter_prob'],
                    _color_jitter(image, u_jitter, cfg), image)

  image = jnp.where(u_gray < cfg['grayscale_prob'], to_grayscale(image), image)

  sigma = cfg['blur_sigma_min'] + (
      cfg['blur_sigma_max'] - cfg['blur_sigma_min']) * u_sigma
  taps = blur_kernel_size(image.shape[0], cfg['blur_kernel_fraction'])
  if taps > 1:  # a single tap is the identity (DeepMind's rule below 20 px)
    image = jnp.where(u_blur_on < cfg['blur_prob'],
                      gaussian_blur(image, sigma, taps), image)

  image = jnp.where(u_solarize < cfg['solarize_prob'],
                    solarize(image, cfg['solarize_threshold']), image)
  return jnp.clip(image, 0., 1.)


def _augment_images(images, rng, view_config):
  """vmaps `augment_view` over any leading dims of [..., H, W, 3] images."""
  lead = images.shape[:-3]
  flat = images.reshape((-1,) + images.shape[-3:])
  keys = jax.random.split(rng, flat.shape[0])
  out = jax.vmap(lambda x, k: augment_view(x, k, view_config))(flat, keys)
  return out.reshape(lead + images.shape[-3:])


def _is_key_batch(rng: jax.Array) -> bool:
  """True for a batch of keys ([B] typed or [B, 2] raw), False for one key."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim > 0
  return rng.ndim > 1


def _augment_with_keys(images, keys, view_config):
  """Augments [B, H, W, 3] images, image b with `keys[b]`."""
  return jax.vmap(lambda x, k: augment_view(x, k, view_config))(images, keys)


def postprocess(inputs: Mapping[str, jax.Array], rng: jax.Array,
                config) -> dict:
  """Augments the two views of a PRETRAIN batch, on device.

  Args:
    inputs: {'view1', 'view2', ...}: float [..., H, W, 3] images in [0, 1]
      (the leading dims, e.g. [per_device_batch], are kept); other entries
      (labels) pass through.
    rng: either one PRNG key, split into one key per view and then per image;
      or one key per example, shaped like the images' leading dims (a [B]
      batch of typed keys, or [B, 2] raw keys): example b's two views then
      depend on `rng[b]` alone, whatever the batch around it. The experiment
      uses the latter so that an example's augmentations do not depend on how
      the global batch is split over devices, processes and micro-batches.
    config: `config.data.augmentations`, with `view1` and `view2` fields.
      Close over it (functools.partial) when jitting: it is not an array.

  Returns:
    A dict like `inputs` with both views augmented (still in [0, 1]).
  """
  out = dict(inputs)
  if not _is_key_batch(rng):
    rng1, rng2 = jax.random.split(rng)
    out['view1'] = _augment_images(inputs['view1'], rng1, config['view1'])
    out['view2'] = _augment_images(inputs['view2'], rng2, config['view2'])
    return out
  images = inputs['view1']
  lead = images.shape[:-3]
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  if rng.shape[:rng.ndim - (0 if typed else 1)] != lead:
    raise ValueError(f'per-example keys of shape {rng.shape} do not match '
                     f'images of shape {images.shape}')
  keys = rng.reshape((-1,) + rng.shape[len(lead):])
  view_keys = jax.vmap(jax.random.split)(keys)  # [N, 2] keys: one per view
  for i, view in enumerate(('view1', 'view2')):
    flat = inputs[view].reshape((-1,) + inputs[view].shape[-3:])
    augmented = _augment_with_keys(flat, view_keys[:, i], config[view])
    out[view] = augmented.reshape(inputs[view].shape)
  return out
