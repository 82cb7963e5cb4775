"""main.py on a folder of images: pretraining, evaluation, and bad input."""

import json
import math
import os
import subprocess
import sys

import pytest

import data_fixtures
from tiny_runs import TINY_NET, assert_user_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=configs/byol.py:local', *TINY_NET,
        '--config.training.batch_size=8',
        '--config.evaluators.collapse.batch_size=8']


def run_main(args, workdir, timeout=400):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run(
      [sys.executable, 'main.py', f'--workdir={workdir}', *args], cwd=ROOT,
      capture_output=True, text=True, timeout=timeout, env=env)


def _listing(path):
  return {os.path.relpath(os.path.join(d, f), path): os.path.getmtime(
      os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs}


@pytest.mark.parametrize('case', ['unknown_prefix', 'one_class', 'no_images',
                                  'not_tfds_image', 'no_such_split',
                                  'zero_std'])
def test_bad_data_is_one_error_line_and_nothing_lost(tmp_path, case):
  images = tmp_path / 'images'
  images.mkdir()
  extra = []
  if case == 'unknown_prefix':
    name, fragment = 'hub:flowers', 'unknown dataset'
  elif case == 'one_class':
    data_fixtures.write_image_folder(str(images), classes=('cat',))
    name, fragment = f'folder:{images}', 'needs two or more'
  elif case == 'no_images':
    (images / 'readme.txt').write_text('no images here')
    name, fragment = f'folder:{images}', 'no readable images'
  elif case == 'no_such_split':
    # (No corrupt JPEG: libjpeg would warn on stderr as it is skipped.)
    data_fixtures.write_image_folder(str(images), per_class=2,
                                     classes=('dog', 'emu'))
    name, fragment = f'folder:{images}', 'has no UNLABELLED split'
    extra = ['--config.data.pretrain_split=unlabelled']
  elif case == 'zero_std':
    name, fragment = 'fashion_mnist', 'data.std must be > 0'
    extra = ['--config.data.mean=(0.3, 0.3, 0.3)',
             '--config.data.std=(0.35, 0.0, 0.35)']
  else:
    data_fixtures.prepare_tiny_tfds(tmp_path / 'tfds', image=False)
    name, fragment = 'tfds:byol_tiny_tensors', 'not an image-classification'
    extra = [f'--config.data.data_dir={tmp_path / "tfds"}']
  # A workdir with a file in it: it must stay as it was.
  workdir = tmp_path / 'work'
  workdir.mkdir()
  (workdir / 'keep.txt').write_text('mine')
  before = _listing(workdir)
  result = run_main([*TINY, f'--config.data.dataset={name}', *extra,
                     '--config.training.max_steps=2'], workdir)
  assert_user_error(result, fragment)
  assert _listing(workdir) == before
  if case in ('no_images', 'not_tfds_image', 'no_such_split', 'zero_std'):
    return  # (the other cases check a new workdir too)
  # And a workdir that did not exist is not left behind.
  result = run_main([*TINY, f'--config.data.dataset={name}', *extra,
                     '--config.training.max_steps=2'], tmp_path / 'new')
  assert_user_error(result, fragment)
  assert not (tmp_path / 'new').exists()


def _manifest(result, workdir):
  """The dataset.json of a pretraining run that must have succeeded."""
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / 'dataset.json') as f:
    return json.load(f)


def _evaluate_linear(workdir):
  """The summary of a 2-step linear evaluation of a pretraining workdir."""
  result = run_main(['--config=configs/eval.py:local',
                     '--config.training.max_steps=2',
                     '--config.training.batch_size=8',
                     '--config.data.image_size=8'], workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / 'eval_linear' / 'summary.json') as f:
    return json.load(f)


@pytest.mark.slow
def test_pretrain_and_evaluate_a_folder(tmp_path):
  images = tmp_path / 'images'
  data_fixtures.write_image_folder(str(images), per_class=6)
  workdir = tmp_path / 'work'
  name = f'folder:{images}'
  result = run_main([*TINY, f'--config.data.dataset={name}',
                     '--config.training.max_steps=3',
                     "--config.evaluators.schedule=((3, 'collapse'), (3, 'online_classifier'))"],
                    workdir)
  manifest = _manifest(result, workdir)
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  assert summary['step'] == 3 and len(summary['online_params_sha256']) == 64
  assert manifest['dataset'] == name and manifest['num_skipped'] == 2
  assert manifest['classes'] == list(data_fixtures.CLASSES)
  assert len(manifest['normalization']['mean']) == 3
  assert sum(len(manifest['files'][s]) for s in ('TRAIN_AND_VALID',
                                                 'TEST')) == 18
  evaluation = _evaluate_linear(workdir)
  assert evaluation['num_test_examples'] == len(manifest['files']['TEST'])
  assert 0.0 <= evaluation['top1_accuracy'] <= 1.0


@pytest.mark.slow
def test_pretrain_on_an_unlabelled_split_and_evaluate_on_the_labelled(
    tmp_path):
  """STL-10's arrangement (train, test, unlabelled with label -1): the
  automatic pretraining split is train then unlabelled, with statistics
  given in the config; evaluation reads the labelled splits."""
  data_dir = tmp_path / 'tfds'
  data_fixtures.prepare_tiny_stl(data_dir)
  workdir = tmp_path / 'work'
  result = run_main([*TINY, '--config.data.dataset=tfds:byol_tiny_stl',
                     f'--config.data.data_dir={data_dir}',
                     '--config.data.mean=(0.5, 0.5, 0.5)',
                     '--config.data.std=(0.25, 0.25, 0.25)',
                     '--config.training.max_steps=2',
                     "--config.evaluators.schedule=((2, 'online_classifier'),)"],
                    workdir)
  manifest = _manifest(result, workdir)
  assert manifest['pretrain_split'] == 'TRAIN_AND_VALID_AND_UNLABELLED'
  assert manifest['num_examples']['TRAIN_AND_VALID_AND_UNLABELLED'] == 32
  assert manifest['normalization'] == {'mean': [0.5] * 3, 'std': [0.25] * 3,
                                       'source': 'config'}
  with open(workdir / 'metrics.jsonl') as f:
    last = [json.loads(line) for line in f][-1]
  # The online classifier trains on the labelled images of each batch only
  # (a finite loss, not NaN, whatever the batch holds) and is tested on TEST.
  assert math.isfinite(last['classif_loss']) and last['classif_loss'] >= 0
  assert 0.0 <= last['eval_top1_accuracy'] <= 1.0
  evaluation = _evaluate_linear(workdir)
  assert evaluation['num_test_examples'] == 6
