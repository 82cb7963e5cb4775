"""Linear evaluation: SGD linear heads on a frozen encoder (DeepMind's protocol).

A linear head is trained by SGD with Nesterov momentum 0.9, no weight decay,
learning rate base * batch/256 with a cosine decay to 0, on random-resized-crop
+ flip images passed through the frozen encoder (BatchNorm in inference mode);
evaluation images are centre-cropped. One head per learning rate of a grid is
trained side by side on the same features: the heads are `jax.vmap`ped, so
head h computes exactly what a one-head run with that learning rate computes,
and a grid costs one encoder pass per batch.
"""

from typing import Any, Dict, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from byol import dataset as dataset_lib
from byol import devices
from byol import experiment
from byol import model
from byol.errors import ConfigError
from byol.evaluation import loop
from byol.evaluation.features import EmbedFn


HEAD_INITS = ('zeros', 'haiku')


def init_head(kind: str, dim: int, num_classes: int,
              seed: int = 0) -> Dict[str, jax.Array]:
  """A linear head {'w': [dim, classes], 'b': [classes]}.

  `zeros`: all zero (deterministic; the first step is the same for any
  seed). `haiku`: what `hk.Linear` draws by default, as DeepMind's
  evaluation head: w from a normal of std 1/sqrt(dim) truncated at two
  standard deviations, b = 0; drawn by Haiku itself from PRNGKey(seed).
  """
  if kind not in HEAD_INITS:
    raise ConfigError(f'training.head_init must be one of '
                      f'{", ".join(HEAD_INITS)}, got {kind!r}')
  if kind == 'zeros':
    return {'w': jnp.zeros((dim, num_classes), jnp.float32),
            'b': jnp.zeros((num_classes,), jnp.float32)}
  linear = hk.without_apply_rng(hk.transform(
      lambda x: hk.Linear(num_classes, name='head')(x)))
  params = linear.init(jax.random.PRNGKey(seed), jnp.zeros((1, dim)))
  return dict(params['head'])


class LinearEvalFns:
  """Pure functions of the lr-grid linear evaluation (see make_linear_eval_fns).

  Attributes:
    init: `init(dim) -> (heads, opt_state)`; every leaf has a leading head
      axis of length len(lrs); every head starts from the same weights
      (`init_head`).
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
                         axis_name: Optional[str] = devices.AXIS,
                         head_init: str = 'zeros',
                         seed: int = 0) -> LinearEvalFns:
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
    head_init: `zeros` or `haiku` (see `init_head`).
    seed: the key of the `haiku` initialisation.
  """
  lrs = jnp.asarray(lrs, jnp.float32)
  schedule = optax.cosine_decay_schedule(1.0, schedule_steps)
  # SGD with a unit peak rate: the head's own lr multiplies its update, which
  # is what optax.sgd(lr * schedule) does (the rate is applied after momentum).
  optimizer = optax.chain(optax.trace(decay=momentum, nesterov=True),
                          optax.scale_by_schedule(lambda c: -schedule(c)))

  def init(dim):
    head = init_head(head_init, dim, num_classes, seed)
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
    out = (loop.topk_hits(logits, labels, 1, mask),  # [H]
           loop.topk_hits(logits, labels, 5, mask), jnp.sum(mask))
    if axis_name is not None:
      out = jax.lax.psum(out, axis_name)
    return out

  def learning_rate(step):
    return lrs * schedule(step)

  return LinearEvalFns(init, train_step, eval_step, learning_rate)


def train_split_of(name: str) -> dataset_lib.Split:
  """`TRAIN` or `TRAIN_AND_VALID` as a Split; `ConfigError` otherwise."""
  allowed = (dataset_lib.Split.TRAIN, dataset_lib.Split.TRAIN_AND_VALID)
  for split in allowed:
    if split.name == name:
      return split
  raise ConfigError(f'training.train_split must be TRAIN or TRAIN_AND_VALID, '
                    f'got {name!r}')


def check_protocol(base_lrs: Sequence[float],
                   train_split: dataset_lib.Split) -> None:
  """A grid needs VALID to choose on, so it must train on TRAIN."""
  if not base_lrs or any(lr <= 0 for lr in base_lrs):
    raise ConfigError(f'learning rates must be positive, got '
                      f'{tuple(base_lrs)}')
  if len(base_lrs) > 1 and train_split != dataset_lib.Split.TRAIN:
    raise ConfigError(
        f'a grid of {len(base_lrs)} learning rates is chosen on VALID, so it '
        f'must train on TRAIN, not {train_split.name} (nothing is selected '
        'on TEST); set training.train_split=TRAIN or training.lr_grid=()')


