"""Evaluation of a frozen encoder: linear evaluation, a fast linear probe, kNN.

Every protocol reads the frozen online encoder of a pretraining run (or its
target, `encoder='target'`), with BatchNorm in inference mode (its moving
averages), and uses the pooled embedding:

- `linear` (DeepMind's BYOL protocol): a linear head trained by SGD with
  Nesterov momentum 0.9, no weight decay, learning rate base * batch/256 with
  a cosine decay to 0, on random-resized-crop + flip images passed through
  the frozen encoder; test images are centre-cropped. One head per learning
  rate of a grid is trained side by side on the same features (the heads are
  `jax.vmap`ped, so head h computes exactly what a one-head run with that
  learning rate computes), so a grid costs one encoder pass per batch. The
  reported head is the best on TEST by default, or, with `select`, the best
  on VALID after training on TRAIN (the paper's protocol).
- `fast`: a different, quicker protocol. Every image is encoded once, without
  augmentation (centre crop), and a multinomial logistic regression is fitted
  by L-BFGS to the standardized, cached features; deterministic, minutes on a
  CPU at Fashion-MNIST scale. Its numbers are not comparable with `linear`.
  It also reports kNN.
- kNN on the same cached features: cosine similarity, the k nearest training
  examples vote for their class with weight exp(similarity / temperature)
  (Wu et al. 2018, InstDisc).

The cached-feature protocols hold every feature in host memory and read only
this process's shard: they are meant for single-process runs.
"""

import functools
import json
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from byol import augmentations
from byol import checkpointing
from byol import dataset as dataset_lib
from byol import devices
from byol import experiment as experiment_lib
from byol.errors import ConfigError, UserError

EmbedFn = Callable[[hk.Params, hk.State, jax.Array], jax.Array]


class EvalError(UserError):
  """The workdir holds nothing that can be evaluated."""


# ---------------------------------------------------------------------------
# Loading a pretraining run.


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
  state, _ = ckpt.restore(step,
                          target=experiment_lib.state_template(pretrain_config))
  if encoder == 'target' and pretrain_config.method == 'byol':
    return pretrain_config, state.target_params, state.target_state, step
  return pretrain_config, state.online_params, state.online_state, step


def make_embed_fn(pretrain_config: ml_collections.ConfigDict) -> EmbedFn:
  """Returns `embed(params, state, images) -> embedding`, inference mode.

  `images` are in [0, 1]; the dataset's normalization is applied here.
  """
  num_classes = dataset_lib.num_classes(pretrain_config.data.dataset)
  forward = experiment_lib.make_forward(pretrain_config, num_classes,
                                        axis_name=None)
  normalize = functools.partial(dataset_lib.normalize,
                                dataset=pretrain_config.data.dataset)

  def embed(params, state, images):
    # Only the embedding is used: XLA drops the heads from the program.
    out, _ = forward.apply(params, state, None, normalize(images), False)
    return out['embedding']

  return embed


def pixels_embed(params, state, images):
  """The identity "encoder": flattened pixels (the raw-pixel baseline)."""
  del params, state
  return images.reshape(images.shape[0], -1)


