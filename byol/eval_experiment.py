"""The evaluation command: evaluate a pretraining run with the protocol of a config.

`run(config, workdir)` reads the frozen online encoder of a pretraining
workdir (or its target, `encoder='target'`), builds the evaluator that
`config.mode` names (`byol/evaluation/registry.py`) and writes its results to
`<workdir>/<config.output_name>/`. The protocols themselves live in
`byol/evaluation/`.
"""

import os
import time
from typing import Any, Dict

import jax
import ml_collections

from byol import files
from byol import metrics as metrics_lib
from byol import model
from byol.errors import ConfigError
from byol.evaluation import registry
from byol.evaluation import sources


def output_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where `run` writes: <workdir>/<config.output_name>."""
  name = config.output_name
  if not name or os.path.basename(name) != name or name in ('.', '..',
                                                            'checkpoints'):
    raise ConfigError(f'output_name must be a plain folder name, got {name!r}')
  return os.path.join(workdir, name)


def run(config: ml_collections.ConfigDict, workdir: str,
        printer=print) -> Dict[str, Any]:
  """Evaluates the pretraining run in `workdir`; writes `output_dir`.

  Writes config.json (the evaluation config), metrics.jsonl (SGD protocols)
  and summary.json: top1_accuracy, top5_accuracy and the protocol's details.
  """
  if config.mode not in registry.POST_HOC:
    raise ConfigError(f'mode must be {" or ".join(registry.POST_HOC)}, got '
                      f'{config.mode!r}')
  if config.encoder not in ('online', 'target'):
    raise ConfigError(f'encoder must be online or target, got '
                      f'{config.encoder!r}')
  pretrain_config, params, state, step = sources.load_pretrained(
      workdir, config.checkpoint_step, config.encoder)
  out_dir = output_dir(config, workdir)
  chief = jax.process_index() == 0
  writer = None

  def metrics(record):
    # Opened at the first record: a protocol without steps (fast) leaves
    # no metrics.jsonl, and a new evaluation replaces the last one's.
    nonlocal writer
    if writer is None:
      writer = metrics_lib.MetricsWriter(out_dir, enabled=chief, keep=[],
                                         tensorboard=False)
    writer.write(record['step'],
                 {k: v for k, v in record.items() if k != 'step'})

  # Built before anything is written: a bad setting leaves the workdir as is.
  # The low-label protocol also writes the image list of its subset there.
  extra = {'output_dir': out_dir} if config.mode == 'lowlabel' else {}
  evaluator = registry.build(config.mode, config,
                             model.Network(pretrain_config), printer=printer,
                             metrics=metrics, **extra)
  if chief:
    os.makedirs(out_dir, exist_ok=True)
    files.write_text(os.path.join(out_dir, 'config.json'),
                     config.to_json_best_effort(indent=2, sort_keys=True))
  printer(f'[eval] {config.mode} evaluation of the {config.encoder} encoder '
          f'of {workdir}, checkpoint step {step}')
  t0 = time.time()
  try:
    result = evaluator.run(params, state)
  finally:
    if writer is not None:
      writer.close()
  result = {k: v for k, v in result.items() if not k.startswith('_')}
  result.update(mode=config.mode, checkpoint_step=int(step),
                encoder=config.encoder, wall_time_sec=time.time() - t0)
  if chief:
    files.write_json(os.path.join(out_dir, 'summary.json'), result)
  printer(f'[eval] top-1 {100 * result["top1_accuracy"]:.2f}%  top-5 '
          f'{100 * result["top5_accuracy"]:.2f}%  -> {out_dir}/summary.json')
  return result
