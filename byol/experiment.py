"""BYOL and SimCLR pretraining: the network, the pure update step, the experiment.

In reading order: config checks; the network (`make_forward`: encoder,
projector, predictor and online classifier, each built from its config
sub-dict); the update step (`make_update_fn`), a pure function of
(state, inputs, rng) run under `jax.pmap(axis_name='i')` and written as
named parts -- `loss_fn`, `views_forward`, `example_keys`, `micro_step`,
`accumulate_gradients`, `ema`; the initial state; and `PretrainExperiment`,
which holds the replicated state and initialises, restores, advances and
saves it. The loop that drives it, and everything it writes besides
checkpoints, is `byol/train_loop.py`.

Past 500 lines on purpose: these parts are one computation, read top to
bottom; splitting the update step from the network it differentiates or from
the state it advances would send a reader across files for one idea.
"""

import functools
import hashlib
import os
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional

import haiku as hk
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from byol import augmentations
from byol import bn_init
from byol import checkpointing
from byol import dataset as dataset_lib
from byol import devices
from byol import diagnostics
from byol import inference
from byol import losses
from byol import networks
from byol import optimizers
from byol import schedules
from byol.errors import ConfigError
# Re-exported for byol/eval_experiment.py, which formats its progress lines
# with it; it lives with the loop's progress line.
from byol.train_loop import format_duration  # pylint: disable=unused-import

AXIS = devices.AXIS


class TrainState(NamedTuple):
  """Everything that changes during pretraining; replicated over devices."""
  step: jax.Array
  online_params: hk.Params
  target_params: hk.Params
  online_state: hk.State
  target_state: hk.State
  opt_state: optax.OptState