def extract_features(embed: EmbedFn, params, state, *, dataset: str, split,
                     image_size: int, batch_size: int = 1000,
                     data_dir: Optional[str] = None,
                     max_examples: int = -1) -> Tuple[np.ndarray, np.ndarray]:
  """Encodes the examples of `split` once (centre crop, no augmentation).

  Args:
    embed: `embed(params, state, images)`.
    params, state: the encoder's (host arrays; broadcast to every device).
    dataset, split, image_size, data_dir: what to read.
    batch_size: images per step over this process's devices.
    max_examples: stop after this many examples (the first ones of the
      split, in its fixed order); -1 reads the whole split.

  Returns:
    (features [N, D] float32, labels [N] int32) of this process's shard.
  """
  n_dev = jax.local_device_count()
  per_dev = max(1, batch_size // n_dev)
  it = dataset_lib.load(split, preprocess_mode=dataset_lib.PreprocessMode.EVAL,
                        batch_dims=[n_dev, per_dev], dataset=dataset,
                        image_size=image_size, data_dir=data_dir)
  p_embed = jax.pmap(embed)
  # Copied to the devices once, not with every batch.
  params_r = devices.replicate(params)
  state_r = devices.replicate(state)
  feats, labels, count = [], [], 0
  for batch in it:
    f = np.asarray(p_embed(params_r, state_r, batch['images']), np.float32)
    mask = np.asarray(batch['mask']).reshape(-1).astype(bool)
    feats.append(f.reshape(-1, f.shape[-1])[mask])
    labels.append(np.asarray(batch['labels']).reshape(-1)[mask])
    count += int(mask.sum())
    if 0 < max_examples <= count:
      break
  feats, labels = np.concatenate(feats), np.concatenate(labels)
  if max_examples > 0:
    feats, labels = feats[:max_examples], labels[:max_examples]
  return feats, labels.astype(np.int32)


def calibrate_batchnorm(config: ml_collections.ConfigDict, params: hk.Params,
                        state: hk.State, *, num_batches: int = 10,
                        batch_size: int = 256, seed: int = 0) -> hk.State:
  """BatchNorm moving averages measured on data, for an untrained network.

  A network straight from `init` has moving averages that describe no data
  (Haiku's `init` pass on the placeholder zero images leaves variances near
  0), so in inference mode each BatchNorm multiplies by about 1/sqrt(eps)
  and the features overflow. Before probing such an encoder its averages
  are reset and re-estimated the way training would estimate them: training-
  mode passes over both augmented views of `num_batches` pretraining batches.
  The parameters are not touched. Networks without BatchNorm are returned
  unchanged.
  """
  if experiment_lib.batch_independent(config):
    return state
  c = config
  forward = experiment_lib.make_forward(
      c, dataset_lib.num_classes(c.data.dataset), axis_name=None)
  it = dataset_lib.load(
      dataset_lib.Split.TRAIN_AND_VALID,
      preprocess_mode=dataset_lib.PreprocessMode.PRETRAIN,
      batch_dims=[batch_size], dataset=c.data.dataset,
      image_size=c.data.image_size, data_dir=c.data.data_dir or None,
      seed=seed, deterministic=True)

  @jax.jit
  def update(state, batch, rng):
    views = augmentations.postprocess(batch, rng, c.data.augmentations)
    for view in ('view1', 'view2'):
      images = dataset_lib.normalize(views[view], dataset=c.data.dataset)
      _, state = forward.apply(params, state, None, images, True)
    return state

  # Zeroed averages and counters: the first update then sets each average to
  # that batch's statistics exactly (Haiku's EMAs are zero-debiased).
  state = jax.tree.map(jnp.zeros_like, state)
  key = jax.random.PRNGKey(seed)
  for i in range(num_batches):
    state = update(state, next(it), jax.random.fold_in(key, i))
  return jax.tree.map(np.asarray, state)


# ---------------------------------------------------------------------------
# Fast probe and kNN on cached features.


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, num_classes: int,
                            *, l2: float = 1e-4, iterations: int = 300
                            ) -> Callable[[np.ndarray], np.ndarray]:
  """Multinomial logistic regression by L-BFGS on standardized features.

  Minimises mean cross-entropy + l2/2 * ||W||^2 (the bias is not
  penalised) over `iterations` L-BFGS steps with optax's zoom line search,
  from zero weights: the fit is deterministic.

  Args:
    x: [N, D] features.
    y: [N] integer labels in [0, num_classes).
    num_classes: number of classes.
    l2: weight of the L2 penalty (on the standardized features' weights).
    iterations: L-BFGS iterations.

  Returns:
    `predict(features) -> logits`, numpy in and out.
  """
  # Statistics in float64: the features of an un-normalized network can be
  # large enough for their squares to overflow float32.
  x = _finite(x)
  mean = x.mean(0)
  # A constant feature (a collapsed encoder has only those) stays 0.
  std = x.std(0) + 1e-6
  xs = jnp.asarray(((x - mean) / std).astype(np.float32))
  labels = jnp.asarray(y, jnp.int32)

  def objective(params):
    logits = xs @ params['w'] + params['b']
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits,
                                                                  labels))
    return ce + 0.5 * l2 * jnp.sum(params['w'] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  @jax.jit
  def fit(params):
    def body(carry, _):
      params, opt_state = carry
      value, grad = value_and_grad(params, state=opt_state)
      updates, opt_state = opt.update(grad, opt_state, params, value=value,
                                      grad=grad, value_fn=objective)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), None,
                                  length=iterations)
    return params

  params = fit({'w': jnp.zeros((x.shape[1], num_classes), jnp.float32),
                'b': jnp.zeros((num_classes,), jnp.float32)})
  w, b = np.asarray(params['w']), np.asarray(params['b'])

  def predict(features):
    return (((_finite(features) - mean) / std) @ w + b).astype(np.float32)

  return predict


