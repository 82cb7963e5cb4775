"""Fine-tuning: the encoder and a linear head trained together (DeepMind's `freeze_backbone=False`).

As DeepMind's `eval_experiment` with `freeze_backbone=False`: the encoder's
parameters and a linear head (Haiku's default initialisation) are trained
by the same SGD (Nesterov momentum 0.9, no weight decay, lr = base *
batch/256 with a cosine decay to 0) on the cross-entropy of random-resized-
crop + flip images; BatchNorm runs in training mode (batch statistics, moving
averages updated) while training and in inference mode for evaluation.
Gradients are averaged over devices. One difference: our BatchNorm pools its
batch statistics over all devices, where DeepMind's evaluation BatchNorm uses
each device's own batch (the two agree on one device).

Only the encoder trains: the pretraining heads (projector, predictor, online
classifier) in the same parameter tree are left as they are.
"""

from typing import Any, Callable, Dict, Optional, Tuple

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
from byol.evaluation.linear import init_head, train_split_of

# `encode(params, state, images, is_training) -> (embedding, new state)`, a
# `model.Network`'s `encode`.
EncoderApply = Callable[[hk.Params, hk.State, jax.Array, bool],
                        Tuple[jax.Array, hk.State]]

# Parameters of these top-level modules belong to pretraining, not to the
# encoder: fine-tuning leaves them alone.
HEAD_MODULES = ('projector', 'predictor', 'classifier')


def split_encoder(params) -> tuple:
  """(encoder params, the other params) of a pretraining network's tree."""
  encoder, other = {}, {}
  for module, leaves in params.items():
    (other if module.split('/')[0] in HEAD_MODULES else encoder)[module] = \
        leaves
  return encoder, other


def make_finetune_fns(apply_train: EncoderApply, apply_eval: EncoderApply,
                      lr: float, schedule_steps: int,
                      momentum: float = 0.9,
                      axis_name: Optional[str] = devices.AXIS):
  """(optimizer, train_step, eval_step) of fine-tuning.

  `train_step((encoder, head, opt_state, net_state), frozen, images, labels)
  -> (new carry, loss)`; `eval_step(encoder, head, frozen, net_state,
  images, labels, mask) -> (top-1 hits, top-5 hits, count)`.
  """
  optimizer = optax.sgd(optax.cosine_decay_schedule(lr, schedule_steps),
                        momentum=momentum, nesterov=True)

  def loss_fn(trained, frozen, net_state, images, labels):
    encoder, head = trained
    embedding, net_state = apply_train({**encoder, **frozen}, net_state,
                                       images, True)
    logits = embedding @ head['w'] + head['b']
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, labels))
    return loss, net_state

  def train_step(carry, frozen, images, labels):
    encoder, head, opt_state, net_state = carry
    (loss, net_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        (encoder, head), frozen, net_state, images, labels)
    if axis_name is not None:
      loss, grads = jax.lax.pmean((loss, grads), axis_name)
    updates, opt_state = optimizer.update(grads, opt_state, (encoder, head))
    encoder, head = optax.apply_updates((encoder, head), updates)
    return (encoder, head, opt_state, net_state), loss

  def eval_step(encoder, head, frozen, net_state, images, labels, mask):
    embedding, _ = apply_eval({**encoder, **frozen}, net_state, images, False)
    logits = embedding @ head['w'] + head['b']
    out = (loop.topk_hits(logits, labels, 1, mask),
           loop.topk_hits(logits, labels, 5, mask), jnp.sum(mask))
    if axis_name is not None:
      out = jax.lax.psum(out, axis_name)
    return out

  return optimizer, train_step, eval_step


