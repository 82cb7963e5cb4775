"""The fast protocol: a logistic-regression probe and kNN on cached features.

Every image is encoded once, without augmentation (centre crop), and a
multinomial logistic regression is fitted by L-BFGS to the standardized,
cached features: deterministic, minutes on a CPU at Fashion-MNIST scale. kNN
on the same features: cosine similarity, the k nearest training examples vote
for their class with weight exp(similarity / temperature) (Wu et al. 2018,
InstDisc). Its numbers are not comparable with the linear protocol's
(`linear.py`). `probe_report` probes a trained and an initial encoder side by
side (`main.py --probe`, the studies).

The cached features are held in host memory and read from this process's
shard only: the protocol is meant for single-process runs.
"""

import functools
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from byol import dataset as dataset_lib
from byol import files
from byol import model
from byol.evaluation import collapse
from byol.evaluation import features
from byol.evaluation import loop
from byol.evaluation.features import EmbedFn


def probe_objective(params, *, xs, one_hot, l2):
  """Mean cross-entropy of `xs @ w + b` + l2/2 * ||w||^2, the probe's loss.

  `one_hot`: [N, classes] booleans, True at each example's label.
  """
  logits = xs @ params['w'] + params['b']
  label_logit = jnp.sum(jnp.where(one_hot, logits, 0.0), axis=-1)
  ce = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - label_logit)
  return ce + 0.5 * l2 * jnp.sum(params['w'] ** 2)


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
  opt = optax.lbfgs()

  # Nothing here may be a large constant that XLA folds at compile time:
  # folding is slow, and on a loaded machine XLA reports it with error-level
  # `slow_operation_alarm` lines in the middle of a run's output. So the data
  # are arguments, not closed over; and the cross-entropy picks the label's
  # logit with a one-hot mask rather than a gather (optax's
  # softmax_cross_entropy_with_integer_labels), whose gradient is a
  # scatter-add of the mean's constant cotangent at a constant index: an
  # f32[N, 1] scatter XLA folds. The mask gives the same values (one
  # non-zero term per row) and a gradient without any scatter.
  @jax.jit
  def fit(params, xs, labels):
    one_hot = labels[:, None] == jnp.arange(num_classes)
    objective = functools.partial(probe_objective, xs=xs, one_hot=one_hot,
                                  l2=l2)

    value_and_grad = optax.value_and_grad_from_state(objective)

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
                'b': jnp.zeros((num_classes,), jnp.float32)}, xs, labels)
  w, b = np.asarray(params['w']), np.asarray(params['b'])

  def predict(features):
    return (((_finite(features) - mean) / std) @ w + b).astype(np.float32)

  return predict


def _finite(x) -> np.ndarray:
  """float64 copy with non-finite entries (a diverged network's) set to 0."""
  x = np.asarray(x, np.float64)
  return np.where(np.isfinite(x), x, 0.0)


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

  # The training features and labels are arguments, not constants: see
  # `fit_logistic_regression`.
  @jax.jit
  def scores(q, train, train_labels):
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
    out.append(np.asarray(scores(jnp.asarray(q), train, train_labels))
               [:chunk - pad])
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
  train_x, train_y = features.extract_features(
      embed, params, state, split=dataset_lib.Split.TRAIN_AND_VALID,
      max_examples=max_train_examples, **kw)
  test_x, test_y = features.extract_features(
      embed, params, state, split=dataset_lib.Split.TEST,
      max_examples=max_test_examples, **kw)
  t1 = time.time()
  num_classes = dataset_lib.num_classes(dataset, data_dir)
  predict = fit_logistic_regression(train_x, train_y, num_classes, l2=l2,
                                    iterations=iterations)
  logits = predict(test_x)
  knn = knn_predict(train_x, train_y, test_x, num_classes, k=knn_k,
                    temperature=knn_temperature)
  return {
      'top1_accuracy': loop.topk_accuracy(logits, test_y, 1),
      'top5_accuracy': loop.topk_accuracy(logits, test_y, 5),
      'train_top1_accuracy': loop.topk_accuracy(predict(train_x), train_y, 1),
      'knn_top1_accuracy': loop.topk_accuracy(knn, test_y, 1),
      'knn_top5_accuracy': loop.topk_accuracy(knn, test_y, 5),
      'feature_dim': int(train_x.shape[1]),
      'nonfinite_features': int(np.sum(~np.isfinite(train_x)) +
                                np.sum(~np.isfinite(test_x))),
      'num_train_examples': int(train_y.shape[0]),
      'num_test_examples': int(test_y.shape[0]),
      'encode_time_sec': t1 - t0,
      'fit_time_sec': time.time() - t1,
  }


