"""The online classifier's TEST accuracy, measured during pretraining.

DeepMind's `evaluate`: the linear classifier trained online on
stop_gradient(embedding) reads the online network in inference mode, over
every TEST example once. The training loop runs it on the schedule of
`config.evaluators.schedule`; its settings are
`config.evaluators.online_classifier`.
"""

from typing import Dict

import haiku as hk
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from byol import dataset as dataset_lib
from byol import model
from byol.errors import ConfigError
from byol.evaluation import features
from byol.evaluation import loop


class OnlineClassifierEvaluator:
  """`OnlineClassifierEvaluator(network, batch_size).run(params, state)`.

  Args:
    network: the pretrained network (its classifier head is read).
    batch_size: images per step over this process's devices.
  """

  def __init__(self, network: model.Network, *, batch_size: int):
    if batch_size <= 0:
      raise ConfigError(f'evaluators.online_classifier.batch_size must be '
                        f'positive, got {batch_size}')
    self.network = network.single_device()
    self.batch_size = batch_size

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  network: model.Network, **kwargs
                  ) -> 'OnlineClassifierEvaluator':
    """The evaluator of `config.evaluators.online_classifier` (given)."""
    del kwargs  # nothing printed, no steps to record
    return cls(network, batch_size=config.batch_size)

  def _logits(self, params: hk.Params, state: hk.State, images):
    return self.network.forward.apply(params, state, None, images,
                                      False)[0]['logits']

  def run(self, params: hk.Params, state: hk.State) -> Dict[str, float]:
    """TEST top-1 and top-5 of the online classifier (host params and state).

    Nothing (an empty dict) for a dataset without labels.
    """
    n = self.network
    if not dataset_lib.has_labels(n.dataset, n.data_dir):
      return {}  # an unlabelled folder has no TEST split
    logits, labels = features.extract_features(
        self._logits, params, state, dataset=n.dataset,
        split=dataset_lib.Split.TEST, image_size=n.image_size,
        batch_size=self.batch_size, data_dir=n.data_dir)
    counts = np.array([int(loop.topk_hits(logits, labels, 1)),
                       int(loop.topk_hits(logits, labels, 5)),
                       len(labels)], np.float64)
    if jax.process_count() > 1:  # each process read its own shard
      counts = multihost_utils.process_allgather(counts).sum(0)
    return {'eval_top1_accuracy': counts[0] / counts[2],
            'eval_top5_accuracy': counts[1] / counts[2]}
