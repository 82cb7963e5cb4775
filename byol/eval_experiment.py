"""The evaluation command: evaluate a pretraining run with the protocol of a config.

`run(config, workdir)` reads the frozen online encoder of a pretraining
workdir (or its target, `encoder='target'`), builds the evaluator that
`config.mode` names (see `byol/evaluation/`) and writes its results to
`<workdir>/<config.output_name>/`. `probe_report` is the fast probe of a trained and
of an initial encoder, used after pretraining (`main.py --probe`) and by the
ablation study.

The protocols' pieces are re-exported here, so that `eval_experiment.X`
keeps working for the studies and tests that use it.
"""

import json
import os
import time
from typing import Any, Dict

import jax
import ml_collections

from byol import devices
from byol import files
from byol.errors import ConfigError
from byol.evaluation import features as features_lib
from byol.evaluation import finetune as finetune_lib
from byol.evaluation import linear as linear_lib
from byol.evaluation import loop
from byol.evaluation import lowlabel as lowlabel_lib
from byol.evaluation import probe as probe_lib
from byol.evaluation import sources
# Re-exported: the public pieces of the protocols.
from byol.evaluation.features import (EmbedFn, calibrate_batchnorm,  # pylint: disable=unused-import
                                      make_embed_fn, pixels_embed)
from byol.inference import extract_features  # pylint: disable=unused-import
from byol.evaluation.linear import LinearEvalFns, make_linear_eval_fns  # pylint: disable=unused-import
from byol.evaluation.probe import (feature_probe, fit_logistic_regression,  # pylint: disable=unused-import
                                   knn_predict, topk_accuracy)
from byol.evaluation.sources import EvalError, load_pretrained  # pylint: disable=unused-import

MODES = ('linear', 'finetune', 'fast', 'lowlabel')