def _finite(x) -> np.ndarray:
  """float64 copy with non-finite entries (a diverged network's) set to 0."""
  x = np.asarray(x, np.float64)
  return np.where(np.isfinite(x), x, 0.0)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among the k largest scores.

  Ties are broken towards the lower class index (a stable sort).
  """
  logits, labels = np.asarray(logits), np.asarray(labels)
  top = np.argsort(-logits, axis=-1, kind='stable')[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=-1)))


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                num_classes: int, *, k: int = 200, temperature: float = 0.07,
                chunk: int = 256) -> np.ndarray:
  """Class scores of the temperature-weighted kNN classifier.

  Features are L2-normalised; each test example's k most cosine-similar
  training examples add exp(similarity / temperature) to their class.

  Returns:
    [num_test, num_classes] scores: the summed weights, times the constant
    exp(-1 / temperature) that keeps them finite (argmax is the prediction).
  """
  def unit(v):
    v = _finite(v)
    v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-300)
    return v.astype(np.float32)

  train = jnp.asarray(unit(train_x))
  train_labels = jnp.asarray(train_y, jnp.int32)
  k = min(k, train.shape[0])

  @jax.jit
  def scores(q):
    sim = q @ train.T
    top_sim, top_idx = jax.lax.top_k(sim, k)
    weights = jnp.exp((top_sim - 1.0) / temperature)  # shifted: no overflow
    votes = jnp.zeros((q.shape[0], num_classes), jnp.float32)
    rows = jnp.arange(q.shape[0])[:, None]
    # A scatter-add over [chunk, k], not a [chunk, k, classes] one-hot.
    return votes.at[rows, train_labels[top_idx]].add(weights)

  test = unit(test_x)
  out = []
  for start in range(0, test.shape[0], chunk):
    q = test[start:start + chunk]
    pad = chunk - q.shape[0]
    q = np.pad(q, ((0, pad), (0, 0)))  # one compiled shape for every chunk
    out.append(np.asarray(scores(jnp.asarray(q)))[:chunk - pad])
  return np.concatenate(out)


def feature_probe(embed: EmbedFn, params, state, *, dataset: str,
                  image_size: int, data_dir: Optional[str] = None,
                  l2: float = 1e-4, iterations: int = 300, knn_k: int = 200,
                  knn_temperature: float = 0.07, batch_size: int = 1000,
                  max_train_examples: int = -1,
                  max_test_examples: int = -1) -> Dict[str, float]:
  """The fast protocol: logistic regression and kNN on cached features.

  Fits on TRAIN_AND_VALID and reports on TEST; `max_train_examples` /
  `max_test_examples`, when positive, keep only the first examples of each
  (for quick studies and tests; -1 keeps all).
  """
  kw = dict(dataset=dataset, image_size=image_size, data_dir=data_dir,
            batch_size=batch_size)
  t0 = time.time()
  train_x, train_y = extract_features(
      embed, params, state, split=dataset_lib.Split.TRAIN_AND_VALID,
      max_examples=max_train_examples, **kw)
  test_x, test_y = extract_features(embed, params, state,
                                    split=dataset_lib.Split.TEST,
                                    max_examples=max_test_examples, **kw)
  t1 = time.time()
  num_classes = dataset_lib.num_classes(dataset)
  predict = fit_logistic_regression(train_x, train_y, num_classes, l2=l2,
                                    iterations=iterations)
  logits = predict(test_x)
  knn = knn_predict(train_x, train_y, test_x, num_classes, k=knn_k,
                    temperature=knn_temperature)
  return {
      'top1_accuracy': topk_accuracy(logits, test_y, 1),
      'top5_accuracy': topk_accuracy(logits, test_y, 5),
      'train_top1_accuracy': topk_accuracy(predict(train_x), train_y, 1),
      'knn_top1_accuracy': topk_accuracy(knn, test_y, 1),
      'knn_top5_accuracy': topk_accuracy(knn, test_y, 5),
      'feature_dim': int(train_x.shape[1]),
      'nonfinite_features': int(np.sum(~np.isfinite(train_x)) +
                                np.sum(~np.isfinite(test_x))),
      'num_train_examples': int(train_y.shape[0]),
      'num_test_examples': int(test_y.shape[0]),
      'encode_time_sec': t1 - t0,
      'fit_time_sec': time.time() - t1,
  }


# ---------------------------------------------------------------------------
# DeepMind's linear evaluation: SGD on augmented images, frozen encoder.


class LinearEvalFns:
  """Pure functions of the lr-grid linear evaluation (see make_linear_eval_fns).

  Attributes:
    init: `init(dim) -> (heads, opt_state)`; every leaf has a leading head
      axis of length len(lrs); heads start at zero.
    train_step: `(heads, opt_state, params, state, images, labels) ->
      (heads, opt_state, loss [H])`.
    eval_step: `(heads, params, state, images, labels, mask) ->
      (top-1 hits [H], top-5 hits [H], count)`.
    learning_rate: `learning_rate(step) -> [H]`, the rates of that step.
  """

  def __init__(self, init, train_step, eval_step, learning_rate):
    self.init = init
    self.train_step = train_step
    self.eval_step = eval_step
    self.learning_rate = learning_rate


def make_linear_eval_fns(embed: EmbedFn, num_classes: int,
                         lrs: Sequence[float], schedule_steps: int,
                         momentum: float = 0.9,
                         axis_name: Optional[str] = 'i') -> LinearEvalFns:
  """The train/eval steps of one linear head per peak learning rate in `lrs`.

  Each head is plain SGD with Nesterov momentum on the mean cross-entropy,
  learning rate lr * cosine(step / schedule_steps), no weight decay. The heads
  are vmapped over (head, optimizer state, lr): they share the frozen
  features of each batch and nothing else.

  Args:
    embed: the frozen encoder, `embed(params, state, images)`.
    num_classes: number of classes.
    lrs: peak learning rates (already scaled by batch/256).
    schedule_steps: length of the cosine decay.
    momentum: Nesterov momentum.
    axis_name: the pmap axis over which gradients and counts are averaged /
      summed; None when the steps run on one device (under jit).
  """
  lrs = jnp.asarray(lrs, jnp.float32)
  schedule = optax.cosine_decay_schedule(1.0, schedule_steps)
  # SGD with a unit peak rate: the head's own lr multiplies its update, which
  # is what optax.sgd(lr * schedule) does (the rate is applied after momentum).
  optimizer = optax.chain(optax.trace(decay=momentum, nesterov=True),
                          optax.scale_by_schedule(lambda c: -schedule(c)))

  def init(dim):
    head = {'w': jnp.zeros((dim, num_classes), jnp.float32),
            'b': jnp.zeros((num_classes,), jnp.float32)}
    heads = jax.tree.map(lambda x: jnp.broadcast_to(x, lrs.shape + x.shape),
                         head)
    return heads, jax.vmap(optimizer.init)(heads)

  def logits_fn(head, features):
    return features @ head['w'] + head['b']

  def head_update(head, opt_state, lr, features, labels):
    def loss_fn(head):
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          logits_fn(head, features), labels))
    loss, grads = jax.value_and_grad(loss_fn)(head)
    if axis_name is not None:
      loss, grads = jax.lax.pmean((loss, grads), axis_name)
    updates, opt_state = optimizer.update(grads, opt_state, head)
    updates = jax.tree.map(lambda u: lr * u, updates)
    return optax.apply_updates(head, updates), opt_state, loss

  def train_step(heads, opt_state, params, state, images, labels):
    # The encoder is frozen: no gradient reaches it (and none is computed).
    features = jax.lax.stop_gradient(embed(params, state, images))
    return jax.vmap(head_update, in_axes=(0, 0, 0, None, None))(
        heads, opt_state, lrs, features, labels)

  def eval_step(heads, params, state, images, labels, mask):
    features = embed(params, state, images)
    logits = jax.vmap(logits_fn, in_axes=(0, None))(heads, features)
    top = jax.lax.top_k(logits, min(5, num_classes))[1]  # [H, B, k]
    hit1 = jnp.sum((top[..., 0] == labels) * mask, -1)
    hit5 = jnp.sum(jnp.any(top == labels[None, :, None], -1) * mask, -1)
    out = (hit1, hit5, jnp.sum(mask))
    if axis_name is not None:
      out = jax.lax.psum(out, axis_name)
    return out

  def learning_rate(step):
    return lrs * schedule(step)

  return LinearEvalFns(init, train_step, eval_step, learning_rate)


def _resolve_data(config, pretrain_config):
  """(dataset, image size, data_dir) of the evaluation."""
  dataset = config.data.dataset or pretrain_config.data.dataset
  image_size = (config.data.image_size if config.data.image_size > 0 else
                pretrain_config.data.image_size)
  data_dir = config.data.data_dir or pretrain_config.data.data_dir or None
  return dataset, image_size, data_dir


def linear_eval(config: ml_collections.ConfigDict, pretrain_config, params,
                state, *, printer=print,
                metrics: Optional[Callable[[Dict[str, Any]], None]] = None
                ) -> Dict[str, Any]:
  """DeepMind's linear protocol with a learning-rate grid; returns results.

  Args:
    config: the evaluation config (configs/eval.py).
    pretrain_config: the pretraining run's config (network, dataset).
    params, state: the frozen encoder's, host arrays.
    printer: progress lines.
    metrics: called with one dict per logged step (step, per-head loss, lr).
  """
  dataset, image_size, data_dir = _resolve_data(config, pretrain_config)
  t = config.training
  n_dev = jax.local_device_count()
  if t.batch_size <= 0 or t.batch_size % jax.device_count():
    raise ConfigError(f'training.batch_size={t.batch_size} is not a positive '
                      f'multiple of the {jax.device_count()} devices')
  if t.log_every_steps <= 0:
    raise ConfigError('training.log_every_steps must be positive, got '
                      f'{t.log_every_steps}')
  per_dev = t.batch_size // jax.device_count()
  train_split = (dataset_lib.Split.TRAIN if t.select_on_valid
                 else dataset_lib.Split.TRAIN_AND_VALID)
  n_train = dataset_lib.num_examples(train_split, dataset)
  steps = (t.max_steps if t.max_steps > 0 else
           max(1, int(t.epochs * n_train // t.batch_size)))
  base_lrs = tuple(t.lr_grid) or (t.base_lr,)
  if any(lr <= 0 for lr in base_lrs):
    raise ConfigError(f'learning rates must be positive, got {base_lrs}')
  lrs = [lr * t.batch_size / 256 for lr in base_lrs]
  num_classes = dataset_lib.num_classes(dataset)
  embed = make_embed_fn(pretrain_config)
  fns = make_linear_eval_fns(embed, num_classes, lrs, steps, t.momentum)
  p_train = jax.pmap(fns.train_step, axis_name='i', donate_argnums=(0, 1))
  p_eval = jax.pmap(fns.eval_step, axis_name='i')
  # The frozen encoder goes to the devices once, not with every batch.
  params_r = devices.replicate(params)
  state_r = devices.replicate(state)
  s = image_size
  dim = jax.eval_shape(embed, params, state,
                       jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)).shape[-1]
  heads, opt_state = fns.init(dim)
  heads_r = devices.replicate(heads)
  opt_r = devices.replicate(opt_state)
  it = dataset_lib.load(
      train_split, preprocess_mode=dataset_lib.PreprocessMode.LINEAR_TRAIN,
      batch_dims=[n_dev, per_dev], dataset=dataset, image_size=image_size,
      data_dir=data_dir, seed=config.seed, deterministic=True)
  printer(f'[linear-eval] {steps} steps of {t.batch_size} images on '
          f'{train_split.name}, {len(lrs)} heads (lr '
          f'{", ".join(f"{lr:g}" for lr in lrs)})')
  t0 = time.time()
  for step in range(steps):
    batch = next(it)
    heads_r, opt_r, loss = p_train(heads_r, opt_r, params_r, state_r,
                                   batch['images'], batch['labels'])
    done = step + 1
    if done % t.log_every_steps == 0 or done == steps:
      loss = np.asarray(loss)[0]
      if not np.all(np.isfinite(loss)):
        printer(f'[linear-eval] warning: non-finite loss of some heads at '
                f'step {done}: {loss}')
      rate = done * t.batch_size / max(time.time() - t0, 1e-9)
      eta = (steps - done) * t.batch_size / max(rate, 1e-9)
      printer(f'[linear-eval] step {done}/{steps}  loss '
              f'{" ".join(f"{l:.4f}" for l in loss)}  {rate:.0f} img/s  '
              f'ETA {experiment_lib.format_duration(eta)}')
      if metrics is not None:
        lr_now = np.asarray(fns.learning_rate(step))
        metrics({'step': done, 'images_per_sec': rate,
                 **{f'loss_lr{lr:g}': float(l) for lr, l in zip(lrs, loss)},
                 **{f'learning_rate_lr{lr:g}': float(x)
                    for lr, x in zip(lrs, lr_now)}})

  def accuracy(split):
    hits1 = hits5 = count = 0
    for batch in dataset_lib.load(
        split, preprocess_mode=dataset_lib.PreprocessMode.EVAL,
        batch_dims=[n_dev, per_dev], dataset=dataset, image_size=image_size,
        data_dir=data_dir):
      h1, h5, c = p_eval(heads_r, params_r, state_r, batch['images'],
                         batch['labels'], batch['mask'].astype(np.float32))
      hits1 = hits1 + np.asarray(h1)[0]
      hits5 = hits5 + np.asarray(h5)[0]
      count += float(np.asarray(c)[0])
    return hits1 / count, hits5 / count, int(count)

  test1, test5, n_test = accuracy(dataset_lib.Split.TEST)
  result = {
      'per_lr_top1': {f'{lr:g}': float(a) for lr, a in zip(lrs, test1)},
      'per_lr_top5': {f'{lr:g}': float(a) for lr, a in zip(lrs, test5)},
      'num_test_examples': n_test,
      'num_train_examples': n_train,
      'steps': steps,
      'train_split': train_split.name,
  }
  if t.select_on_valid:
    valid1, _, n_valid = accuracy(dataset_lib.Split.VALID)
    best = int(np.argmax(valid1))
    result['per_lr_valid_top1'] = {f'{lr:g}': float(a)
                                   for lr, a in zip(lrs, valid1)}
    result['num_valid_examples'] = n_valid
    result['selected_on'] = 'VALID'
  else:
    # DeepMind's default: the best head on the test set, reported as such.
    best = int(np.argmax(test1))
    result['selected_on'] = 'TEST'
  result.update(top1_accuracy=float(test1[best]),
                top5_accuracy=float(test5[best]),
                learning_rate=float(lrs[best]),
                base_learning_rate=float(base_lrs[best]))
  return result


# ---------------------------------------------------------------------------
# The command: evaluate a pretraining workdir.


def output_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where `run` writes: <workdir>/eval_<mode>[_select]."""
  name = f'eval_{config.mode}'
  if config.mode == 'linear' and config.training.select_on_valid:
    name += '_select'
  return os.path.join(workdir, name)


