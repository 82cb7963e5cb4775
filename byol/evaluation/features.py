"""Frozen-encoder features: running a network over a split, BN calibration.

Every evaluator reads the encoder through an `EmbedFn`, `embed(params, state,
images) -> [B, D]`, on images in [0, 1] (a `model.Network`'s `embed`
normalises them inside), so that the same evaluator runs on this project's
checkpoints, on DeepMind's, or on raw pixels (`pixels_embed`).
"""

from typing import Callable, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from byol import augmentations
from byol import dataset as dataset_lib
from byol import devices
from byol import model

EmbedFn = Callable[[hk.Params, hk.State, jax.Array], jax.Array]


def extract_features(embed: EmbedFn, params, state, *, dataset: str, split,
                     image_size: int, batch_size: int = 1000,
                     data_dir: Optional[str] = None,
                     max_examples: int = -1) -> Tuple[np.ndarray, np.ndarray]:
  """Encodes the examples of `split` once (centre crop, no augmentation).

  Args:
    embed: `embed(params, state, images)`.
    params: the encoder's parameters (host arrays; copied to every device).
    state: the encoder's Haiku state (likewise).
    dataset: the dataset's name.
    split: the split to read.
    image_size: side of the images.
    batch_size: images per step over this process's devices.
    data_dir: where the dataset lives (None: its default place).
    max_examples: stop after this many examples (the first ones of the
      split, in its fixed order); -1 reads the whole split.

  Returns:
    (features [N, D] float32, labels [N] int32) of this process's shard.
  """
  n_dev = jax.local_device_count()
  per_dev = max(1, batch_size // n_dev)
  it = dataset_lib.load(split, preprocess_mode=dataset_lib.PreprocessMode.EVAL,
                        batch_dims=[n_dev, per_dev], dataset=dataset,
                        image_size=image_size, data_dir=data_dir)
  p_embed = jax.pmap(embed)
  # Copied to the devices once, not with every batch.
  params_r = devices.replicate(params)
  state_r = devices.replicate(state)
  feats, labels, count = [], [], 0
  for batch in it:
    f = np.asarray(p_embed(params_r, state_r, batch['images']), np.float32)
    mask = np.asarray(batch['mask']).reshape(-1).astype(bool)
    feats.append(f.reshape(-1, f.shape[-1])[mask])
    labels.append(np.asarray(batch['labels']).reshape(-1)[mask])
    count += int(mask.sum())
    if 0 < max_examples <= count:
      break
  feats, labels = np.concatenate(feats), np.concatenate(labels)
  if max_examples > 0:
    feats, labels = feats[:max_examples], labels[:max_examples]
  return feats, labels.astype(np.int32)


def pixels_embed(params, state, images):
  """The identity "encoder": flattened pixels (the raw-pixel baseline)."""
  del params, state
  return images.reshape(images.shape[0], -1)


def calibrate_batchnorm(network: model.Network, params: hk.Params,
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
  if model.batch_independent(network.config):
    return state
  network = network.single_device()
  it = dataset_lib.load(
      dataset_lib.Split.TRAIN_AND_VALID,
      preprocess_mode=dataset_lib.PreprocessMode.PRETRAIN,
      batch_dims=[batch_size], dataset=network.dataset,
      image_size=network.image_size, data_dir=network.data_dir,
      seed=seed, deterministic=True)

  @jax.jit
  def update(state, batch, rng):
    views = augmentations.postprocess(batch, rng,
                                      network.config.data.augmentations)
    for view in ('view1', 'view2'):
      _, state = network.encode(params, state, views[view], True)
    return state

  # Zeroed averages and counters: the first update then sets each average to
  # that batch's statistics exactly (Haiku's EMAs are zero-debiased).
  state = jax.tree.map(jnp.zeros_like, state)
  key = jax.random.PRNGKey(seed)
  for i in range(num_batches):
    state = update(state, next(it), jax.random.fold_in(key, i))
  return jax.tree.map(np.asarray, state)
