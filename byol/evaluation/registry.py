"""Every evaluator by name: the one table the config's names are looked up in.

Each evaluator is built as `EVALUATORS[name].from_config(config, network,
printer=..., metrics=...)` and run as `.run(params, state) -> dict`, where
`network` is the `model.Network` of the pretraining run and `config` the
evaluator's own settings: the evaluation config (configs/eval.py) for the
protocols run after pretraining, `config.evaluators.<name>` of the
pretraining config for those the training loop runs on its schedule.
"""

from typing import Any, List, Tuple

import ml_collections

from byol import model
from byol.errors import ConfigError
from byol.evaluation import collapse
from byol.evaluation import finetune
from byol.evaluation import linear
from byol.evaluation import lowlabel
from byol.evaluation import online_classifier
from byol.evaluation import probe

EVALUATORS = {
    # After pretraining (configs/eval.py's `mode`).
    'linear': linear.LinearEvaluator,
    'finetune': finetune.FineTuneEvaluator,
    'fast': probe.ProbeEvaluator,
    'lowlabel': lowlabel.LowLabelEvaluator,
    # During pretraining (configs/byol.py's `evaluators.schedule`).
    'online_classifier': online_classifier.OnlineClassifierEvaluator,
    'collapse': collapse.CollapseEvaluator,
}
POST_HOC = ('linear', 'finetune', 'fast', 'lowlabel')
DURING_TRAINING = ('online_classifier', 'collapse')


def build(name: str, config: ml_collections.ConfigDict,
          network: model.Network, **kwargs) -> Any:
  """The evaluator `name` with the settings `config` for `network`."""
  if name not in EVALUATORS:
    raise ConfigError(f'unknown evaluator {name!r}; choose from '
                      f'{", ".join(EVALUATORS)}')
  return EVALUATORS[name].from_config(config, network, **kwargs)


def schedule(config: ml_collections.ConfigDict) -> List[Tuple[int, str]]:
  """The checked (every_steps, name) pairs of `config.evaluators.schedule`.

  Raises:
    ConfigError: a pair is not (positive integer, name of an evaluator that
      runs during pretraining).
  """
  out = []
  for entry in config.evaluators.schedule:
    try:
      every, name = entry
    except (TypeError, ValueError):
      raise ConfigError(f'evaluators.schedule holds (every_steps, name) '
                        f'pairs, got {entry!r}') from None
    if name not in DURING_TRAINING:
      raise ConfigError(f'evaluators.schedule: {name!r} does not run during '
                        f'pretraining; choose from '
                        f'{", ".join(DURING_TRAINING)}')
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
      raise ConfigError(f'evaluators.schedule: every_steps of {name} must be '
                        f'a positive integer, got {every!r}')
    out.append((every, name))
  return out


def build_schedule(config: ml_collections.ConfigDict, network: model.Network
                   ) -> List[Tuple[int, str, Any]]:
  """(every_steps, name, evaluator) of the pretraining config's schedule."""
  return [(every, name, build(name, config.evaluators[name], network))
          for every, name in schedule(config)]


def scheduled(config: ml_collections.ConfigDict, name: str) -> bool:
  """Whether the training loop runs evaluator `name` at all."""
  return any(n == name for _, n in schedule(config))
