"""Collapse measures of the online network on a fixed batch, as an evaluator.

proj_std and RankMe (`byol/diagnostics.py`) of the projections and
embeddings of the first `batch_size` training images, centre-cropped and
unaugmented: the same batch at every call and on every process, so that the
curves over training compare like with like. The training loop runs it on the
schedule of `config.evaluators.schedule`; its settings are
`config.evaluators.collapse`. The network runs as in training (BatchNorm on
the batch's statistics); its state updates are discarded.
"""

from typing import Dict

import haiku as hk
import jax
import ml_collections

from byol import dataset as dataset_lib
from byol import devices
from byol import diagnostics
from byol import model
from byol.errors import ConfigError


class CollapseEvaluator:
  """`CollapseEvaluator(network, batch_size).run(params, state)`.

  Args:
    network: the pretrained network, with the devices' axis
      (`devices.AXIS`): the batch is split over the local devices.
    batch_size: images of the fixed batch (split over the local devices).
  """

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  network: model.Network, **kwargs) -> 'CollapseEvaluator':
    """The evaluator of `config.evaluators.collapse` (given)."""
    del kwargs  # nothing printed, no steps to record
    return cls(network, batch_size=config.batch_size)

  def __init__(self, network: model.Network, *, batch_size: int):
    if batch_size <= 0:
      raise ConfigError(f'evaluators.collapse.batch_size must be positive, '
                        f'got {batch_size}')
    if network.axis_name != devices.AXIS:
      network = model.Network(network.config, devices.AXIS)
    self.network = network
    self.batch_size = batch_size
    # Read and compiled at the first `run`: building the evaluator reads
    # no data.
    self._batch = None
    self._features = None

  def _setup(self):
    n = jax.local_device_count()
    per_device = max(1, self.batch_size // n)
    net = self.network
    batch = next(dataset_lib.load(
        dataset_lib.pretrain_split(net.config.data),
        preprocess_mode=dataset_lib.PreprocessMode.EVAL,
        batch_dims=[n, per_device], dataset=net.dataset,
        image_size=net.image_size, data_dir=net.data_dir,
        process_index=0, process_count=1))
    self._batch = jax.device_put(batch['images'],
                                 devices.local_mesh_sharding())
    self._features = jax.pmap(
        diagnostics.make_diagnostics_fn(net.forward, devices.AXIS),
        axis_name=devices.AXIS)

  def run(self, params: hk.Params, state: hk.State) -> Dict[str, float]:
    """rankme_proj, rankme_emb, fixed_proj_std, fixed_emb_std (host params)."""
    if self._batch is None:
      self._setup()
    features = self._features(devices.replicate(params),
                              devices.replicate(state), self._batch)
    return diagnostics.summarize(devices.unreplicate(features))