def _write_json(path: str, obj) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(path + '.tmp', path)


def run(config: ml_collections.ConfigDict, workdir: str,
        printer=print) -> Dict[str, Any]:
  """Evaluates the pretraining run in `workdir`; writes `output_dir`.

  Writes config.json (the evaluation config), metrics.jsonl (linear mode)
  and summary.json: top1_accuracy, top5_accuracy and the protocol's details.
  """
  if config.mode not in ('linear', 'fast'):
    raise ConfigError(f'mode must be linear or fast, got {config.mode!r}')
  if config.encoder not in ('online', 'target'):
    raise ConfigError(f'encoder must be online or target, got '
                      f'{config.encoder!r}')
  pretrain_config, params, state, step = load_pretrained(
      workdir, config.checkpoint_step, config.encoder)
  out_dir = output_dir(config, workdir)
  chief = jax.process_index() == 0
  if chief:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  printer(f'[eval] {config.mode} evaluation of the {config.encoder} encoder '
          f'of {workdir}, checkpoint step {step}')
  t0 = time.time()
  if config.mode == 'fast':
    dataset, image_size, data_dir = _resolve_data(config, pretrain_config)
    result = feature_probe(
        make_embed_fn(pretrain_config), params, state, dataset=dataset,
        image_size=image_size, data_dir=data_dir, l2=config.fast.l2,
        iterations=config.fast.iterations, knn_k=config.knn.k,
        knn_temperature=config.knn.temperature,
        batch_size=config.eval_batch_size,
        max_train_examples=config.fast.max_train_examples)
    result['protocol'] = ('L-BFGS logistic regression on cached, '
                          'unaugmented features (not DeepMind\'s protocol)')
  else:
    metrics_file = (open(os.path.join(out_dir, 'metrics.jsonl'), 'w')
                    if chief else None)

    def write_metrics(record):
      if metrics_file is not None:
        metrics_file.write(json.dumps(record) + '\n')
        metrics_file.flush()

    try:
      result = linear_eval(config, pretrain_config, params, state,
                           printer=printer, metrics=write_metrics)
    finally:
      if metrics_file is not None:
        metrics_file.close()
    result['protocol'] = ('SGD Nesterov linear heads on augmented images '
                          '(DeepMind\'s protocol)')
  result.update(mode=config.mode, checkpoint_step=int(step),
                encoder=config.encoder, wall_time_sec=time.time() - t0)
  if chief:
    _write_json(os.path.join(out_dir, 'summary.json'), result)
  printer(f'[eval] top-1 {100 * result["top1_accuracy"]:.2f}%  top-5 '
          f'{100 * result["top5_accuracy"]:.2f}%  -> {out_dir}/summary.json')
  return result


