"""The BN-free data-dependent initialisation of Richemond et al. (2020), §3.3.

One forward pass of the BatchNorm network, in training mode, on a batch of
augmented images gives every BatchNorm layer its per-channel batch mean and
variance. Each BatchNorm is then replaced by a trainable per-channel `affine`
layer initialised to compute the same function on that batch:

    scale  = gamma / sqrt(var + eps)
    offset = beta - gamma * mean / sqrt(var + eps)

Because every layer is replaced by the exact map its BatchNorm applied to that
batch, the converted network reproduces the BatchNorm network's outputs on
that batch, and from then on uses no batch statistics at all.

The batch statistics are read from Haiku's BatchNorm state: with a moving
average decay of 0, one training-mode pass leaves exactly the batch mean and
variance in `mean_ema` / `var_ema`.

The networks come from `byol/model.py` (the converted one is
`model.network_config`'s); the model knows nothing of this module.
"""

from typing import Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from byol import model


def statistics_config(config: ml_collections.ConfigDict
                      ) -> ml_collections.ConfigDict:
  """The BatchNorm network whose one pass stores exact batch statistics."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.bn_decay = 0.0
  c.model.init = 'default'
  return c


def convert_bn_to_affine(bn_params: hk.Params, bn_state: hk.State,
                         affine_params: hk.Params, eps: float) -> hk.Params:
  """Folds batch statistics into affine parameters, layer by layer.

  Args:
    bn_params: params of the BatchNorm network.
    bn_state: its state after one training-mode pass with decay 0.
    affine_params: params of the converted network (supplies the structure,
      shapes, and every non-normalization parameter's name).
    eps: BatchNorm's epsilon.

  Returns:
    Params of the converted network: conv/linear weights copied from
    `bn_params`, each `affine` layer set from its BatchNorm.
  """
  out = {}
  for module, leaves in affine_params.items():
    bn_module = module.replace('affine', 'batchnorm')
    if bn_module not in bn_params:  # a head's BatchNorm is `batch_norm`
      bn_module = module.replace('affine', 'batch_norm')
    if bn_module == module:
      out[module] = dict(bn_params[module])
      continue
    # jnp, not np: this runs traced, inside the (jit/pmap) init function.
    gamma = jnp.reshape(bn_params[bn_module]['scale'], (-1,))
    beta = jnp.reshape(bn_params[bn_module]['offset'], (-1,))
    mean = jnp.reshape(bn_state[f'{bn_module}/~/mean_ema']['average'], (-1,))
    var = jnp.reshape(bn_state[f'{bn_module}/~/var_ema']['average'], (-1,))
    inv_std = jax.lax.rsqrt(var.astype(jnp.float32) + eps)
    scale = gamma * inv_std
    offset = beta - gamma * mean * inv_std
    out[module] = {
        'scale': jnp.reshape(scale, leaves['scale'].shape).astype(jnp.float32),
        'offset': jnp.reshape(offset,
                              leaves['offset'].shape).astype(jnp.float32),
    }
  return out


def bn_initialised_params(config: ml_collections.ConfigDict,
                          rng: jax.Array, images: jax.Array
                          ) -> Tuple[hk.Params, hk.State]:
  """Params (and state) of the affine network, initialised from one BN pass.

  Args:
    config: the pretraining config (components with `bn` get converted).
    rng: initialisation key.
    images: an augmented batch [B, H, W, 3] in [0, 1] (the networks
      normalise it).
  """
  # Single-device networks: the pass runs inside the (pmapped) init function
  # on the same batch on every device, so no cross-replica axis is needed.
  stats_forward = model.Network(statistics_config(config), None).forward
  bn_params, bn_state = stats_forward.init(rng, images, True)
  _, bn_state = stats_forward.apply(bn_params, bn_state, None, images, True)
  affine_forward = model.Network(model.network_config(config), None).forward
  template, state = affine_forward.init(rng, images, True)
  params = convert_bn_to_affine(bn_params, bn_state, template,
                                config.model.bn_eps)
  return params, state