class LinearEvaluator:
  """The linear protocol: `LinearEvaluator(embed, **cfg).run(params, state)`.

  Trains one head per learning rate on `train_split`. With several rates
  (on TRAIN) the head best on VALID is chosen and its TEST accuracy
  reported; with one rate that head's TEST accuracy is reported (and its
  VALID accuracy when it trained on TRAIN). Nothing is selected on TEST;
  every head's TEST accuracy is listed under `per_lr_test_top1` for the
  record only.
  """

  protocol = ('SGD Nesterov linear heads on augmented images, frozen '
              'encoder (DeepMind\'s protocol)')

  def __init__(self, embed: EmbedFn, *, num_classes: int,
               data: loop.DataSpec, batch_size: int, epochs: float,
               max_steps: int, base_lrs: Sequence[float], momentum: float,
               train_split: dataset_lib.Split, head_init: str,
               log_every_steps: int, seed: int,
               printer: loop.Printer = print,
               metrics: Optional[loop.MetricsFn] = None):
    check_protocol(base_lrs, train_split)
    if head_init not in HEAD_INITS:
      init_head(head_init, 1, 1)  # raises the ConfigError
    loop.per_device_batch(batch_size)
    self.embed = embed
    self.num_classes = num_classes
    self.data = data
    self.batch_size = batch_size
    self.base_lrs = tuple(base_lrs)
    self.lrs = [lr * batch_size / 256 for lr in self.base_lrs]
    self.momentum = momentum
    self.train_split = train_split
    self.head_init = head_init
    self.num_train = (len(data.subset) if data.subset is not None else
                      dataset_lib.num_examples(train_split, data.dataset,
                                               data.data_dir))
    self.steps = experiment.num_steps_for(epochs, max_steps, self.num_train,
                                          batch_size)
    self.log_every_steps = log_every_steps
    self.seed = seed
    self.print = printer
    self.metrics = metrics

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  network: model.Network, **kwargs) -> 'LinearEvaluator':
    """The evaluator of an evaluation config (configs/eval.py) for `network`."""
    t = config.training
    data = loop.resolve_data(config, network.config)
    return cls(
        network.single_device().embed,
        num_classes=dataset_lib.num_classes(data.dataset, data.data_dir),
        data=data,
        batch_size=t.batch_size, epochs=t.epochs, max_steps=t.max_steps,
        base_lrs=tuple(t.lr_grid) or (t.base_lr,), momentum=t.momentum,
        train_split=train_split_of(t.train_split), head_init=t.head_init,
        log_every_steps=t.log_every_steps, seed=config.seed, **kwargs)

  def run(self, params, state) -> Dict[str, Any]:
    """Trains the heads on the encoder with these parameters; returns results."""
    fns = make_linear_eval_fns(self.embed, self.num_classes, self.lrs,
                               self.steps, self.momentum,
                               head_init=self.head_init, seed=self.seed)
    p_train = jax.pmap(fns.train_step, axis_name=devices.AXIS,
                       donate_argnums=(0, 1))
    p_eval = jax.pmap(fns.eval_step, axis_name=devices.AXIS)
    # The frozen encoder goes to the devices once, not with every batch.
    params_r = devices.replicate(params)
    state_r = devices.replicate(state)
    s = self.data.image_size
    dim = jax.eval_shape(self.embed, params, state, jax.ShapeDtypeStruct(
        (1, s, s, 3), jnp.float32)).shape[-1]
    heads, opt_state = fns.init(dim)
    carry = (devices.replicate(heads), devices.replicate(opt_state))

    def step_fn(carry, batch):
      heads, opt, loss = p_train(*carry, params_r, state_r, batch['images'],
                                 batch['labels'])
      return (heads, opt), loss

    def record(step, loss):
      lr_now = np.asarray(fns.learning_rate(step))
      return {**{f'loss_lr{lr:g}': float(l) for lr, l in zip(self.lrs, loss)},
              **{f'learning_rate_lr{lr:g}': float(x)
                 for lr, x in zip(self.lrs, lr_now)}}

    self.print(f'[linear-eval] {self.steps} steps of {self.batch_size} images '
               f'on {self.train_split.name}, {len(self.lrs)} heads (lr '
               f'{", ".join(f"{lr:g}" for lr in self.lrs)}), head init '
               f'{self.head_init}')
    inputs = loop.train_input(self.data, self.train_split, self.batch_size,
                              self.seed)
    heads_r, _ = loop.run_steps(
        step_fn, carry, inputs, steps=self.steps, batch_size=self.batch_size,
        log_every=self.log_every_steps, tag='linear-eval', printer=self.print,
        record=record, metrics=self.metrics)

    def accuracy(split):
      return loop.count_hits(
          lambda *b: p_eval(heads_r, params_r, state_r, *b), self.data,
          split, self.batch_size)

    return self.report(accuracy)

  def report(self, accuracy) -> Dict[str, Any]:
    """The results, from `accuracy(split) -> (top1 [H], top5 [H], count)`.

    The reported head is chosen on VALID (several rates) or is the only one;
    TEST only measures it.
    """
    lrs = self.lrs
    result = {'num_train_examples': self.num_train, 'steps': self.steps,
              'train_split': self.train_split.name,
              'head_init': self.head_init, 'protocol': self.protocol}
    best = 0
    if self.train_split == dataset_lib.Split.TRAIN:
      valid1, _, n_valid = accuracy(dataset_lib.Split.VALID)
      best = int(np.argmax(valid1))
      result['per_lr_valid_top1'] = {f'{lr:g}': float(a)
                                     for lr, a in zip(lrs, valid1)}
      result['num_valid_examples'] = n_valid
      result['valid_top1_accuracy'] = float(valid1[best])
    result['selected_on'] = 'VALID' if len(lrs) > 1 else 'none (one rate)'
    test1, test5, n_test = accuracy(dataset_lib.Split.TEST)
    result.update(
        top1_accuracy=float(test1[best]), top5_accuracy=float(test5[best]),
        learning_rate=float(lrs[best]),
        base_learning_rate=float(self.base_lrs[best]),
        num_test_examples=n_test,
        # For the record only: choosing among these would select on TEST.
        per_lr_test_top1={f'{lr:g}': float(a) for lr, a in zip(lrs, test1)},
        per_lr_test_top5={f'{lr:g}': float(a) for lr, a in zip(lrs, test5)})
    return result