def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` for field values no run could use.

  The model's own fields (norms, groups, sizes, widths, dtype) are checked by
  the networks' constructors, when `check_model` builds them shape-only.
  """
  if config.method not in ('byol', 'simclr'):
    raise ConfigError(f'method must be byol or simclr, got {config.method!r}')
  if config.model.init not in ('default', 'bn_init'):
    raise ConfigError(f'model.init must be default or bn_init, got '
                      f'{config.model.init!r}')
  t = config.training
  for field in ('batch_size', 'accumulation_steps', 'log_every_steps',
                'checkpoint_every_steps', 'keep_checkpoints'):
    if t[field] <= 0:
      raise ConfigError(f'training.{field} must be positive, got {t[field]}')
  if t.epochs <= 0 and t.max_steps <= 0:
    raise ConfigError('set training.epochs or training.max_steps to a '
                      'positive number')
  if config.data.image_size < 8:
    raise ConfigError(f'data.image_size must be at least 8, got '
                      f'{config.data.image_size}')
  if t.temperature <= 0:
    raise ConfigError(f'training.temperature must be positive, got '
                      f'{t.temperature}')
  if not 0.0 <= t.tau_base <= 1.0:
    raise ConfigError(f'training.tau_base must be in [0, 1], got '
                      f'{t.tau_base}')
  if config.data.dataset not in dataset_lib.DATASETS:
    raise ConfigError(f'data.dataset={config.data.dataset!r} is not one of '
                      f'{", ".join(dataset_lib.DATASETS)}')


def per_device_batch(config: ml_collections.ConfigDict,
                     num_devices: int) -> int:
  """Micro-batch per device; raises `ConfigError` when it does not divide."""
  global_batch = config.training.batch_size
  accum = config.training.accumulation_steps
  if global_batch % (num_devices * accum):
    raise ConfigError(
        f'training.batch_size={global_batch} is not divisible by '
        f'{num_devices} devices x {accum} accumulation steps')
  return global_batch // (num_devices * accum)


def num_steps(config: ml_collections.ConfigDict) -> int:
  if config.training.max_steps > 0:
    return int(config.training.max_steps)
  examples = dataset_lib.num_examples(dataset_lib.Split.TRAIN_AND_VALID,
                                      config.data.dataset)
  return max(1, int(config.training.epochs * examples
                    // config.training.batch_size))


def warmup_steps(config: ml_collections.ConfigDict) -> int:
  examples = dataset_lib.num_examples(dataset_lib.Split.TRAIN_AND_VALID,
                                      config.data.dataset)
  return int(config.training.warmup_epochs * examples
             // config.training.batch_size)




def build_component(config: ml_collections.ConfigDict, part: str,
                    constructor: Callable[..., hk.Module],
                    axis_name: Optional[str], **kwargs) -> hk.Module:
  """`constructor(**config.model[part], <shared model fields>, **kwargs)`.

  The component's config sub-dict goes straight into its constructor, with
  the fields every component shares (BatchNorm decay, epsilons, compute
  dtype) and the cross-replica axis. A `ValueError` of the constructor (an
  unknown norm, a non-positive size, ...) comes back prefixed with the
  config path, `model.<part>: ...`. Call inside a Haiku transform.
  """
  m = config.model
  try:
    return constructor(**m[part], bn_decay=m.bn_decay, bn_eps=m.bn_eps,
                       gn_eps=m.gn_eps, ws_eps=m.ws_eps, dtype=m.dtype,
                       cross_replica_axis=axis_name, **kwargs)
  except ValueError as e:
    # A head's module is named after its part: 'projector: ...' reads
    # 'model.projector: ...', not 'model.projector: projector: ...'.
    message = str(e)
    if message.startswith(f'{part}: '):
      message = message[len(part) + 2:]
    raise ValueError(f'model.{part}: {message}') from None


def make_encoder(config: ml_collections.ConfigDict,
                 axis_name: Optional[str] = None) -> hk.Module:
  """The encoder of `config.model.encoder`; call inside a Haiku transform."""
  return build_component(config, 'encoder', networks.resnet, axis_name)


def network_config(config: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """The config of the network that is trained.

  Under the BN-init protocol the BatchNorm layers exist only for the one
  initialisation pass; the trained network has `affine` layers instead.
  """
  if config.model.init == 'bn_init':
    return bn_init.affine_config(config)
  return config


def batch_independent(config: ml_collections.ConfigDict) -> bool:
  """True when no component of the trained network uses batch statistics."""
  config = network_config(config)
  return all(config.model[p].norm != 'bn'
             for p in ('encoder', 'projector', 'predictor'))


def make_forward(config: ml_collections.ConfigDict, num_classes: int,
                 axis_name: Optional[str] = AXIS) -> hk.TransformedWithState:
  """Online/target network: encoder -> projector (-> predictor) + classifier.

  Returns a transform whose apply maps (images, is_training) to a dict with
  `embedding`, `projection`, `prediction` (BYOL only) and `logits`.
  """
  config = network_config(config)

  def forward(images, is_training):
    embedding = make_encoder(config, axis_name)(images, is_training)
    projection = build_component(config, 'projector', networks.MLP, axis_name,
                                 name='projector')(embedding, is_training)
    out = dict(embedding=embedding, projection=projection)
    if config.method == 'byol':
      out['prediction'] = build_component(
          config, 'predictor', networks.MLP, axis_name,
          name='predictor')(projection, is_training)
    # The online classifier only measures the representation: it must not
    # shape it, hence the stop_gradient on its input.
    out['logits'] = hk.Linear(num_classes, name='classifier')(
        jax.lax.stop_gradient(embedding))
    return out

  return hk.transform_with_state(forward)


def augmented_batch(config: ml_collections.ConfigDict, batch_size: int, *,
                    data_seed: int, rng: jax.Array, **load_kwargs) -> np.ndarray:
  """One pretraining batch as the network sees it: view 1, augmented, normalised.

  The first batch of the deterministic pretraining stream of `data_seed`,
  through the on-device augmentations of view 1 (keys from `rng`) and the
  dataset's normalization. For one-off passes outside the training loop: the
  BN-init statistics, proj_std at initialisation.

  Args:
    config: the pretraining config (dataset, image size, augmentations).
    batch_size: examples in the batch.
    data_seed: seed of the input stream (crops and order).
    rng: augmentation key.
    **load_kwargs: more `dataset.load` arguments (e.g. process_index).

  Returns:
    Images [batch_size, H, W, 3], float32.
  """
  c = config
  batch = next(dataset_lib.load(
      dataset_lib.Split.TRAIN_AND_VALID,
      preprocess_mode=dataset_lib.PreprocessMode.PRETRAIN,
      batch_dims=[batch_size], dataset=c.data.dataset,
      image_size=c.data.image_size, data_dir=c.data.data_dir or None,
      seed=data_seed, deterministic=True, **load_kwargs))
  views = jax.jit(lambda b, r: augmentations.postprocess(
      b, r, c.data.augmentations))(batch, rng)
  return np.asarray(dataset_lib.normalize(views['view1'],
                                          dataset=c.data.dataset))


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   warmup: int) -> optax.GradientTransformation:
  """LARS with the run's schedule, masks and per-component rate multiplier."""
  t = config.training
  lr = schedules.learning_rate_schedule(
      base_lr=t.base_lr, batch_size=t.batch_size, total_steps=total_steps,
      warmup_steps=warmup)
  dm_rule = optimizers.exclude_bias_and_norm
  optimizer = optimizers.lars(
      lr, weight_decay=t.weight_decay, eta=t.lars_eta, momentum=t.momentum,
      weight_decay_mask_fn=(optimizers.include_all
                            if t.weight_decay_on_norm_and_bias else dm_rule),
      trust_ratio_mask_fn=(optimizers.include_all
                           if t.trust_ratio_on_norm_and_bias else dm_rule))
  if t.predictor_lr_multiplier != 1.0:
    optimizer = optax.chain(optimizer, optimizers.scale_where(
        t.predictor_lr_multiplier, lambda path: "'predictor/" in path))
  return optimizer




def views_forward(forward: hk.TransformedWithState, params, state, rng,
                  view1, view2, *, one_pass: bool):
  """Both views through the network: (out1, out2, new state).

  With `one_pass` (no batch statistics anywhere) the two views go through as
  one batch of 2B, which is cheaper and gives the same outputs.
  """
  if one_pass:
    both = jnp.concatenate([view1, view2], axis=0)
    out, state = forward.apply(params, state, rng, both, True)
    n = view1.shape[0]
    out1 = jax.tree.map(lambda x: x[:n], out)
    out2 = jax.tree.map(lambda x: x[n:], out)
  else:
    # BatchNorm: each view keeps its own batch statistics, as in BYOL.
    out1, state = forward.apply(params, state, rng, view1, True)
    out2, state = forward.apply(params, state, rng, view2, True)
  return out1, out2, state


def loss_fn(online_params, online_state, target_params, target_state, rng,
            inputs, *, forward: hk.TransformedWithState,
            config: ml_collections.ConfigDict, axis_name: Optional[str]):
  """The loss of one (micro-)batch of augmented, normalised views.

  Returns:
    (loss, (online_state, target_state, logs)); differentiate with respect to
    `online_params`. The loss is the representation loss (BYOL's regression
    or SimCLR's NT-Xent) plus the online classifier's cross-entropy.
  """
  view1, view2 = inputs['view1'], inputs['view2']
  labels = inputs['labels']
  one_pass = batch_independent(config)
  out1, out2, online_state = views_forward(
      forward, online_params, online_state, rng, view1, view2,
      one_pass=one_pass)
  if config.method == 'byol':
    t1, t2, target_state = views_forward(
        forward, target_params, target_state, rng, view1, view2,
        one_pass=one_pass)
    # losses.byol_loss stops the gradient into the target projections.
    repr_loss = losses.byol_loss(out1['prediction'], out2['prediction'],
                                 t1['projection'], t2['projection'])
  else:
    repr_loss = losses.nt_xent(out1['projection'], out2['projection'],
                               temperature=config.training.temperature,
                               axis_name=axis_name)
  logits = out1['logits'].astype(jnp.float32)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1])
  classif_loss = jnp.mean(optax.softmax_cross_entropy(logits, one_hot))
  top1 = jnp.mean(jnp.argmax(logits, -1) == labels)
  loss = repr_loss + classif_loss
  logs = dict(loss=loss, repr_loss=repr_loss, classif_loss=classif_loss,
              top1_accuracy=top1,
              proj_std=diagnostics.proj_std(out1['projection'], axis_name))
  return loss, (online_state, target_state, logs)


def example_keys(rng, micro, per_device: int, *, accum: int,
                 axis_name: Optional[str]):
  """One augmentation key per example of this device's micro-batch `micro`.

  Example keys are `fold_in(rng, g)`, g the example's index in the step's
  global batch laid out as [devices (of all processes), micro-batches,
  per-device batch] -- the layout in which the host feeds it. An example's
  augmentations therefore depend only on the step's key and its place in
  the global batch: splitting the same global batch over 1 or 4 devices, 1
  or 2 processes, or k micro-batches gives the same views.
  """
  device = 0 if axis_name is None else jax.lax.axis_index(axis_name)
  first = (device * accum + micro) * per_device
  index = first + jnp.arange(per_device, dtype=jnp.int32)
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)


def micro_step(carry, xs, *, grad_fn: Callable, config, normalize: Callable,
               axis_name: Optional[str]):
  """One micro-batch: augment, normalise, add its gradient to the sum.

  A `lax.scan` body: carry = (online_state, target_state, grads_sum,
  online_params, target_params), xs = (inputs, micro-batch index, rng).
  """
  online_state, target_state, grads_sum, params, target_params = carry
  inputs, micro, rng = xs
  aug_rng, fwd_rng = jax.random.split(rng)
  keys = example_keys(aug_rng, micro, inputs['view1'].shape[0],
                      accum=config.training.accumulation_steps,
                      axis_name=axis_name)
  fwd_rng = jax.random.fold_in(fwd_rng, micro)
  inputs = augmentations.postprocess(inputs, keys, config.data.augmentations)
  inputs = dict(inputs, view1=normalize(inputs['view1']),
                view2=normalize(inputs['view2']))
  grads, (online_state, target_state, logs) = grad_fn(
      params, online_state, target_params, target_state, fwd_rng, inputs)
  grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
  return (online_state, target_state, grads_sum, params,
          target_params), logs


def accumulate_gradients(state: 'TrainState', inputs, rng, *, step_fn,
                         accum: int):
  """Runs `step_fn` (a bound `micro_step`) over the k micro-batches.

  Returns:
    (mean gradient, online_state, target_state, logs averaged over the
    micro-batches), all still local to this device.
  """
  zeros = jax.tree.map(jnp.zeros_like, state.online_params)
  carry = (state.online_state, state.target_state, zeros,
           state.online_params, state.target_params)
  if accum == 1:
    carry, logs = step_fn(carry, (jax.tree.map(lambda x: x[0], inputs), 0,
                                  rng))
  else:
    micro = jnp.arange(accum, dtype=jnp.int32)
    carry, logs = jax.lax.scan(
        lambda c, xs: step_fn(c, xs + (rng,)), carry, (inputs, micro))
    logs = jax.tree.map(jnp.mean, logs)
  online_state, target_state, grads, _, _ = carry
  grads = jax.tree.map(lambda g: g / accum, grads)
  return grads, online_state, target_state, logs


def ema(target_params, online_params, tau):
  """target <- tau * target + (1 - tau) * online, leaf by leaf."""
  return jax.tree.map(lambda t, o: t + (1.0 - tau) * (o - t),
                      target_params, online_params)


def make_update_fn(config: ml_collections.ConfigDict,
                   forward: hk.TransformedWithState,
                   optimizer: optax.GradientTransformation,
                   total_steps: int,
                   axis_name: Optional[str] = AXIS,
                   normalize: Optional[Callable] = None):
  """Returns `update(state, inputs, rng) -> (state, scalars)`.

  `inputs` holds `view1`, `view2`, `labels` with a leading micro-batch axis
  of length `training.accumulation_steps`. Run it under `jax.pmap` with
  `axis_name` (or with `axis_name=None` on one device, under `jax.jit`).
  `rng` must be the same on every device (see `example_keys`).

  Gradient accumulation: the k micro-batches run one after another
  (`lax.scan`) and their gradients are averaged before the single optimizer
  and EMA step. Without batch statistics (GN, LN, affine, none; WS or not)
  that is the update of the whole batch, up to float rounding. Under
  BatchNorm it is not: each micro-batch is normalised with its own
  statistics, over batch/k examples (pooled over devices by the cross-replica
  axis), and the BN moving averages advance once per micro-batch (and view);
  SimCLR's negatives likewise come from the micro-batch only.
  """
  t = config.training
  if normalize is None:
    normalize = functools.partial(dataset_lib.normalize,
                                  dataset=config.data.dataset)
  grad_fn = jax.grad(functools.partial(loss_fn, forward=forward,
                                       config=config, axis_name=axis_name),
                     has_aux=True)
  step_fn = functools.partial(micro_step, grad_fn=grad_fn, config=config,
                              normalize=normalize, axis_name=axis_name)

  def update(state: TrainState, inputs, rng):
    # `rng` is the same on every device: per-example keys (example_keys) make
    # the augmentations differ between examples, and so between devices.
    grads, online_state, target_state, logs = accumulate_gradients(
        state, inputs, rng, step_fn=step_fn, accum=t.accumulation_steps)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      logs = jax.lax.pmean(logs, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.online_params)
    online_params = optax.apply_updates(state.online_params, updates)
    tau = schedules.target_ema(state.step, base_ema=t.tau_base,
                               total_steps=total_steps)
    target_params = state.target_params
    if config.method == 'byol':
      target_params = ema(state.target_params, online_params, tau)
    logs['tau'] = tau
    # Checked on the host with the loss: a step can turn finite parameters
    # into non-finite ones while its own loss (computed before it) is finite.
    logs['param_norm'] = optax.tree.norm(online_params)
    logs['learning_rate'] = schedules.learning_rate(
        state.step, base_lr=t.base_lr, batch_size=t.batch_size,
        total_steps=total_steps, warmup_steps=warmup_steps(config))
    new_state = TrainState(
        step=state.step + 1, online_params=online_params,
        target_params=target_params, online_state=online_state,
        target_state=target_state, opt_state=opt_state)
    return new_state, logs

  return update


def make_init_fn(config: ml_collections.ConfigDict,
                 forward: hk.TransformedWithState,
                 optimizer: optax.GradientTransformation):
  """Returns `init(rng, images) -> TrainState`.

  Under the BN-init protocol `images` must be a real, augmented, normalized
  batch (the same on every device, so that replicas agree); otherwise only
  its shape matters.
  """
  num_classes = dataset_lib.num_classes(config.data.dataset)

  def init_network(rng, images):
    if config.model.init == 'bn_init':
      return bn_init.bn_initialised_params(
          config, lambda c: make_forward(c, num_classes, axis_name=None),
          rng, images)
    return forward.init(rng, images, True)

  def init(rng, images):
    online_rng, target_rng = jax.random.split(rng)
    # Different keys for online and target, as DeepMind's BYOL: the target
    # starts as an independent network and becomes an average of the online.
    online_params, online_state = init_network(online_rng, images)
    if config.method == 'byol':
      target_params, target_state = init_network(target_rng, images)
    else:
      target_params, target_state = {}, {}
    return TrainState(
        step=jnp.zeros([], jnp.int32), online_params=online_params,
        target_params=target_params, online_state=online_state,
        target_state=target_state, opt_state=optimizer.init(online_params))

  return init


def state_template(config: ml_collections.ConfigDict) -> TrainState:
  """Host-side zeros shaped like the training state, for restoring."""
  num_classes = dataset_lib.num_classes(config.data.dataset)
  forward = make_forward(config, num_classes, axis_name=None)
  # The optimizer's state has the same structure whatever the schedule.
  init = make_init_fn(config, forward, make_optimizer(config, 1, 0))
  s = config.data.image_size
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
  return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)


def params_checksum(params: hk.Params) -> str:
  """sha256 of the parameters' bytes, in a fixed (sorted-path) order."""
  h = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()

class PretrainExperiment:
  """BYOL or SimCLR pretraining on all local devices (and processes).

  The experiment holds the training state and knows how to initialise,
  restore, advance (`step`) and save it; `train_loop.train(experiment)`
  drives it. Usage:

    summary = train_loop.train(PretrainExperiment(config, workdir))

  Rerunning the same command in the same workdir resumes from the last
  checkpoint.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               *, printer: Callable[[str], None] = print):
    validate_config(config)
    self.config = config
    self.workdir = workdir
    self.print = printer
    self.is_chief = jax.process_index() == 0
    self.local_devices = jax.local_device_count()
    self.per_device_batch = per_device_batch(config, jax.device_count())
    self.accum = config.training.accumulation_steps
    self.total_steps = num_steps(config)
    self.warmup = warmup_steps(config)
    self.num_classes = dataset_lib.num_classes(config.data.dataset)
    self.forward = make_forward(config, self.num_classes, AXIS)
    self.optimizer = make_optimizer(config, self.total_steps, self.warmup)
    check_model(config, self.num_classes)
    self._init = jax.pmap(make_init_fn(config, self.forward, self.optimizer),
                          axis_name=AXIS)
    self._update = jax.pmap(
        make_update_fn(config, self.forward, self.optimizer, self.total_steps,
                       AXIS),
        axis_name=AXIS, donate_argnums=(0,))
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, 'checkpoints'),
        keep=config.training.keep_checkpoints)
    self._base_rng = jax.random.PRNGKey(config.seed + 1)
    # The replicated TrainState; set by `restore_or_init`, advanced by `step`.
    self.state = None
    # Built on first use by `evaluate` and `diagnostics`.
    self._classify = None
    self._fixed_batch = None
    self._diagnose = None


  def _sample_images(self):
    s = self.config.data.image_size
    return np.zeros((self.local_devices, self.per_device_batch, s, s, 3),
                    np.float32)

  def initial_state(self) -> TrainState:
    rng = jax.random.PRNGKey(self.config.seed)
    if self.config.model.init == 'bn_init':
      images = self.bn_init_batch()
    else:
      images = self._sample_images()
    return self._init(devices.replicate(rng), images)

  def bn_init_batch(self) -> np.ndarray:
    """The augmented, normalized batch of the BN-init pass, on every device."""
    c = self.config
    images = augmented_batch(
        c, c.model.bn_init_batch_size, data_seed=c.seed + 2,
        rng=jax.random.PRNGKey(c.seed + 3),
        # The same batch in every process (not each process's own shard), so
        # that all replicas start from the same parameters.
        process_index=0, process_count=1)
    return np.broadcast_to(images, (self.local_devices,) + images.shape)

  def state_template(self) -> TrainState:
    return state_template(self.config)

  def restore_or_init(self) -> int:
    """Sets `state` from the last checkpoint, or initialises it.

    Returns:
      The step to start from (0 without a checkpoint).
    """
    step = self.checkpointer.latest_step()
    if step is None:
      self.state = self.initial_state()
      return 0
    host_state, _ = self.checkpointer.restore(step, target=self.state_template())
    self.print(f'[train] resuming from the checkpoint of step {step}')
    self.state = devices.replicate(host_state)
    return int(step)

  # What the training loop calls.

  def input(self, start_step: int) -> Iterator:
    """Batches of steps `start_step`, `start_step + 1`, ... on the devices."""
    c = self.config
    it = dataset_lib.load(
        dataset_lib.Split.TRAIN_AND_VALID,
        preprocess_mode=dataset_lib.PreprocessMode.PRETRAIN,
        batch_dims=[self.local_devices, self.accum, self.per_device_batch],
        dataset=c.data.dataset, image_size=c.data.image_size,
        data_dir=c.data.data_dir or None, seed=c.seed,
        deterministic=c.training.deterministic_input, start_step=start_step)
    return devices.device_prefetch(it)

  def step(self, batch, step: int):
    """Runs training step `step` on `batch`; returns its (device) scalars."""
    # One key per step, derived from the step alone: a resumed run draws the
    # same keys as an uninterrupted one.
    rng = devices.replicate(jax.random.fold_in(self._base_rng, step))
    self.state, logs = self._update(self.state, batch, rng)
    return logs

  def evaluate(self) -> Dict[str, float]:
    """The online classifier's TEST accuracy, over every TEST example once.

    DeepMind's `evaluate`: the linear classifier trained online on
    stop_gradient(embedding) reads the online network in inference mode.
    """
    c = self.config
    if self._classify is None:
      forward = make_forward(c, self.num_classes, axis_name=None)
      normalize = functools.partial(dataset_lib.normalize,
                                    dataset=c.data.dataset)
      self._classify = lambda p, s, x: forward.apply(
          p, s, None, normalize(x), False)[0]['logits']
    params, state = devices.unreplicate(
        (self.state.online_params, self.state.online_state))
    logits, labels = inference.extract_features(
        self._classify, params, state, dataset=c.data.dataset,
        split=dataset_lib.Split.TEST, image_size=c.data.image_size,
        batch_size=c.training.eval_batch_size,
        data_dir=c.data.data_dir or None)
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    counts = np.array([np.sum(top5[:, 0] == labels),
                       np.sum(np.any(top5 == labels[:, None], axis=-1)),
                       len(labels)], np.float64)
    if jax.process_count() > 1:  # each process read its own shard
      counts = multihost_utils.process_allgather(counts).sum(0)
    return {'eval_top1_accuracy': counts[0] / counts[2],
            'eval_top5_accuracy': counts[1] / counts[2]}

  def diagnostics(self, state: Optional[TrainState] = None
                  ) -> Dict[str, float]:
    """Collapse measures of the online network on a fixed batch.

    The batch: the first `training.diagnostics_batch_size` images of the
    training set, centre-cropped, unaugmented, the same at every call and on
    every process. See `byol.diagnostics`.

    Args:
      state: a replicated TrainState (default: the current one).
    """
    state = self.state if state is None else state
    c = self.config
    if self._fixed_batch is None:
      n = self.local_devices
      per_device = max(1, c.training.diagnostics_batch_size // n)
      batch = next(dataset_lib.load(
          dataset_lib.Split.TRAIN_AND_VALID,
          preprocess_mode=dataset_lib.PreprocessMode.EVAL,
          batch_dims=[n, per_device], dataset=c.data.dataset,
          image_size=c.data.image_size, data_dir=c.data.data_dir or None,
          process_index=0, process_count=1))
      self._fixed_batch = jax.device_put(
          dataset_lib.normalize(batch['images'], dataset=c.data.dataset),
          devices.local_mesh_sharding())
      self._diagnose = jax.pmap(
          diagnostics.make_diagnostics_fn(self.forward, AXIS), axis_name=AXIS)
    features = self._diagnose(state.online_params, state.online_state,
                              self._fixed_batch)
    return diagnostics.summarize(devices.unreplicate(features))

  def save(self, step: int) -> None:
    """Checkpoints the current state as that of `step`."""
    self.checkpointer.save(step, devices.unreplicate(self.state),
                           {'step': step, 'seed': self.config.seed})

  def summary(self) -> Dict[str, Any]:
    """The final figures of the current state (no metrics)."""
    final = devices.unreplicate(self.state)
    return {
        'step': int(final.step),
        'method': self.config.method,
        'dataset': self.config.data.dataset,
        'online_params_sha256': params_checksum(final.online_params),
    }


def check_model(config: ml_collections.ConfigDict, num_classes: int) -> None:
  """Builds the network shape-only; impossible shapes become `ConfigError`."""
  forward = make_forward(config, num_classes, axis_name=None)
  s = config.data.image_size
  try:
    jax.eval_shape(lambda x: forward.init(jax.random.PRNGKey(0), x, True),
                   jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32))
  except ValueError as e:
    raise ConfigError(str(e).splitlines()[0]) from None
