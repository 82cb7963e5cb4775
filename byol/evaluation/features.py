"""Frozen-encoder features: the embedding function, cached features, BN calibration.

Every evaluator reads the encoder through an `EmbedFn`, `embed(params, state,
images) -> [B, D]`, on images in [0, 1] (the dataset's normalization is
applied inside), so that the same evaluator runs on this project's
checkpoints, on DeepMind's, or on raw pixels (`pixels_embed`).
"""

import functools
from typing import Callable, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from byol import augmentations
from byol import dataset as dataset_lib
from byol import model
from byol.inference import EmbedFn

# `apply(params, state, images, is_training) -> (embedding, new state)`.
EncoderApply = Callable[[hk.Params, hk.State, jax.Array, bool],
                        Tuple[jax.Array, hk.State]]


def make_encoder_apply(pretrain_config: ml_collections.ConfigDict,
                       axis_name: Optional[str] = None) -> EncoderApply:
  """The pretraining network's embedding, in training or inference mode.

  `images` are in [0, 1]; the dataset's normalization is applied here. In
  training mode BatchNorm uses batch statistics (over `axis_name` when
  given) and the returned state carries its updated moving averages.
  """
  data = pretrain_config.data
  num_classes = dataset_lib.num_classes(data.dataset, data.data_dir or None)
  forward = model.make_forward(pretrain_config, num_classes,
                                        axis_name=axis_name)
  # The network's own input normalisation: its pretraining data's, also when
  # it is evaluated on another dataset (transfer).
  normalize = functools.partial(dataset_lib.normalize, dataset=data.dataset,
                                data_dir=data.data_dir or None)

  def apply(params, state, images, is_training):
    out, state = forward.apply(params, state, None, normalize(images),
                               is_training)
    return out['embedding'], state

  return apply


def make_embed_fn(pretrain_config: ml_collections.ConfigDict) -> EmbedFn:
  """Returns `embed(params, state, images) -> embedding`, inference mode.

  `images` are in [0, 1]; the dataset's normalization is applied here.
  """
  apply = make_encoder_apply(pretrain_config, axis_name=None)

  def embed(params, state, images):
    # Only the embedding is used: XLA drops the heads from the program.
    return apply(params, state, images, False)[0]

  return embed


def pixels_embed(params, state, images):
  """The identity "encoder": flattened pixels (the raw-pixel baseline)."""
  del params, state
  return images.reshape(images.shape[0], -1)


def calibrate_batchnorm(config: ml_collections.ConfigDict, params: hk.Params,
                        state: hk.State, *, num_batches: int = 10,
                        batch_size: int = 256, seed: int = 0) -> hk.State:
  """BatchNorm moving averages measured on data, for an untrained network.

  A network straight from `init` has moving averages that describe no data
  (Haiku's `init` pass on the placeholder zero images leaves variances near
  0), so in inference mode each BatchNorm multiplies by about 1/sqrt(eps)
  and the features overflow. Before probing such an encoder its averages
  are reset and re-estimated the way training would estimate them: training-
  mode passes over both augmented views of `num_batches` pretraining batches.
  The parameters are not touched. Networks without BatchNorm are returned
  unchanged.
  """
  if model.batch_independent(config):
    return state
  c = config
  forward = model.make_forward(
      c, dataset_lib.num_classes(c.data.dataset, c.data.data_dir or None),
      axis_name=None)
  it = dataset_lib.load(
      dataset_lib.Split.TRAIN_AND_VALID,
      preprocess_mode=dataset_lib.PreprocessMode.PRETRAIN,
      batch_dims=[batch_size], dataset=c.data.dataset,
      image_size=c.data.image_size, data_dir=c.data.data_dir or None,
      seed=seed, deterministic=True)

  @jax.jit
  def update(state, batch, rng):
    views = augmentations.postprocess(batch, rng, c.data.augmentations)
    for view in ('view1', 'view2'):
      images = dataset_lib.normalize(views[view], dataset=c.data.dataset,
                                     data_dir=c.data.data_dir or None)
      _, state = forward.apply(params, state, None, images, True)
    return state

  # Zeroed averages and counters: the first update then sets each average to
  # that batch's statistics exactly (Haiku's EMAs are zero-debiased).
  state = jax.tree.map(jnp.zeros_like, state)
  key = jax.random.PRNGKey(seed)
  for i in range(num_batches):
    state = update(state, next(it), jax.random.fold_in(key, i))
  return jax.tree.map(np.asarray, state)
