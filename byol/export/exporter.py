"""Export a pretraining workdir's encoder: checks first, then an atomic write.

`export(workdir, out, formats=...)` reads the chosen checkpoint (online or
target network; an imported DeepMind checkpoint is a workdir like any other),
refuses what it cannot convert before writing anything, builds the whole
export in a temporary sibling of `out` and renames it into place, so that a
failed export leaves neither half a folder nor a damaged previous one.
"""

import os
import shutil
from typing import Any, Dict, Optional, Sequence

import jax
import ml_collections
import numpy as np

from byol import files
from byol import model
from byol.errors import UserError
from byol.evaluation import sources
from byol.export import torch_layout

FORMATS = ('torch', 'savedmodel', 'all')
ENCODERS = ('online', 'target')


class ExportError(UserError):
  """An export that cannot be made as asked."""


def parse_formats(fmt: str) -> Sequence[str]:
  """`torch`, `savedmodel` or `all` -> the formats to write."""
  if fmt not in FORMATS:
    raise ExportError(f'unknown --format {fmt!r}; choose from '
                      f'{", ".join(FORMATS)}')
  return ('torch', 'savedmodel') if fmt == 'all' else (fmt,)


def export_network(config: ml_collections.ConfigDict, params, state,
                   out: str, formats: Sequence[str] = ('torch',), *,
                   heads: bool = False, overwrite: bool = False,
                   source: Optional[Dict[str, Any]] = None,
                   printer=print) -> Dict[str, Any]:
  """Writes the network `(config, params, state)` to the folder `out`.

  Args:
    config: the pretraining config of the network.
    params: its Haiku parameters (host arrays).
    state: its Haiku state.
    out: the export folder; refused when it exists unless `overwrite`.
    formats: any of `torch` (encoder.safetensors, encoder.json,
      torch_resnet.py; heads.safetensors with `heads`) and `savedmodel`
      (savedmodel/).
    heads: also export the projector and (BYOL) predictor.
    overwrite: replace an existing `out`.
    source: where the network came from, recorded in encoder.json.
    printer: progress lines.

  Returns:
    The content of encoder.json (with the SavedModel's signature when
    written).

  Raises:
    ExportError: `out` exists (without `overwrite`), or is not a folder.
    UnsupportedNorm: the torch format for a normalization without a torch
      layer.
  """
  for f in formats:
    if f not in FORMATS[:2]:
      raise ExportError(f'unknown format {f!r}')
  net_config = model.network_config(config)
  if 'torch' in formats:
    torch_layout.check_convertible(net_config, heads)
  out = os.path.abspath(out)
  if os.path.lexists(out) and not overwrite:
    raise ExportError(f'{out} exists; choose another --out or pass '
                      '--overwrite to replace it')
  if os.path.lexists(out) and not os.path.isdir(out):
    raise ExportError(f'{out} exists and is not a folder; choose another '
                      '--out')
  parent = os.path.dirname(out)
  if not os.path.isdir(parent):
    raise ExportError(f'the folder {parent} of --out does not exist')
  params = jax.tree.map(np.asarray, params)
  state = jax.tree.map(np.asarray, state)

  num_classes = model.Network(config, axis_name=None).num_classes
  embedding_size = int(np.asarray(params['classifier']['w']).shape[0])
  info = torch_layout.encoder_json(net_config, num_classes, embedding_size,
                                   heads, source or {})
  info['formats'] = list(formats)
  tmp = f'{out}.tmp-export'
  if os.path.lexists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  try:
    if 'torch' in formats:
      _write_torch(net_config, params, state, tmp, heads)
      printer(f'[export] torch: encoder.safetensors (torchvision names, '
              f'{info["torch_norm"]}, TF-SAME padding) -> {out}')
    if 'savedmodel' in formats:
      from byol.export import savedmodel  # pylint: disable=g-import-not-at-top
      info['savedmodel'] = savedmodel.save(
          config, params, state, os.path.join(tmp, 'savedmodel'), heads)
      printer(f'[export] savedmodel: {info["savedmodel"]["input"]} -> '
              f'{os.path.join(out, "savedmodel")}')
    files.write_json(os.path.join(tmp, 'encoder.json'), info)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.lexists(out):
    old = f'{out}.old-export'
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)
  else:
    os.replace(tmp, out)
  return info


def _write_torch(config, params, state, folder, heads) -> None:
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  sd = torch_layout.encoder_state_dict(config, params, state)
  st_numpy.save_file(sd, os.path.join(folder, 'encoder.safetensors'),
                     metadata={'format': 'pt'})
  if heads:
    st_numpy.save_file(torch_layout.heads_state_dict(config, params, state),
                       os.path.join(folder, 'heads.safetensors'),
                       metadata={'format': 'pt'})
  # The module that computes it, needing only torch: users copy the folder.
  shutil.copyfile(os.path.join(os.path.dirname(__file__), 'torch_resnet.py'),
                  os.path.join(folder, 'torch_resnet.py'))


def export(workdir: str, out: str, fmt: str = 'torch', *,
           encoder: str = 'online', checkpoint_step: Optional[int] = None,
           heads: bool = False, overwrite: bool = False,
           printer=print) -> Dict[str, Any]:
  """Exports the encoder of a pretraining workdir's checkpoint to `out`.

  Args:
    workdir: a pretraining workdir (or one made by `main.py --import_dm`).
    out: the export folder.
    fmt: `torch`, `savedmodel` or `all`.
    encoder: `online`, or `target` (BYOL only).
    checkpoint_step: the checkpoint; None: the latest.
    heads: include the projector and predictor.
    overwrite: replace an existing `out`.
    printer: progress lines.

  Returns:
    The content of encoder.json.

  Raises:
    UserError: bad input (no checkpoint, unknown format or encoder, a
      normalization without a torch layer, an existing `out`).
  """
  formats = parse_formats(fmt)
  if encoder not in ENCODERS:
    raise ExportError(f'unknown --encoder {encoder!r}; choose online or '
                      'target')
  config = sources.read_pretrain_config(workdir)
  if encoder == 'target' and config.method != 'byol':
    raise ExportError(f'{config.method} has no target network; export '
                      '--encoder=online')
  # The cheap checks first: nothing is read or written for an export that
  # cannot be made.
  if 'torch' in formats:
    torch_layout.check_convertible(model.network_config(config), heads)
  if os.path.lexists(out) and not overwrite:
    raise ExportError(f'{out} exists; choose another --out or pass '
                      '--overwrite to replace it')
  config, params, state, step = sources.load_pretrained(
      workdir, checkpoint_step, encoder)
  source = {'workdir': os.path.abspath(workdir), 'checkpoint_step': int(step),
            'encoder': encoder, 'method': config.method,
            'dataset': config.data.dataset}
  return export_network(config, params, state, out, formats, heads=heads,
                        overwrite=overwrite, source=source, printer=printer)
