"""Evaluation: linear heads, the fast probe, kNN, and runs on a workdir."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from byol import checkpointing
from byol import dataset
from byol import eval_experiment
from byol import experiment
from byol import model
from byol import update
from byol.errors import ConfigError
from byol.evaluation import features as features_lib
from byol.evaluation import finetune
from byol.evaluation import linear
from byol.evaluation import loop
from byol.evaluation import probe
from byol.evaluation import sources
from configs import eval as eval_config
from test_experiment import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# Pure pieces.


def test_topk_accuracy_on_known_inputs():
  logits = np.array([[0.1, 0.9, 0.0, 0.5],   # ranks 1, 3, 0, 2
                     [0.8, 0.1, 0.3, 0.2],   # ranks 0, 2, 3, 1
                     [0.2, 0.3, 0.4, 0.1]])  # ranks 2, 1, 0, 3
  labels = np.array([1, 3, 3])
  assert loop.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
  assert loop.topk_accuracy(logits, labels, 2) == pytest.approx(1 / 3)
  assert loop.topk_accuracy(logits, labels, 3) == pytest.approx(2 / 3)
  assert loop.topk_accuracy(logits, labels, 4) == pytest.approx(1.0)


def test_knn_weighted_votes_on_a_toy_problem():
  # Train points on the unit circle; the query is at angle 0.
  angles = np.array([0.1, 0.5, 0.6, 3.0])
  train_x = np.stack([np.cos(angles), np.sin(angles)], -1) * 5.0  # scale-free
  train_y = np.array([0, 1, 1, 2])
  query = np.array([[2.0, 0.0]])
  # k=3: one close neighbour of class 0 against two farther ones of class 1.
  # A sharp temperature lets the close one win; a flat one, the majority.
  for temperature, winner in ((0.05, 0), (10.0, 1)):
    scores = probe.knn_predict(train_x, train_y, query, 3, k=3,
                                         temperature=temperature)
    weights = np.exp((np.cos(angles[:3]) - 1.0) / temperature)
    expected = np.array([weights[0], weights[1] + weights[2], 0.0])
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5, atol=1e-30)
    assert int(np.argmax(scores[0])) == winner
  # Two well separated clusters: every query is classified correctly.
  rng = np.random.RandomState(0)
  centres = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  tx = np.repeat(centres, 50, 0) + 0.1 * rng.randn(100, 3)
  ty = np.repeat([0, 1], 50)
  qx = np.repeat(centres, 20, 0) + 0.1 * rng.randn(40, 3)
  qy = np.repeat([0, 1], 20)
  scores = probe.knn_predict(tx, ty, qx, 2, k=200, chunk=16)
  assert scores.shape == (40, 2)
  assert loop.topk_accuracy(scores, qy, 1) == 1.0


def test_logistic_regression_on_a_separable_problem():
  rng = np.random.RandomState(0)
  teacher = rng.randn(20, 5)
  x = rng.randn(3000, 20) * rng.uniform(0.1, 10.0, size=20)  # mixed scales
  y = np.argmax(x @ teacher, -1)
  predict = probe.fit_logistic_regression(x[:2000], y[:2000], 5,
                                                    l2=1e-5, iterations=200)
  train_acc = loop.topk_accuracy(predict(x[:2000]), y[:2000], 1)
  test_acc = loop.topk_accuracy(predict(x[2000:]), y[2000:], 1)
  assert train_acc > 0.99, train_acc
  assert test_acc > 0.95, test_acc


def _linear_run(lrs, steps=6, dim=12, classes=4, batch=32, seed=0):
  """A few jitted lr-grid steps on a fixed random problem."""
  fns = linear.make_linear_eval_fns(
      features_lib.pixels_embed, classes, lrs, steps, 0.9, axis_name=None)
  rng = np.random.RandomState(seed)
  images = rng.randn(steps, batch, 2, 2, dim // 4).astype(np.float32)
  labels = rng.randint(0, classes, size=(steps, batch)).astype(np.int32)
  heads, opt_state = fns.init(dim)
  step = jax.jit(fns.train_step)
  for i in range(steps):
    heads, opt_state, loss = step(heads, opt_state, None, None, images[i],
                                  labels[i])
  return heads, loss, images, labels


def test_each_grid_head_equals_a_single_head_run():
  lrs = (1.6, 0.8, 0.2)
  grid, grid_loss, images, labels = _linear_run(lrs)
  assert grid_loss.shape == (3,)
  for h, lr in enumerate(lrs):
    single, single_loss, _, _ = _linear_run((lr,))
    for key in ('w', 'b'):
      np.testing.assert_allclose(np.asarray(grid[key][h]),
                                 np.asarray(single[key][0]),
                                 rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(grid_loss[h]), float(single_loss[0]),
                               rtol=1e-6)
  # The heads really differ: the grid is not one head copied.
  assert float(jnp.abs(grid['w'][0] - grid['w'][2]).max()) > 1e-3

  # One head is optax.sgd(cosine(lr), momentum 0.9, Nesterov), DeepMind's.
  lr, steps = 0.8, 6
  opt = optax.sgd(optax.cosine_decay_schedule(lr, steps), momentum=0.9,
                  nesterov=True)
  head = {'w': jnp.zeros((12, 4)), 'b': jnp.zeros((4,))}
  state = opt.init(head)
  for i in range(steps):
    def loss_fn(p, i=i):
      x = images[i].reshape(images.shape[1], -1)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          x @ p['w'] + p['b'], labels[i]))
    updates, state = opt.update(jax.grad(loss_fn)(head), state, head)
    head = optax.apply_updates(head, updates)
  np.testing.assert_allclose(np.asarray(grid['w'][1]), np.asarray(head['w']),
                             rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# End to end on a tiny pretraining workdir.


@pytest.fixture(scope='module')
def tiny_workdir(tmp_path_factory):
  """A pretraining workdir: config.json + the checkpoint of an initial state."""
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  config = tiny_config('local')
  init = jax.jit(experiment.make_init_fn(
      model.Network(config, axis_name=None),
      update.make_optimizer(config, 2, 0)))
  state = init(jax.random.PRNGKey(0), np.zeros((2, 16, 16, 3), np.float32))
  checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints')).save(
      0, jax.tree.map(np.asarray, state))
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  return workdir


def _eval_config(arg, **fields):
  c = eval_config.get_config(arg)
  c.unlock()
  c.update_from_flattened_dict(fields)
  c.lock()
  return c


# The evaluations below read all 10,000 test images (and the selection all
# 10,000 VALID ones): at 8 px instead of the 16 px of pretraining, the encoder
# does a quarter of the work (it pools globally, so any size works).


@pytest.mark.slow
def test_linear_eval_selects_on_valid_and_reports_test(tiny_workdir):
  config = _eval_config('local', **{'data.image_size': 8,
      'training.batch_size': 64, 'training.max_steps': 8,
      'training.lr_grid': (1.0, 0.25), 'training.log_every_steps': 4,
      'eval_batch_size': 1000})
  lines = []
  result = eval_experiment.run(config, tiny_workdir, printer=lines.append)
  out = os.path.join(tiny_workdir, 'eval_linear')
  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['top1_accuracy'] == pytest.approx(result['top1_accuracy'])
  assert summary['num_test_examples'] == 10_000
  assert summary['num_valid_examples'] == 10_000
  assert summary['num_train_examples'] == 50_000  # TRAIN = train[10000:]
  assert summary['train_split'] == 'TRAIN'
  assert summary['steps'] == 8 and summary['selected_on'] == 'VALID'
  assert set(summary['per_lr_test_top1']) == {'0.25', '0.0625'}  # x 64/256
  # The head best on VALID is the one whose TEST accuracy is reported.
  valid = summary['per_lr_valid_top1']
  best = max(valid, key=valid.get)
  assert summary['learning_rate'] == float(best)
  assert summary['top1_accuracy'] == summary['per_lr_test_top1'][best]
  # A random GN+WS encoder + 8 SGD steps on 512 images: above chance (10%).
  assert 0.15 < summary['top1_accuracy'] <= 1.0, summary
  assert summary['top5_accuracy'] >= summary['top1_accuracy']
  with open(os.path.join(out, 'metrics.jsonl')) as f:
    records = [json.loads(l) for l in f]
  assert [r['step'] for r in records] == [4, 8]
  assert all(np.isfinite(r['loss_lr0.0625']) for r in records)
  assert any('step 8/8' in l for l in lines)


def test_selection_never_looks_at_test():
  Split = dataset.Split  # pylint: disable=invalid-name
  evaluator = linear.LinearEvaluator(
      features_lib.pixels_embed, num_classes=10,
      data=loop.DataSpec('fashion_mnist', 8, None), batch_size=256, epochs=1,
      max_steps=1, base_lrs=(0.4, 0.1, 0.05), momentum=0.9,
      train_split=Split.TRAIN, head_init='zeros', log_every_steps=1, seed=0)
  # Head 1 is best on VALID, head 0 on TEST: head 1's TEST figure is reported.
  accuracy = {Split.VALID: (np.array([0.5, 0.9, 0.7]), None, 10_000),
              Split.TEST: (np.array([0.95, 0.6, 0.8]),
                           np.array([0.99, 0.8, 0.9]), 10_000)}
  result = evaluator.report(accuracy.__getitem__)
  assert result['top1_accuracy'] == 0.6 and result['top5_accuracy'] == 0.8
  assert result['base_learning_rate'] == 0.1
  assert result['learning_rate'] == pytest.approx(0.1)
  assert result['selected_on'] == 'VALID'
  # One rate on TRAIN_AND_VALID: no VALID pass at all, that head's TEST.
  one = linear.LinearEvaluator(
      features_lib.pixels_embed, num_classes=10,
      data=loop.DataSpec('fashion_mnist', 8, None), batch_size=256, epochs=1,
      max_steps=1, base_lrs=(0.2,), momentum=0.9,
      train_split=Split.TRAIN_AND_VALID, head_init='haiku', log_every_steps=1,
      seed=0)
  test_only = {Split.TEST: (np.array([0.7]), np.array([0.9]), 10_000)}
  result = one.report(test_only.__getitem__)
  assert result['top1_accuracy'] == 0.7 and result['learning_rate'] == 0.2
  assert 'per_lr_valid_top1' not in result


def test_a_grid_without_valid_is_a_config_error(tiny_workdir):
  config = _eval_config('local', **{'training.train_split': 'TRAIN_AND_VALID'})
  with pytest.raises(ConfigError, match='chosen on VALID'):
    eval_experiment.run(config, tiny_workdir)
  for field, value, match in (('training.train_split', 'TEST', 'TRAIN or'),
                              ('training.head_init', 'ones', 'head_init')):
    with pytest.raises(ConfigError, match=match):
      eval_experiment.run(_eval_config('dm', **{field: value}), tiny_workdir)
  with pytest.raises(ConfigError, match='one learning rate'):
    eval_experiment.run(_eval_config('finetune', **{
        'training.lr_grid': (0.1, 0.2)}), tiny_workdir)
  assert not os.path.exists(os.path.join(tiny_workdir, 'eval_linear_dm'))


def test_haiku_head_init_is_hk_linear_default():
  dim, classes = 512, 1000
  head = linear.init_head('haiku', dim, classes, seed=0)
  w, b = np.asarray(head['w']), np.asarray(head['b'])
  assert w.shape == (dim, classes) and np.all(b == 0)
  # Truncated at 2 std of 1/sqrt(dim); the truncation leaves 0.880 of it.
  assert np.abs(w).max() <= 2 / np.sqrt(dim) + 1e-7
  assert np.std(w) == pytest.approx(0.8796 / np.sqrt(dim), rel=0.01)
  assert abs(np.mean(w)) < 1e-3 / np.sqrt(dim) * 10
  again = linear.init_head('haiku', dim, classes, seed=0)
  np.testing.assert_array_equal(again['w'], w)
  zeros = linear.init_head('zeros', dim, classes)
  assert not np.any(np.asarray(zeros['w']))


@pytest.mark.slow
def test_dm_protocol_one_head_on_train_and_valid(tiny_workdir):
  config = _eval_config('local,dm', **{
      'training.batch_size': 64, 'training.max_steps': 2,
      'data.image_size': 8})
  assert config.training.head_init == 'haiku'
  result = eval_experiment.run(config, tiny_workdir, printer=lambda _: None)
  assert result['train_split'] == 'TRAIN_AND_VALID'
  assert result['num_train_examples'] == 60_000
  assert result['selected_on'] == 'none (one rate)'
  assert result['learning_rate'] == pytest.approx(0.2 * 64 / 256)
  assert list(result['per_lr_test_top1']) == ['0.05']
  assert 'num_valid_examples' not in result
  assert 0.0 < result['top1_accuracy'] <= 1.0
  assert os.path.exists(os.path.join(tiny_workdir, 'eval_linear_dm',
                                     'summary.json'))


@pytest.mark.slow
def test_finetune_moves_the_encoder_and_lowers_the_loss(tiny_workdir):
  pretrain_config, params, state, _ = sources.load_pretrained(
      tiny_workdir)
  config = _eval_config('local,finetune', **{
      'training.batch_size': 64, 'training.max_steps': 10,
      'training.base_lr': 0.8, 'data.image_size': 8,
      'training.log_every_steps': 1})
  records = []
  evaluator = finetune.FineTuneEvaluator.from_config(
      config, model.Network(pretrain_config), printer=lambda _: None,
      metrics=records.append)
  result = evaluator.run(params, state)
  losses = [r['loss'] for r in records]
  assert len(losses) == 10 and np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
  assert records[0]['learning_rate'] == pytest.approx(0.8 * 64 / 256)
  assert result['encoder_relative_change'] > 1e-3
  # Only the encoder trains; the pretraining heads are left as they were.
  new = result['_params']
  moved = [m for m in params if not np.array_equal(
      np.asarray(new[m]['w'] if 'w' in new[m] else new[m]['scale']),
      np.asarray(params[m]['w'] if 'w' in params[m] else params[m]['scale']))]
  assert moved and all(m.startswith('res_net') for m in moved), moved
  assert 'res_net/~/initial_conv' in moved
  assert result['train_split'] == 'TRAIN_AND_VALID'
  assert 0.1 < result['top1_accuracy'] <= result['top5_accuracy'] <= 1.0


@pytest.mark.slow
def test_fast_probe_from_the_command_line(tiny_workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/eval.py:local,fast',
       f'--workdir={tiny_workdir}', '--config.fast.max_train_examples=2000',
       '--config.data.image_size=8',
       '--config.fast.iterations=100'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(tiny_workdir, 'eval_fast', 'summary.json')) as f:
    summary = json.load(f)
  assert summary['num_train_examples'] == 2000
  assert summary['num_test_examples'] == 10_000
  # Random features of Fashion-MNIST are far above chance for both.
  assert 0.4 < summary['top1_accuracy'] <= summary['top5_accuracy'] <= 1.0
  assert 0.4 < summary['knn_top1_accuracy'] <= 1.0


def test_a_workdir_without_a_run_is_a_user_error(tmp_path):
  with pytest.raises(sources.EvalError, match='config.json'):
    eval_experiment.run(_eval_config('fast'), str(tmp_path))


def test_a_config_no_network_can_be_built_from_is_a_user_error(tmp_path):
  config = json.loads(tiny_config('local').to_json_best_effort())
  config['model']['encoder']['norm'] = 'banana'
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(sources.EvalError,
                     match=r'config\.json is not the config .*model\.encoder'):
    eval_experiment.run(_eval_config('fast'), str(tmp_path))
  assert os.listdir(tmp_path) == ['config.json']


@pytest.mark.slow
def test_batchnorm_statistics_are_calibrated_before_probing_an_init_net():
  config = tiny_config('local,bn')
  init = jax.jit(experiment.make_init_fn(
      model.Network(config, axis_name=None),
      update.make_optimizer(config, 2, 0)))
  # An init pass whose normalised input is 0 (images at the dataset's mean;
  # the network normalises its own input) leaves every BatchNorm's moving
  # variance at ~0: the worst statistics calibration has to replace.
  mean, _ = dataset.normalization_stats(config.data.dataset)
  state = init(jax.random.PRNGKey(0),
               np.broadcast_to(mean, (2, 16, 16, 3)).astype(np.float32))
  embed = jax.jit(model.Network(config, axis_name=None).embed)
  images = np.random.RandomState(0).uniform(size=(8, 16, 16, 3)).astype(
      np.float32)
  before = np.asarray(embed(state.online_params, state.online_state, images))
  # Variances of ~0 make every BatchNorm multiply by ~1/sqrt(eps).
  assert not np.all(np.abs(before) < 1e4)
  calibrated = features_lib.calibrate_batchnorm(
      model.Network(config), state.online_params, state.online_state, num_batches=2,
      batch_size=32)
  after = np.asarray(embed(state.online_params, calibrated, images))
  assert np.all(np.isfinite(after)) and np.abs(after).max() < 100
  assert np.abs(after).max() > 1e-3
  # A network without BatchNorm is left as it is.
  gn = tiny_config('local')
  assert features_lib.calibrate_batchnorm(
      model.Network(gn), {}, {'x': 1}) == {'x': 1}


def test_linear_eval_steps_compile_once_over_batches():
  """The lr-grid train and eval steps, and an encoder's embed function, each
  traced once over several batches of one shape."""
  lrs = (0.8, 0.2)
  fns = linear.make_linear_eval_fns(
      features_lib.pixels_embed, 4, lrs, 6, 0.9, axis_name=None)
  train = jax.jit(chex.assert_max_traces(fns.train_step, n=1))
  evaluate = jax.jit(chex.assert_max_traces(fns.eval_step, n=1))
  rng = np.random.RandomState(1)
  heads, opt_state = fns.init(12)
  mask = np.ones(32, np.float32)
  mask[-5:] = 0.
  for _ in range(3):
    images = rng.randn(32, 2, 2, 3).astype(np.float32)
    labels = rng.randint(0, 4, size=32).astype(np.int32)
    heads, opt_state, loss = train(heads, opt_state, None, None, images,
                                   labels)
    chex.assert_shape(loss, (len(lrs),))
    chex.assert_tree_all_finite((heads, loss))
    hit1, hit5, count = evaluate(heads, None, None, images, labels, mask)
    chex.assert_shape([hit1, hit5], [(len(lrs),)] * 2)
    assert int(count) == 27
    assert np.all(np.asarray(hit1) <= np.asarray(hit5))
    assert np.all(np.asarray(hit5) == 27)  # 4 classes: every label in a top 5
  chex.assert_shape(heads['w'], (len(lrs), 12, 4))

  config = tiny_config('local')
  forward = model.Network(config, axis_name=None).forward
  params, state = jax.jit(forward.init, static_argnums=2)(
      jax.random.PRNGKey(0), np.zeros((2, 8, 8, 3), np.float32), True)
  embed = jax.jit(chex.assert_max_traces(
      model.Network(config, axis_name=None).embed, n=1))
  for seed in range(3):
    images = np.random.RandomState(seed).uniform(
        size=(4, 8, 8, 3)).astype(np.float32)
    features = embed(params, state, images)
    # width 1/8 of a basic-block ResNet: 512 / 8 = 64 features.
    chex.assert_shape(features, (4, 64))
    chex.assert_tree_all_finite(features)


def test_probe_loss_gradient_has_nothing_for_xla_to_fold():
  # XLA constant-folds a scatter whose operands are all constants, slowly,
  # and says so in error-level log lines on a loaded machine; the gradient
  # of a gather-based cross-entropy is such a scatter (N x 1). The probe's
  # loss has the same value and a gradient without one.
  import chex  # pylint: disable=g-import-not-at-top
  from byol.evaluation import probe  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  xs = jnp.asarray(rng.randn(600, 5), jnp.float32)
  labels = jnp.asarray(rng.randint(0, 3, 600), jnp.int32)
  params = {'w': jnp.asarray(rng.randn(5, 3), jnp.float32),
            'b': jnp.asarray(rng.randn(3), jnp.float32)}

  def loss(params, xs, labels):
    return probe.probe_objective(params, xs=xs, l2=1e-4,
                                 one_hot=labels[:, None] == jnp.arange(3))

  grad_fn = jax.jit(jax.value_and_grad(loss))
  assert 'scatter' not in grad_fn.lower(params, xs, labels).as_text()
  want = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      xs @ params['w'] + params['b'], labels)) + 0.5e-4 * jnp.sum(
          params['w'] ** 2)
  chex.assert_trees_all_close(grad_fn(params, xs, labels)[0], want, rtol=1e-6)