class ProbeEvaluator:
  """The fast protocol as an evaluator: `ProbeEvaluator(embed, **cfg).run(...)`.

  Fits on TRAIN_AND_VALID and reports TEST (logistic regression and kNN).
  """

  protocol = ('L-BFGS logistic regression on cached, unaugmented features '
              '(not DeepMind\'s protocol)')

  def __init__(self, embed: EmbedFn, *, dataset: str, image_size: int,
               data_dir: Optional[str] = None, l2: float = 1e-4,
               iterations: int = 300, knn_k: int = 200,
               knn_temperature: float = 0.07, batch_size: int = 1000,
               max_train_examples: int = -1, max_test_examples: int = -1,
               printer: Callable[[str], None] = print):
    self.embed = embed
    self.kwargs = dict(
        dataset=dataset, image_size=image_size, data_dir=data_dir, l2=l2,
        iterations=iterations, knn_k=knn_k, knn_temperature=knn_temperature,
        batch_size=batch_size, max_train_examples=max_train_examples,
        max_test_examples=max_test_examples)
    self.print = printer

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  network: model.Network, *, printer=print,
                  metrics=None) -> 'ProbeEvaluator':
    """The evaluator of an evaluation config (configs/eval.py:fast)."""
    del metrics  # the probe has no training steps to record
    data = loop.resolve_data(config, network.config)
    return cls(
        network.single_device().embed, dataset=data.dataset,
        image_size=data.image_size, data_dir=data.data_dir, l2=config.fast.l2,
        iterations=config.fast.iterations, knn_k=config.knn.k,
        knn_temperature=config.knn.temperature,
        batch_size=config.eval_batch_size,
        max_train_examples=config.fast.max_train_examples, printer=printer)

  def run(self, params, state) -> Dict[str, Any]:
    """Probes the encoder with these parameters and state; returns results."""
    result = feature_probe(self.embed, params, state, **self.kwargs)
    result['protocol'] = self.protocol
    return result


def probe_report(network: model.Network, trained: Tuple[Any, Any],
                 initial: Tuple[Any, Any], workdir: str, *, printer=print,
                 max_train_examples: int = -1, max_test_examples: int = -1
                 ) -> Dict[str, Any]:
  """The fast probe and kNN of the trained and of the initial encoder.

  Both are measured the same way in the same run, so that the gain of
  pretraining can be read off directly (a GroupNorm network at initialisation
  is a much weaker feature extractor than a BatchNorm one). A BatchNorm
  network at initialisation has no meaningful moving averages: they are
  estimated first (`features.calibrate_batchnorm`). Where the pretraining
  config's schedule runs the collapse evaluator, both networks are also
  measured by it (on its fixed batch, the same as metrics.jsonl's, which
  starts after the first steps). Writes <workdir>/probe.json and prints the
  table.

  Args:
    network: the pretrained network (`model.Network` of the run's config).
    trained: (params, state) of the trained online network, host arrays.
    initial: (params, state) of the online network at initialisation.
    workdir: where probe.json goes.
    printer: output lines.
    max_train_examples: see `feature_probe`.
    max_test_examples: see `feature_probe`.
  """
  c = network.config
  probe = ProbeEvaluator(
      network.single_device().embed, dataset=network.dataset,
      image_size=network.image_size, data_dir=network.data_dir,
      max_train_examples=max_train_examples,
      max_test_examples=max_test_examples)
  printer('[probe] linear probe + kNN on frozen features (fast protocol)')
  init_params, init_state = initial
  init_state = features.calibrate_batchnorm(
      network, init_params, init_state, batch_size=c.training.batch_size,
      seed=c.seed)
  results = {'trained': probe.run(*trained),
             'init': probe.run(init_params, init_state)}
  diagnose = any(name == 'collapse' for _, name in c.evaluators.schedule)
  if diagnose:
    measure = collapse.CollapseEvaluator(
        network, batch_size=c.evaluators.collapse.batch_size)
    for name, pair in (('init', initial), ('trained', trained)):
      results[name].update(measure.run(*pair))
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
