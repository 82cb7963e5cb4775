"""Running a network once over a whole split, on every local device.

Shared by pretraining (the online classifier's periodic TEST accuracy, the
collapse diagnostics' fixed batch) and evaluation (cached features).
"""

from typing import Callable, Optional, Tuple

import haiku as hk
import jax
import numpy as np

from byol import dataset as dataset_lib
from byol import devices

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
