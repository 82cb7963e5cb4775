"""Where the evaluated network comes from: a pretraining workdir's checkpoint."""

import json
import os
from typing import Optional

import ml_collections

from byol import checkpointing
from byol import experiment as experiment_lib
from byol.errors import UserError


class EvalError(UserError):
  """The workdir holds nothing that can be evaluated."""


def read_pretrain_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of a pretraining workdir; `EvalError` if it has none."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise EvalError(f'{workdir} has no config.json: it is not a pretraining '
                    'workdir (run main.py --config=configs/byol.py there first)')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (OSError, ValueError) as e:
    raise EvalError(f'cannot read {path}: {str(e).splitlines()[0]}') from None


def load_pretrained(workdir: str, step: Optional[int] = None,
                    encoder: str = 'online'):
  """Reads a pretraining workdir.

  Args:
    workdir: a pretraining workdir (config.json and checkpoints/).
    step: the checkpoint to read; None or negative: the latest.
    encoder: `online`, or `target` (BYOL only; SimCLR has no target).

  Returns:
    (pretraining config, params, state, step) of the chosen network, host
    numpy arrays.

  Raises:
    EvalError: no config.json or no checkpoint; CheckpointError when the
      checkpoint does not match the config.
  """
  pretrain_config = read_pretrain_config(workdir)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  if step is None or step < 0:
    step = ckpt.latest_step()
  if step is None:
    raise EvalError(f'{workdir} has no checkpoint to evaluate')
  state, _ = ckpt.restore(step,
                          target=experiment_lib.state_template(pretrain_config))
  return select_network(pretrain_config, state, encoder) + (step,)


def select_network(pretrain_config, state, encoder: str):
  """(config, params, state) of the online or the target network of `state`."""
  if encoder == 'target' and pretrain_config.method == 'byol':
    return pretrain_config, state.target_params, state.target_state
  return pretrain_config, state.online_params, state.online_state