class FineTuneEvaluator:
  """Fine-tuning: `FineTuneEvaluator(network, **cfg).run(params, state)`.

  Reports the fine-tuned network's TEST accuracy (and VALID accuracy when
  it trained on TRAIN), and how far the encoder moved.
  """

  protocol = ('fine-tuning: encoder and linear head trained by SGD Nesterov '
              '(DeepMind\'s freeze_backbone=False)')

  def __init__(self, network: model.Network, *,
               data: loop.DataSpec, batch_size: int, epochs: float,
               max_steps: int, base_lr: float, momentum: float,
               train_split: dataset_lib.Split, head_init: str,
               log_every_steps: int, seed: int,
               printer: loop.Printer = print,
               metrics: Optional[loop.MetricsFn] = None,
               train_data: Optional[loop.DataSpec] = None):
    if base_lr <= 0:
      raise ConfigError(f'training.base_lr must be positive, got {base_lr}')
    loop.per_device_batch(batch_size)
    init_head(head_init, 1, 1)  # an unknown kind is a ConfigError now
    self.apply_train = model.Network(network.config, devices.AXIS).encode
    self.apply_eval = network.single_device().encode
    self.num_classes = dataset_lib.num_classes(data.dataset, data.data_dir)
    self.data = data
    # What it trains on: `data` (or a subset of it), or another dataset of
    # the same classes (ImageNet's fixed 1% / 10% subsets).
    self.train_data = train_data or data
    self.batch_size = batch_size
    self.base_lr = base_lr
    self.lr = base_lr * batch_size / 256
    self.momentum = momentum
    self.train_split = train_split
    self.head_init = head_init
    t = self.train_data
    self.num_train = (len(t.subset) if t.subset is not None else
                      dataset_lib.num_examples(train_split, t.dataset,
                                               t.data_dir))
    self.steps = experiment.num_steps_for(epochs, max_steps, self.num_train,
                                          batch_size)
    self.log_every_steps = log_every_steps
    self.seed = seed
    self.print = printer
    self.metrics = metrics
    # VALID accuracy too when training on another dataset's split.
    self.report_valid = train_data is not None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  network: model.Network, **kwargs) -> 'FineTuneEvaluator':
    """The evaluator of an evaluation config (configs/eval.py:finetune)."""
    t = config.training
    if len(t.lr_grid) > 1:
      raise ConfigError(
          'fine-tuning trains one learning rate (training.base_lr); run one '
          'fine-tuning per rate on TRAIN and compare them on VALID '
          '(set training.lr_grid=())')
    return cls(
        network, data=loop.resolve_data(config, network.config),
        batch_size=t.batch_size, epochs=t.epochs, max_steps=t.max_steps,
        base_lr=(tuple(t.lr_grid) or (t.base_lr,))[0], momentum=t.momentum,
        train_split=train_split_of(t.train_split), head_init=t.head_init,
        log_every_steps=t.log_every_steps, seed=config.seed, **kwargs)

  def run(self, params, state) -> Dict[str, Any]:
    """Fine-tunes the network with these parameters and state; returns results.

    The returned dict also holds the fine-tuned parameters and state under
    `_params` and `_state` (host arrays; not written to summary.json).
    """
    optimizer, train_step, eval_step = make_finetune_fns(
        self.apply_train, self.apply_eval, self.lr,
        self.steps, self.momentum)
    encoder, frozen = split_encoder(params)
    s = self.data.image_size
    dim = jax.eval_shape(
        lambda p, st: self.apply_eval(p, st, jnp.zeros((1, s, s, 3)), False)
        [0], params, state).shape[-1]
    head = init_head(self.head_init, dim, self.num_classes, self.seed)
    opt_state = optimizer.init((encoder, head))
    carry = devices.replicate((encoder, head, opt_state, state))
    frozen_r = devices.replicate(frozen)
    p_train = jax.pmap(train_step, axis_name=devices.AXIS,
                       donate_argnums=(0,))
    p_eval = jax.pmap(eval_step, axis_name=devices.AXIS)

    def step_fn(carry, batch):
      return p_train(carry, frozen_r, batch['images'], batch['labels'])

    def record(step, loss):
      lr_now = float(optax.cosine_decay_schedule(self.lr, self.steps)(step))
      return {'loss': float(loss[0]), 'learning_rate': lr_now}

    self.print(f'[finetune] {self.steps} steps of {self.batch_size} images on '
               f'{self.train_split.name}, lr {self.lr:g}, head init '
               f'{self.head_init}')
    inputs = loop.train_input(self.train_data, self.train_split,
                              self.batch_size, self.seed)
    carry = loop.run_steps(
        step_fn, carry, inputs, steps=self.steps, batch_size=self.batch_size,
        log_every=self.log_every_steps, tag='finetune', printer=self.print,
        record=record, metrics=self.metrics)
    encoder_r, head_r, _, state_r = carry

    def accuracy(split):
      return loop.count_hits(
          lambda *b: p_eval(encoder_r, head_r, frozen_r, state_r, *b),
          self.data, split, self.batch_size)

    new_encoder = devices.unreplicate(encoder_r)
    result = {'num_train_examples': self.num_train, 'steps': self.steps,
              'train_split': self.train_split.name,
              'head_init': self.head_init, 'learning_rate': self.lr,
              'base_learning_rate': self.base_lr, 'protocol': self.protocol,
              'encoder_relative_change': _relative_change(encoder,
                                                          new_encoder)}
    if self.train_split == dataset_lib.Split.TRAIN or self.report_valid:
      valid1, _, n_valid = accuracy(dataset_lib.Split.VALID)
      result.update(valid_top1_accuracy=float(valid1),
                    num_valid_examples=n_valid)
    test1, test5, n_test = accuracy(dataset_lib.Split.TEST)
    result.update(top1_accuracy=float(test1), top5_accuracy=float(test5),
                  num_test_examples=n_test,
                  _params={**new_encoder, **frozen},
                  _state=devices.unreplicate(state_r))
    return result


def _relative_change(before, after) -> float:
  """||after - before|| / ||before|| over all leaves."""
  diff = sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
             for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
  norm = sum(float(np.sum(np.asarray(b) ** 2)) for b in jax.tree.leaves(before))
  return float(np.sqrt(diff / max(norm, 1e-30)))
