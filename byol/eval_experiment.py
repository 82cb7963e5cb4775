"""Evaluation of a frozen encoder: linear evaluation, a fast linear probe, kNN.

Three protocols, all on the frozen online encoder (BatchNorm in inference
mode):
- `linear` (DeepMind's): a linear head trained by SGD with Nesterov momentum on
  augmented images (crop + flip) passed through the frozen encoder, cosine
  learning rate, no weight decay. One head per learning rate of a grid is
  trained side by side on the same features, so a grid costs one encoder pass.
- `fast`: every image is encoded once, without augmentation, and a
  multinomial logistic regression is fitted with L-BFGS on the standardized,
  cached features. Quicker and deterministic; a different protocol, so its
  numbers are not comparable with `linear`.
- kNN: cosine similarity, k nearest training features, votes weighted by
  exp(similarity / temperature) (InstDisc, solo-learn).
"""

import functools
import json
import os
import time
from typing import Any, Dict, Optional, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from byol import checkpointing
from byol import dataset as dataset_lib
from byol import experiment as experiment_lib
from byol.errors import ConfigError, UserError


class EvalError(UserError):
  """The workdir holds nothing that can be evaluated."""


# ---------------------------------------------------------------------------
# Loading a pretraining run.


def load_pretrained(workdir: str, step: Optional[int] = None,
                    encoder: str = 'online'):
  """Returns (pretraining config, params, state) of a pretraining workdir."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise EvalError(f'{workdir} has no config.json: it is not a pretraining '
                    'workdir (run main.py --config=configs/byol.py there first)')
  with open(path) as f:
    pretrain_config = ml_collections.ConfigDict(json.load(f))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  if step is None or step < 0:
    step = ckpt.latest_step()
  if step is None:
    raise EvalError(f'{workdir} has no checkpoint to evaluate')
  state, _ = ckpt.restore(step, target=experiment_lib.state_template(pretrain_config))
  if encoder == 'target' and pretrain_config.method == 'byol':
    return pretrain_config, state.target_params, state.target_state, step
  return pretrain_config, state.online_params, state.online_state, step


def make_embed_fn(pretrain_config: ml_collections.ConfigDict):
  """Returns `embed(params, state, images) -> embedding` (inference mode)."""
  num_classes = dataset_lib.num_classes(pretrain_config.data.dataset)
  forward = experiment_lib.make_forward(pretrain_config, num_classes,
                                        axis_name=None)
  normalize = functools.partial(dataset_lib.normalize,
                                dataset=pretrain_config.data.dataset)

  def embed(params, state, images):
    out, _ = forward.apply(params, state, None, normalize(images), False)
    return out['embedding']

  return embed


def extract_features(embed, params, state, *, dataset: str, split,
                     image_size: int, batch_size: int = 1000,
                     data_dir: Optional[str] = None) -> Tuple[np.ndarray,
                                                              np.ndarray]:
  """Encodes every example of `split` once; returns (features, labels)."""
  n_dev = jax.local_device_count()
  per_dev = max(1, batch_size // n_dev)
  it = dataset_lib.load(split, preprocess_mode=dataset_lib.PreprocessMode.EVAL,
                        batch_dims=[n_dev, per_dev], dataset=dataset,
                        image_size=image_size, data_dir=data_dir)
  p_embed = jax.pmap(embed, in_axes=(None, None, 0))
  feats, labels = [], []
  for batch in it:
    f = np.asarray(p_embed(params, state, batch['images']))
    mask = np.asarray(batch['mask']).reshape(-1).astype(bool)
    feats.append(f.reshape(-1, f.shape[-1])[mask])
    labels.append(np.asarray(batch['labels']).reshape(-1)[mask])
  return np.concatenate(feats), np.concatenate(labels)


# ---------------------------------------------------------------------------
# Fast probe and kNN on cached features.


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int,
                            *, l2: float = 1e-4, iterations: int = 300):
  """Multinomial logistic regression by L-BFGS on standardized features.

  Returns `predict(features) -> logits` (numpy in, numpy out).
  """
  mean, std = x.mean(0), x.std(0) + 1e-6
  xs = jnp.asarray((x - mean) / std)
  one_hot = jax.nn.one_hot(jnp.asarray(y), num_classes)

  def objective(params):
    logits = xs @ params['w'] + params['b']
    ce = jnp.mean(optax.softmax_cross_entropy(logits, one_hot))
    return ce + 0.5 * l2 * jnp.sum(params['w'] ** 2)

  params = {'w': jnp.zeros((x.shape[1], num_classes)),
            'b': jnp.zeros((num_classes,))}
  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  @jax.jit
  def fit(params):
    def body(carry, _):
      params, opt_state = carry
      value, grad = value_and_grad(params, state=opt_state)
      updates, opt_state = opt.update(grad, opt_state, params, value=value,
                                      grad=grad, value_fn=objective)
      return (optax.apply_updates(params, updates), opt_state), value
    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), None,
                                  length=iterations)
    return params

  params = jax.tree.map(np.asarray, fit(params))

  def predict(features):
    return ((features - mean) / std) @ params['w'] + params['b']

  return predict


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  top = np.argsort(-logits, axis=-1)[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=-1)))


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                num_classes: int, *, k: int = 200, temperature: float = 0.07,
                chunk: int = 1024) -> np.ndarray:
  """Class scores of weighted kNN with cosine similarity (InstDisc votes)."""
  def unit(v):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
  train = jnp.asarray(unit(train_x))
  train_one_hot = jax.nn.one_hot(jnp.asarray(train_y), num_classes)
  k = min(k, train_x.shape[0])

  @jax.jit
  def scores(q):
    sim = q @ train.T
    top_sim, top_idx = jax.lax.top_k(sim, k)
    weights = jnp.exp(top_sim / temperature)
    return jnp.einsum('qk,qkc->qc', weights, train_one_hot[top_idx])

  test = unit(test_x)
  out = []
  for start in range(0, test.shape[0], chunk):
    q = test[start:start + chunk]
    pad = chunk - q.shape[0]
    q = np.pad(q, ((0, pad), (0, 0)))  # one compiled shape for every chunk
    out.append(np.asarray(scores(jnp.asarray(q)))[:chunk - pad])
  return np.concatenate(out)


def feature_probe(embed, params, state, *, dataset: str, image_size: int,
                  data_dir: Optional[str] = None, l2: float = 1e-4,
                  iterations: int = 300, knn_k: int = 200,
                  knn_temperature: float = 0.07,
                  batch_size: int = 1000) -> Dict[str, float]:
  """The fast protocol: logistic regression and kNN on cached features."""
  kw = dict(dataset=dataset, image_size=image_size, data_dir=data_dir,
            batch_size=batch_size)
  train_x, train_y = extract_features(
      embed, params, state, split=dataset_lib.Split.TRAIN_AND_VALID, **kw)
  test_x, test_y = extract_features(embed, params, state,
                                    split=dataset_lib.Split.TEST, **kw)
  num_classes = dataset_lib.num_classes(dataset)
  predict = fit_logistic_regression(train_x, train_y, num_classes, l2=l2,
                                    iterations=iterations)
  logits = predict(test_x)
  knn = knn_predict(train_x, train_y, test_x, num_classes, k=knn_k,
                    temperature=knn_temperature)
  return {
      'top1_accuracy': topk_accuracy(logits, test_y, 1),
      'top5_accuracy': topk_accuracy(logits, test_y, 5),
      'knn_top1_accuracy': topk_accuracy(knn, test_y, 1),
      'num_test_examples': int(test_y.shape[0]),
  }


# ---------------------------------------------------------------------------
# DeepMind's linear evaluation: SGD on augmented images, frozen encoder.


def make_linear_eval_fns(embed, num_classes: int, lrs, schedule_steps: int,
                         momentum: float, axis_name: str = 'i'):
  """Pure train/eval steps for one linear head per learning rate in `lrs`."""
  lrs = jnp.asarray(lrs, jnp.float32)
  num_heads = lrs.shape[0]

  def head_logits(heads, features):
    # heads: w [H, D, C], b [H, C]; features [B, D] -> logits [H, B, C].
    return jnp.einsum('bd,hdc->hbc', features, heads['w']) + heads['b'][:, None]

  def init_heads(dim):
    return {'w': jnp.zeros((num_heads, dim, num_classes)),
            'b': jnp.zeros((num_heads, num_classes))}

  def make_optimizer():
    # Each head has its own peak learning rate: scale the unit-lr cosine.
    schedule = optax.cosine_decay_schedule(1.0, schedule_steps)
    return optax.chain(
        optax.trace(decay=momentum, nesterov=True),
        optax.scale_by_schedule(lambda c: -schedule(c)),
        _scale_per_head(lrs))

  optimizer = make_optimizer()

  def train_step(heads, opt_state, params, state, images, labels):
    features = jax.lax.stop_gradient(embed(params, state, images))

    def loss_fn(heads):
      logits = head_logits(heads, features)
      one_hot = jax.nn.one_hot(labels, num_classes)
      # Sum over heads: each head's gradient is its own mean cross-entropy.
      return jnp.sum(jnp.mean(optax.softmax_cross_entropy(logits, one_hot), -1))

    loss, grads = jax.value_and_grad(loss_fn)(heads)
    grads = jax.lax.pmean(grads, axis_name)
    updates, opt_state = optimizer.update(grads, opt_state, heads)
    return (optax.apply_updates(heads, updates), opt_state,
            jax.lax.pmean(loss, axis_name) / num_heads)

  def eval_step(heads, params, state, images, labels, mask):
    logits = head_logits(heads, embed(params, state, images))
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    hit1 = (top5[..., 0] == labels) * mask
    hit5 = jnp.any(top5 == labels[None, :, None], -1) * mask
    return jax.lax.psum((jnp.sum(hit1, -1), jnp.sum(hit5, -1), jnp.sum(mask)),
                        axis_name)

  return init_heads, optimizer, train_step, eval_step


def _scale_per_head(lrs):
  """Multiplies every update leaf, whose leading axis is the head, by lrs."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(
        lambda u: u * lrs.reshape((-1,) + (1,) * (u.ndim - 1)), updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def linear_eval(config: ml_collections.ConfigDict, pretrain_config, params,
                state, *, printer=print) -> Dict[str, Any]:
  """DeepMind's linear protocol with a learning-rate grid; returns results."""
  dataset = config.data.dataset or pretrain_config.data.dataset
  image_size = (config.data.image_size if config.data.image_size > 0 else
                pretrain_config.data.image_size)
  data_dir = config.data.data_dir or pretrain_config.data.data_dir or None
  t = config.training
  n_dev = jax.local_device_count()
  if t.batch_size % jax.device_count():
    raise ConfigError(f'training.batch_size={t.batch_size} is not divisible by '
                      f'{jax.device_count()} devices')
  per_dev = t.batch_size // jax.device_count()
  train_split = (dataset_lib.Split.TRAIN if t.select_on_valid
                 else dataset_lib.Split.TRAIN_AND_VALID)
  n_train = dataset_lib.num_examples(train_split, dataset)
  steps = (t.max_steps if t.max_steps > 0 else
           max(1, int(t.epochs * n_train // t.batch_size)))
  lrs = [lr * t.batch_size / 256 for lr in (t.lr_grid or (t.base_lr,))]
  num_classes = dataset_lib.num_classes(dataset)
  embed = make_embed_fn(pretrain_config)
  init_heads, optimizer, train_step, eval_step = make_linear_eval_fns(
      embed, num_classes, lrs, steps, t.momentum)
  p_train = jax.pmap(train_step, axis_name='i', in_axes=(0, 0, 0, 0, 0, 0),
                     donate_argnums=(0, 1))
  p_eval = jax.pmap(eval_step, axis_name='i')
  params_r = experiment_lib.replicate(params)
  state_r = experiment_lib.replicate(state)
  s = image_size
  dim = jax.eval_shape(embed, params, state,
                       jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)).shape[-1]
  heads = init_heads(dim)
  heads_r = experiment_lib.replicate(heads)
  opt_r = experiment_lib.replicate(optimizer.init(heads))
  it = dataset_lib.load(
      train_split, preprocess_mode=dataset_lib.PreprocessMode.LINEAR_TRAIN,
      batch_dims=[n_dev, per_dev], dataset=dataset, image_size=image_size,
      data_dir=data_dir, seed=config.seed, deterministic=True)
  t0 = time.time()
  for step in range(steps):
    batch = next(it)
    heads_r, opt_r, loss = p_train(heads_r, opt_r, params_r, state_r,
                                   batch['images'], batch['labels'])
    done = step + 1
    if done % t.log_every_steps == 0 or done == steps:
      rate = done * t.batch_size / (time.time() - t0)
      eta = (steps - done) * t.batch_size / max(rate, 1e-9)
      printer(f'[linear-eval] step {done}/{steps}  loss '
              f'{float(np.asarray(loss)[0]):.4f}  {rate:.0f} img/s  '
              f'ETA {experiment_lib.format_duration(eta)}')

  def accuracy(split):
    hits1 = hits5 = count = 0
    for batch in dataset_lib.load(
        split, preprocess_mode=dataset_lib.PreprocessMode.EVAL,
        batch_dims=[n_dev, per_dev], dataset=dataset, image_size=image_size,
        data_dir=data_dir):
      h1, h5, c = p_eval(heads_r, params_r, state_r, batch['images'],
                         batch['labels'], batch['mask'].astype(jnp.float32))
      hits1 += np.asarray(h1)[0]
      hits5 += np.asarray(h5)[0]
      count += float(np.asarray(c)[0])
    return hits1 / count, hits5 / count, int(count)

  test1, test5, n_test = accuracy(dataset_lib.Split.TEST)
  if t.select_on_valid:
    valid1, _, _ = accuracy(dataset_lib.Split.VALID)
    best = int(np.argmax(valid1))
  else:
    valid1, best = None, int(np.argmax(test1))
  result = {
      'top1_accuracy': float(test1[best]),
      'top5_accuracy': float(test5[best]),
      'learning_rate': float(lrs[best]),
      'selected_on': 'valid' if t.select_on_valid else 'test',
      'per_lr_top1': {f'{lr:g}': float(a) for lr, a in zip(lrs, test1)},
      'num_test_examples': n_test,
      'steps': steps,
  }
  if valid1 is not None:
    result['per_lr_valid_top1'] = {f'{lr:g}': float(a)
                                   for lr, a in zip(lrs, valid1)}
  return result


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Evaluates the pretraining run in `workdir`; writes eval_<mode>/."""
  if config.mode not in ('linear', 'fast'):
    raise ConfigError(f'mode must be linear or fast, got {config.mode!r}')
  if config.encoder not in ('online', 'target'):
    raise ConfigError(f'encoder must be online or target, got '
                      f'{config.encoder!r}')
  pretrain_config, params, state, step = load_pretrained(
      workdir, config.checkpoint_step, config.encoder)
  t0 = time.time()
  if config.mode == 'fast':
    embed = make_embed_fn(pretrain_config)
    result = feature_probe(
        embed, params, state,
        dataset=config.data.dataset or pretrain_config.data.dataset,
        image_size=(config.data.image_size if config.data.image_size > 0
                    else pretrain_config.data.image_size),
        data_dir=config.data.data_dir or pretrain_config.data.data_dir or None,
        l2=config.fast.l2, iterations=config.fast.iterations,
        knn_k=config.knn.k, knn_temperature=config.knn.temperature,
        batch_size=config.eval_batch_size)
  else:
    result = linear_eval(config, pretrain_config, params, state)
  result.update(mode=config.mode, checkpoint_step=int(step),
                encoder=config.encoder, wall_time_sec=time.time() - t0)
  out_dir = os.path.join(workdir, f'eval_{config.mode}')
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    with open(os.path.join(out_dir, 'summary.json.tmp'), 'w') as f:
      json.dump(result, f, indent=2, sort_keys=True)
    os.replace(os.path.join(out_dir, 'summary.json.tmp'),
               os.path.join(out_dir, 'summary.json'))
  return result


def probe_report(exp: 'experiment_lib.PretrainExperiment', workdir: str,
                 printer=print) -> Dict[str, Any]:
  """The main job's closing figures: probes of the trained and the initial
  encoder, measured the same way in the same run."""
  c = exp.config
  embed = make_embed_fn(c)
  kw = dict(dataset=c.data.dataset, image_size=c.data.image_size,
            data_dir=c.data.data_dir or None)
  trained = experiment_lib.unreplicate(exp.state)
  init = experiment_lib.unreplicate(exp.initial_state())
  printer('[probe] linear probe + kNN on frozen features (fast protocol)')
  results = {
      'trained': feature_probe(embed, trained.online_params,
                               trained.online_state, **kw),
      'init': feature_probe(embed, init.online_params, init.online_state, **kw),
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'probe.json'), 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)
  printer('')
  printer('| encoder                  | linear top-1 | kNN top-1 |')
  printer('|--------------------------|--------------|-----------|')
  for name, label in (('init', 'at initialisation'), ('trained', 'after BYOL')):
    r = results[name]
    printer(f'| {label:<24} | {100 * r["top1_accuracy"]:11.2f}% | '
            f'{100 * r["knn_top1_accuracy"]:8.2f}% |')
  return results
