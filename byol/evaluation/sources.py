"""Where the evaluated network comes from: a pretraining workdir's checkpoint."""

import os
from typing import Optional

import ml_collections

from byol import checkpointing
from byol import experiment as experiment_lib
from byol import files
from byol import model
from byol.errors import UserError


class EvalError(UserError):
  """The workdir holds nothing that can be evaluated."""


def read_pretrain_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of a pretraining workdir, checked as a run's config.

  Raises:
    EvalError: there is no config.json, or it is damaged, or it is not the
      config of a run that could have been trained (fields missing or
      impossible), so that no network can be built from it.
  """
  path = os.path.join(workdir, 'config.json')
  remedy = ('put back the config.json the run wrote, or evaluate another '
            '--workdir')
  try:
    raw = files.read_json(path, remedy)
  except FileNotFoundError:
    raise EvalError(f'{workdir} has no config.json: it is not a pretraining '
                    'workdir (run main.py --config=configs/byol.py there '
                    'first)') from None
  except UserError as e:
    raise EvalError(str(e)) from None
  if not isinstance(raw, dict):
    raise EvalError(f'{path} does not hold a config; {remedy}')
  config = ml_collections.ConfigDict(raw)
  try:
    experiment_lib.validate_config(config)
    model.Network(config, axis_name=None).check()
  # A field missing (AttributeError, KeyError) or of the wrong type
  # (TypeError), or one the network's constructors refuse (ValueError).
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise EvalError(f'{path} is not the config of a pretraining run '
                    f'({_reason(e)}); {remedy}') from None
  return config


def _reason(error: Exception) -> str:
  """One line on why a config was refused: `no field 'x'` for a missing one."""
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  if isinstance(error, (AttributeError, KeyError)):
    # ConfigDict reports a missing field as its quoted name, "'x'".
    name = text.strip('"\'')
    if name.isidentifier():
      return f'no field {name!r}'
  return text


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
