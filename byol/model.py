"""The pretrained network, built from the config: encoder, heads, classifier.

`make_forward` assembles encoder -> projector (-> predictor) plus the online
classifier; each component is its config sub-dict passed straight into its
constructor (`build_component`). The same network serves pretraining, the
evaluators (which read its encoder) and the BN-init protocol (which builds it
once with BatchNorm, then swaps in `affine` layers: `network_config`).
"""

from typing import Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from byol import bn_init
from byol import devices
from byol import networks
from byol.errors import ConfigError


def build_component(config: ml_collections.ConfigDict, part: str,
                    constructor: Callable[..., hk.Module],
                    axis_name: Optional[str], **kwargs) -> hk.Module:
  """`constructor(**config.model[part], <shared model fields>, **kwargs)`.

  The component's config sub-dict goes straight into its constructor, with
  the fields every component shares (BatchNorm decay, epsilons, compute
  dtype) and the cross-replica axis. A `ValueError` of the constructor (an
  unknown norm, a non-positive size, ...) comes back prefixed with the
  config path, `model.<part>: ...`. Call inside a Haiku transform.
  """
  m = config.model
  try:
    return constructor(**m[part], bn_decay=m.bn_decay, bn_eps=m.bn_eps,
                       gn_eps=m.gn_eps, ws_eps=m.ws_eps, dtype=m.dtype,
                       cross_replica_axis=axis_name, **kwargs)
  except ValueError as e:
    # A head's module is named after its part: 'projector: ...' reads
    # 'model.projector: ...', not 'model.projector: projector: ...'.
    message = str(e)
    if message.startswith(f'{part}: '):
      message = message[len(part) + 2:]
    raise ValueError(f'model.{part}: {message}') from None


def make_encoder(config: ml_collections.ConfigDict,
                 axis_name: Optional[str] = None) -> hk.Module:
  """The encoder of `config.model.encoder`; call inside a Haiku transform."""
  return build_component(config, 'encoder', networks.resnet, axis_name)


def network_config(config: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """The config of the network that is trained.

  Under the BN-init protocol the BatchNorm layers exist only for the one
  initialisation pass; the trained network has `affine` layers instead.
  """
  if config.model.init == 'bn_init':
    return bn_init.affine_config(config)
  return config


def batch_independent(config: ml_collections.ConfigDict) -> bool:
  """True when no component of the trained network uses batch statistics."""
  config = network_config(config)
  return all(config.model[p].norm != 'bn'
             for p in ('encoder', 'projector', 'predictor'))


def make_forward(config: ml_collections.ConfigDict, num_classes: int,
                 axis_name: Optional[str] = devices.AXIS
                 ) -> hk.TransformedWithState:
  """Online/target network: encoder -> projector (-> predictor) + classifier.

  Returns a transform whose apply maps (images, is_training) to a dict with
  `embedding`, `projection`, `prediction` (BYOL only) and `logits`.
  """
  config = network_config(config)

  def forward(images, is_training):
    embedding = make_encoder(config, axis_name)(images, is_training)
    projection = build_component(config, 'projector', networks.MLP, axis_name,
                                 name='projector')(embedding, is_training)
    out = dict(embedding=embedding, projection=projection)
    if config.method == 'byol':
      out['prediction'] = build_component(
          config, 'predictor', networks.MLP, axis_name,
          name='predictor')(projection, is_training)
    # The online classifier only measures the representation: it must not
    # shape it, hence the stop_gradient on its input.
    out['logits'] = hk.Linear(num_classes, name='classifier')(
        jax.lax.stop_gradient(embedding))
    return out

  return hk.transform_with_state(forward)


def check_model(config: ml_collections.ConfigDict, num_classes: int) -> None:
  """Builds the network shape-only; impossible shapes become `ConfigError`."""
  forward = make_forward(config, num_classes, axis_name=None)
  s = config.data.image_size
  try:
    jax.eval_shape(lambda x: forward.init(jax.random.PRNGKey(0), x, True),
                   jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32))
  except ValueError as e:
    raise ConfigError(str(e).splitlines()[0]) from None