def probe_report(exp: 'experiment_lib.PretrainExperiment', workdir: str,
                 printer=print, max_train_examples: int = -1,
                 max_test_examples: int = -1, initial_state=None,
                 trained_state=None) -> Dict[str, Any]:
  """The fast probe and kNN of the trained and of the initial encoder.

  Both are measured the same way in the same run, so that the gain of
  pretraining can be read off directly (a GroupNorm network at initialisation
  is a much weaker feature extractor than a BatchNorm one). A BatchNorm
  network at initialisation has no meaningful moving averages: they are
  estimated first (`calibrate_batchnorm`). Writes <workdir>/probe.json.

  Args:
    exp: a PretrainExperiment whose `train()` has returned.
    workdir: where probe.json goes.
    printer: output lines.
    max_train_examples, max_test_examples: see `feature_probe`.
    initial_state: the unreplicated initial TrainState (default: rebuilt
      with `exp.initial_state()`).
    trained_state: the unreplicated TrainState to probe as "trained"
      (default: `exp.state`, the end of `exp.train()`).
  """
  c = exp.config
  embed = make_embed_fn(c)
  kw = dict(dataset=c.data.dataset, image_size=c.data.image_size,
            data_dir=c.data.data_dir or None,
            max_train_examples=max_train_examples,
            max_test_examples=max_test_examples)
  trained = trained_state
  if trained is None:
    trained = devices.unreplicate(exp.state)
  if initial_state is None:
    initial_state = devices.unreplicate(exp.initial_state())
  printer('[probe] linear probe + kNN on frozen features (fast protocol)')
  init_net_state = calibrate_batchnorm(
      c, initial_state.online_params, initial_state.online_state,
      batch_size=c.training.batch_size, seed=c.seed)
  results = {
      'trained': feature_probe(embed, trained.online_params,
                               trained.online_state, **kw),
      'init': feature_probe(embed, initial_state.online_params,
                            init_net_state, **kw),
  }
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, 'probe.json'), results)
  printer('')
  printer('| encoder                  | linear top-1 | kNN top-1 |')
  printer('|--------------------------|--------------|-----------|')
  for name, label in (('init', 'at initialisation'),
                      ('trained', f'after {c.method}')):
    r = results[name]
    printer(f'| {label:<24} | {100 * r["top1_accuracy"]:11.2f}% | '
            f'{100 * r["knn_top1_accuracy"]:8.2f}% |')
  return results
