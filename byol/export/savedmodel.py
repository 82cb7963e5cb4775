"""The encoder as a TensorFlow SavedModel, through `jax.experimental.jax2tf`.

The project's own evaluation-mode forward (`model.make_forward`, input
normalisation included) is converted, not re-implemented: whatever the
normalization (`affine` and `none` too), the SavedModel computes what the
evaluators measure. Parameters and BatchNorm averages are `tf.Variable`s of
the saved module (so XLA does not fold them into the program as constants).

Serving signature `serving_default`:
  images: float32 [batch, H, W, 3], RGB in [0, 1] (uint8 pixels / 255),
    centre-cropped and resized as the training data were; H and W must be
    multiples of the encoder's total stride (32 with the ImageNet stem, e.g.
    224; 8 with the small stem, e.g. 24 or 32). The dataset's mean/std
    normalisation is inside.
  returns: `embedding` [batch, D]; `logits` [batch, classes] (the online
    classifier); with heads, `projection` (and BYOL's `prediction`).
"""

import os
from typing import Any, Dict

import haiku as hk
import jax
import ml_collections
import numpy as np

from byol import model
from byol.export import torch_layout


def outputs(config: ml_collections.ConfigDict, heads: bool):
  """The names the serving signature returns."""
  out = ['embedding', 'logits']
  if heads:
    out += ['projection'] + (['prediction'] if config.method == 'byol'
                              else [])
  return out


def _forward(config: ml_collections.ConfigDict, heads: bool):
  # XLA's own convolution, the same function: a SavedModel runs wherever
  # TensorFlow does, without this process's custom calls (`onednn`), and
  # jax2tf refuses custom calls it does not know.
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.encoder.conv_impl = 'lax'
  forward = model.Network(config, axis_name=None).forward
  keep = outputs(config, heads)

  def apply(params, state, images):
    out, _ = forward.apply(params, state, None, images, False)
    return {k: out[k] for k in keep}

  return apply


def save(config: ml_collections.ConfigDict, params: hk.Params,
         state: hk.State, path: str, heads: bool = False) -> Dict[str, Any]:
  """Writes the SavedModel to `path` (a new folder).

  Returns:
    A description of its signature for encoder.json / the README.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  stride = torch_layout.TOTAL_STRIDE[config.model.encoder.stem]
  apply = _forward(config, heads)
  to_var = lambda x: tf.Variable(np.asarray(x), trainable=False)
  module = tf.Module()
  module.params = jax.tree.map(to_var, params)
  module.state = jax.tree.map(to_var, state)
  # Batch and spatial sizes stay symbolic; the spatial ones as multiples of
  # the total stride, so that every SAME-padded stride-2 layer's output size
  # is an exact quotient and residual shapes provably agree.
  converted = jax2tf.convert(
      apply, with_gradient=False,
      polymorphic_shapes=[None, None, f'(b, {stride}*h, {stride}*w, 3)'])

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.float32, name='images')])
  def serve(images):
    # A clear message instead of XLA's shape-refinement failure.
    checks = [tf.debugging.assert_equal(
        tf.shape(images)[axis] % stride, 0,
        message=f'image {side} must be a multiple of {stride}')
              for axis, side in ((1, 'height'), (2, 'width'))]
    with tf.control_dependencies(checks):
      images = tf.identity(images)
    return converted(module.params, module.state, images)

  module.serve = serve
  tf.saved_model.save(module, path, signatures={'serving_default': serve})
  return {
      'signature': 'serving_default',
      'input': f'images: float32 [batch, H, W, 3], RGB in [0, 1]; H, W '
               f'multiples of {stride} (trained at {config.data.image_size})',
      'outputs': outputs(config, heads),
  }


def load_signature(path: str):
  """The reloaded SavedModel's `serving_default` (for checks)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.saved_model.load(os.path.abspath(path)).signatures[
      'serving_default']
