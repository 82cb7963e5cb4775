r"""The main job's encoder through PyTorch: the same fast-probe top-1?

  python -m experiments.export_check --workdir=workdirs/local [--out=DIR]

Exports the workdir's online encoder (`byol.export`, torch format), encodes
every TRAIN_AND_VALID and TEST image (centre crop, no augmentation) once with
the project's evaluation-mode forward, once with the exported torchvision-
layout module (TF-SAME padding) and once with the same module padded as
torchvision pads (symmetric; what loading the file into torchvision gives),
fits the fast probe (L-BFGS logistic regression, byol/evaluation/probe.py)
on each and prints the three TEST top-1 and the largest relative difference
of the features. Writes <out>/export_check.json.
"""

import json
import os
import tempfile

from absl import app
from absl import flags
import jax
import numpy as np
import torch

from byol import dataset as dataset_lib
from byol import files
from byol import model
from byol.evaluation import probe
from byol.evaluation import sources
from byol.export import exporter
from byol.export import torch_resnet

_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/local', 'Pretraining '
                               'workdir.')
_OUT = flags.DEFINE_string('out', None, 'Export folder (default: a '
                           'temporary one).')


def encode_all(config, params, state, models, split):
  """Features of every example of `split`: project's and each torch model's."""
  embed = jax.jit(model.Network(config, axis_name=None).embed)
  mean, std = dataset_lib.data_normalization(config.data)
  feats = {name: [] for name in ['project'] + list(models)}
  labels = []
  for batch in dataset_lib.load(
      split, preprocess_mode=dataset_lib.PreprocessMode.EVAL,
      batch_dims=[1000], dataset=config.data.dataset,
      image_size=config.data.image_size):
    keep = batch['mask'].astype(bool)
    x = batch['images'][keep]
    feats['project'].append(np.asarray(embed(params, state, x)))
    xt = torch.from_numpy(np.ascontiguousarray(
        ((x - mean) / std).transpose(0, 3, 1, 2)))
    with torch.no_grad():
      for name, m in models.items():
        feats[name].append(m.embed(xt).numpy())
    labels.append(batch['labels'][keep])
  return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(
      labels)


def main(argv):
  del argv
  out = _OUT.value or os.path.join(tempfile.mkdtemp(), 'export')
  exporter.export(_WORKDIR.value, out, 'torch', overwrite=True)
  config, params, state, step = sources.load_pretrained(_WORKDIR.value)
  models = {'torch': torch_resnet.load(out),
            'torch_symmetric_padding': torch_resnet.load(
                out, padding='torchvision')}
  train, train_y = encode_all(config, params, state, models,
                              dataset_lib.Split.TRAIN_AND_VALID)
  test, test_y = encode_all(config, params, state, models,
                            dataset_lib.Split.TEST)
  num_classes = dataset_lib.num_classes(config.data.dataset)
  result = {'workdir': os.path.abspath(_WORKDIR.value),
            'checkpoint_step': int(step), 'num_train': int(len(train_y)),
            'num_test': int(len(test_y))}
  for name in train:
    predict = probe.fit_logistic_regression(train[name], train_y,
                                            num_classes)
    result[f'{name}_top1'] = probe.topk_accuracy(predict(test[name]),
                                                 test_y, 1)
    both = np.concatenate([train[name], test[name]])
    ref = np.concatenate([train['project'], test['project']])
    result[f'{name}_max_relative_difference'] = float(
        np.abs(both - ref).max() / np.abs(ref).max())
    print(f'[export_check] {name:24s} fast-probe top-1 '
          f'{100 * result[f"{name}_top1"]:.2f}%  features: max |diff| / '
          f'max |project| = {result[f"{name}_max_relative_difference"]:.2e}')
  files.write_json(os.path.join(out, 'export_check.json'), result)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main)