def output_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where `run` writes: <workdir>/<config.output_name>."""
  name = config.output_name
  if not name or os.path.basename(name) != name or name in ('.', '..',
                                                            'checkpoints'):
    raise ConfigError(f'output_name must be a plain folder name, got {name!r}')
  return os.path.join(workdir, name)


class _MetricsFile:
  """metrics.jsonl of an evaluation: opened at the first record, process 0."""

  def __init__(self, path: str, enabled: bool):
    self._path = path
    self._enabled = enabled
    self._file = None

  def __call__(self, record: Dict[str, Any]) -> None:
    if not self._enabled:
      return
    if self._file is None:
      self._file = open(self._path, 'w')
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()


def make_evaluator(config: ml_collections.ConfigDict,
                   pretrain_config: ml_collections.ConfigDict, *,
                   printer=print, metrics=None, out_dir=None):
  """The evaluator of `config.mode` for the network of `pretrain_config`."""
  embed = features_lib.make_embed_fn(pretrain_config)
  if config.mode == 'fast':
    data = loop.resolve_data(config, pretrain_config)
    return probe_lib.ProbeEvaluator(
        embed, dataset=data.dataset, image_size=data.image_size,
        data_dir=data.data_dir, l2=config.fast.l2,
        iterations=config.fast.iterations, knn_k=config.knn.k,
        knn_temperature=config.knn.temperature,
        batch_size=config.eval_batch_size,
        max_train_examples=config.fast.max_train_examples, printer=printer)
  if config.mode == 'lowlabel':
    return lowlabel_lib.LowLabelEvaluator.from_config(
        config, pretrain_config, printer=printer, metrics=metrics,
        output_dir=out_dir)
  if config.mode == 'finetune':
    return finetune_lib.FineTuneEvaluator.from_config(
        config, pretrain_config, printer=printer, metrics=metrics)
  return linear_lib.LinearEvaluator.from_config(
      embed, config, pretrain_config, printer=printer, metrics=metrics)


def run(config: ml_collections.ConfigDict, workdir: str,
        printer=print) -> Dict[str, Any]:
  """Evaluates the pretraining run in `workdir`; writes `output_dir`.

  Writes config.json (the evaluation config), metrics.jsonl (SGD protocols)
  and summary.json: top1_accuracy, top5_accuracy and the protocol's details.
  """
  if config.mode not in MODES:
    raise ConfigError(f'mode must be {" or ".join(MODES)}, got '
                      f'{config.mode!r}')
  if config.encoder not in ('online', 'target'):
    raise ConfigError(f'encoder must be online or target, got '
                      f'{config.encoder!r}')
  pretrain_config, params, state, step = sources.load_pretrained(
      workdir, config.checkpoint_step, config.encoder)
  out_dir = output_dir(config, workdir)
  chief = jax.process_index() == 0
  metrics = _MetricsFile(os.path.join(out_dir, 'metrics.jsonl'), chief)
  # Built before anything is written: a bad setting leaves the workdir as is.
  evaluator = make_evaluator(config, pretrain_config, printer=printer,
                             metrics=metrics, out_dir=out_dir)
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
    metrics.close()
  result = {k: v for k, v in result.items() if not k.startswith('_')}
  result.update(mode=config.mode, checkpoint_step=int(step),
                encoder=config.encoder, wall_time_sec=time.time() - t0)
  if chief:
    files.write_json(os.path.join(out_dir, 'summary.json'), result)
  printer(f'[eval] top-1 {100 * result["top1_accuracy"]:.2f}%  top-5 '
          f'{100 * result["top5_accuracy"]:.2f}%  -> {out_dir}/summary.json')
  return result


def probe_report(exp, workdir: str, printer=print, max_train_examples: int = -1,
                 max_test_examples: int = -1, initial_state=None,
                 trained_state=None) -> Dict[str, Any]:
  """The fast probe and kNN of the trained and of the initial encoder.

  Both are measured the same way in the same run, so that the gain of
  pretraining can be read off directly (a GroupNorm network at initialisation
  is a much weaker feature extractor than a BatchNorm one). A BatchNorm
  network at initialisation has no meaningful moving averages: they are
  estimated first (`calibrate_batchnorm`). Writes <workdir>/probe.json.

  Args:
    exp: a PretrainExperiment whose `train()` has returned (only its
      `config`, `state` and `initial_state()` are used).
    workdir: where probe.json goes.
    printer: output lines.
    max_train_examples: see `feature_probe`.
    max_test_examples: see `feature_probe`.
    initial_state: the unreplicated initial TrainState (default: rebuilt
      with `exp.initial_state()`).
    trained_state: the unreplicated TrainState to probe as "trained"
      (default: `exp.state`, the end of `train_loop.train(exp)`).
  """
  c = exp.config
  probe = probe_lib.ProbeEvaluator(
      features_lib.make_embed_fn(c), dataset=c.data.dataset,
      image_size=c.data.image_size, data_dir=c.data.data_dir or None,
      max_train_examples=max_train_examples,
      max_test_examples=max_test_examples)
  trained = trained_state
  if trained is None:
    trained = devices.unreplicate(exp.state)
  if initial_state is None:
    initial_state = devices.unreplicate(exp.initial_state())
  printer('[probe] linear probe + kNN on frozen features (fast protocol)')
  init_net_state = features_lib.calibrate_batchnorm(
      c, initial_state.online_params, initial_state.online_state,
      batch_size=c.training.batch_size, seed=c.seed)
  results = {
      'trained': probe.run(trained.online_params, trained.online_state),
      'init': probe.run(initial_state.online_params, init_net_state),
  }
  diagnose = c.training.diagnostics_batch_size > 0
  if diagnose:
    # Collapse measures of both networks on the fixed diagnostics batch, the
    # same as metrics.jsonl's (which starts after the first steps).
    for name, state in (('init', initial_state), ('trained', trained)):
      results[name].update(exp.diagnostics(devices.replicate(state)))
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, 'probe.json'), results)
  printer('')
  head = '| encoder                  | linear top-1 | kNN top-1 |'
  rule = '|--------------------------|--------------|-----------|'
  if diagnose:
    head += ' proj_std (fixed batch) | RankMe of projections |'
    rule += '------------------------|-----------------------|'
  printer(head)
  printer(rule)
  for name, label in (('init', 'at initialisation'),
                      ('trained', f'after {c.method}')):
    r = results[name]
    line = (f'| {label:<24} | {100 * r["top1_accuracy"]:11.2f}% | '
            f'{100 * r["knn_top1_accuracy"]:8.2f}% |')
    if diagnose:
      line += (f' {r["fixed_proj_std"]:22.4f} |'
               f' {r["rankme_proj"]:21.1f} |')
    printer(line)
  return results
