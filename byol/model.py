"""The pretrained network, built from the config: encoder, heads, classifier.

`Network(config)` is the network a pretraining config describes, built once:
its `forward` (a Haiku transform that normalises its own input, as DeepMind's
`_forward` does, so callers pass images in [0, 1]), the class count of its
dataset and the data arguments (dataset, image size, data folder) every
reader of its images needs. Pretraining, the evaluators and the exporters
use it.

`make_forward` assembles encoder -> projector (-> predictor) plus the online
classifier; each component is its config sub-dict passed straight into its
constructor (`build_component`). Under the BN-init protocol the trained
network has `affine` layers where the config says `bn` (`network_config`);
`byol/bn_init.py` builds the BatchNorm network of its one pass from here.
"""

import functools
from typing import Callable, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from byol import dataset as dataset_lib
from byol import devices
from byol import networks
from byol.errors import ConfigError

PARTS = ('encoder', 'projector', 'predictor')


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
  initialisation pass; the trained network has `affine` layers instead:
  every `bn` component becomes `affine` (and `model.init` `default`).
  """
  if config.model.init != 'bn_init':
    return config
  c = ml_collections.ConfigDict(config.to_dict())
  for part in PARTS:
    if c.model[part].norm == 'bn':
      c.model[part].norm = 'affine'
  c.model.init = 'default'
  return c


def batch_independent(config: ml_collections.ConfigDict) -> bool:
  """True when no component of the trained network uses batch statistics."""
  config = network_config(config)
  return all(config.model[p].norm != 'bn' for p in PARTS)


def make_forward(config: ml_collections.ConfigDict, num_classes: int,
                 axis_name: Optional[str] = devices.AXIS,
                 normalize: Optional[Callable[[jax.Array], jax.Array]] = None
                 ) -> hk.TransformedWithState:
  """Online/target network: encoder -> projector (-> predictor) + classifier.

  Returns a transform whose apply maps (images, is_training) to a dict with
  `embedding`, `projection`, `prediction` (BYOL only) and `logits`. With
  `normalize`, the images are passed through it first (`Network` gives the
  dataset's normalisation); without, they must come normalised.
  """
  config = network_config(config)

  def forward(images, is_training):
    if normalize is not None:
      images = normalize(images)
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


class Network:
  """The network of a pretraining config, built once.

  Attributes:
    config: the pretraining config.
    axis_name: the cross-replica axis of its BatchNorm (None: one device).
    num_classes: classes of the online classifier (the dataset's).
    dataset, image_size, data_dir: the data arguments of its images
      (`data_dir` None: the dataset's default place).
    forward: `hk.TransformedWithState`; apply maps (images in [0, 1],
      is_training) to `embedding`, `projection`, `prediction` (BYOL) and
      `logits`. The dataset's normalisation is inside.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               axis_name: Optional[str] = devices.AXIS):
    self.config = config
    self.axis_name = axis_name
    self.dataset = config.data.dataset
    self.image_size = config.data.image_size
    self.data_dir = config.data.data_dir or None
    self.num_classes = dataset_lib.num_classes(self.dataset, self.data_dir)
    # The pretraining data's own statistics, also when the network is
    # evaluated on another dataset (transfer).
    self.forward = make_forward(
        config, self.num_classes, axis_name,
        normalize=functools.partial(dataset_lib.normalize_as,
                                    data=config.data))

  def single_device(self) -> 'Network':
    """The same network without a cross-replica axis (jit, or no pmap)."""
    if self.axis_name is None:
      return self
    return Network(self.config, axis_name=None)

  def encode(self, params: hk.Params, state: hk.State, images: jax.Array,
             is_training: bool) -> Tuple[jax.Array, hk.State]:
    """(embedding, new state) of images in [0, 1].

    In training mode BatchNorm uses batch statistics (over `axis_name`) and
    the returned state carries its updated moving averages.
    """
    out, state = self.forward.apply(params, state, None, images, is_training)
    return out['embedding'], state

  def embed(self, params: hk.Params, state: hk.State,
            images: jax.Array) -> jax.Array:
    """The embedding in inference mode (an `EmbedFn`)."""
    # Only the embedding is used: XLA drops the heads from the program.
    return self.encode(params, state, images, False)[0]

  def check(self) -> None:
    """Builds the network shape-only; impossible shapes become `ConfigError`."""
    s = self.image_size
    # Without the cross-replica axis: shapes do not depend on it, and
    # BatchNorm's pmean has no axis to reduce over outside pmap.
    forward = self.single_device().forward
    try:
      jax.eval_shape(
          lambda x: forward.init(jax.random.PRNGKey(0), x, True),
          jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32))
    except ValueError as e:
      raise ConfigError(str(e).splitlines()[0]) from None
