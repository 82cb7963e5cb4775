"""BYOL and SimCLR pretraining: the pure update step and the experiment around it.

The update step (`make_update_fn`) is a pure function of (state, inputs, rng),
run under `jax.pmap(axis_name='i')`. `PretrainExperiment` only wires data,
state, checkpoints and logging around it.
"""

import functools
import hashlib
import itertools
import json
import math
import os
import signal
import sys
import time
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
from byol import losses
from byol import networks
from byol import optimizers
from byol import schedules
from byol.errors import ConfigError

AXIS = devices.AXIS


class TrainState(NamedTuple):
  """Everything that changes during pretraining; replicated over devices."""
  step: jax.Array
  online_params: hk.Params
  target_params: hk.Params
  online_state: hk.State
  target_state: hk.State
  opt_state: optax.OptState


# ---------------------------------------------------------------------------
# Config checks and derived quantities.


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` for field values no run could use."""
  if config.method not in ('byol', 'simclr'):
    raise ConfigError(f'method must be byol or simclr, got {config.method!r}')
  for part in ('encoder', 'projector', 'predictor'):
    c = config.model[part]
    if c.norm not in networks.NORMS:
      raise ConfigError(
          f'model.{part}.norm={c.norm!r} is not one of '
          f'{", ".join(networks.NORMS)}')
    if c.num_groups <= 0:
      raise ConfigError(f'model.{part}.num_groups must be positive, '
                        f'got {c.num_groups}')
  for head in ('projector', 'predictor'):
    for field in ('hidden_size', 'output_size'):
      if config.model[head][field] <= 0:
        raise ConfigError(f'model.{head}.{field} must be positive, got '
                          f'{config.model[head][field]}')
  if config.model.encoder.width_multiplier <= 0:
    raise ConfigError('model.encoder.width_multiplier must be positive, got '
                      f'{config.model.encoder.width_multiplier}')
  if config.model.dtype not in ('float32', 'bfloat16'):
    raise ConfigError(f'model.dtype must be float32 or bfloat16, got '
                      f'{config.model.dtype!r}')
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


# ---------------------------------------------------------------------------
# Networks.


def _norm_kwargs(config: ml_collections.ConfigDict, part: str,
                 axis_name: Optional[str]) -> Dict[str, Any]:
  c = config.model[part]
  return dict(
      norm=c.norm,
      weight_standardization=c.weight_standardization,
      num_groups=c.num_groups,
      bn_decay=config.model.bn_decay,
      bn_eps=config.model.bn_eps,
      gn_eps=config.model.gn_eps,
      ws_eps=config.model.ws_eps,
      cross_replica_axis=axis_name,
      dtype=jnp.dtype(config.model.dtype),
  )


def make_encoder(config: ml_collections.ConfigDict,
                 axis_name: Optional[str] = None) -> hk.Module:
  """The encoder of `config.model.encoder`; call inside a Haiku transform."""
  c = config.model.encoder
  return networks.resnet(
      depth=c.depth,
      blocks_per_group=tuple(c.blocks_per_group) or None,
      width_multiplier=c.width_multiplier,
      stem=c.stem,
      zero_init_last_scale=c.zero_init_last_scale,
      **_norm_kwargs(config, 'encoder', axis_name))


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
    c = config.model
    projection = networks.MLP(
        c.projector.hidden_size, c.projector.output_size, name='projector',
        **_norm_kwargs(config, 'projector', axis_name))(embedding, is_training)
    out = dict(embedding=embedding, projection=projection)
    if config.method == 'byol':
      out['prediction'] = networks.MLP(
          c.predictor.hidden_size, c.predictor.output_size, name='predictor',
          **_norm_kwargs(config, 'predictor', axis_name))(projection,
                                                          is_training)
    # The online classifier only measures the representation: it must not
    # shape it, hence the stop_gradient on its input.
    out['logits'] = hk.Linear(num_classes, name='classifier')(
        jax.lax.stop_gradient(embedding))
    return out

  return hk.transform_with_state(forward)


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


# ---------------------------------------------------------------------------
# The pure update step.


def _global_proj_std(projection: jax.Array, axis_name: Optional[str]):
  """Std over the (global) batch of L2-normalised projections, dim-averaged."""
  z = projection.astype(jnp.float32)
  z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, -1, keepdims=True), 1e-12))
  mean, mean_sq = jnp.mean(z, 0), jnp.mean(z * z, 0)
  if axis_name is not None:
    mean, mean_sq = jax.lax.pmean((mean, mean_sq), axis_name)
  return jnp.mean(jnp.sqrt(jnp.maximum(mean_sq - mean * mean, 0.0)))


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
  method = config.method
  accum = config.training.accumulation_steps
  one_pass = batch_independent(config)
  if normalize is None:
    normalize = functools.partial(dataset_lib.normalize,
                                  dataset=config.data.dataset)
  aug_config = config.data.augmentations

  def views_forward(params, state, rng, view1, view2):
    """Both views through the network; one pass of 2B when no BN is used."""
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

  def loss_fn(online_params, online_state, target_params, target_state,
              rng, inputs):
    view1, view2 = inputs['view1'], inputs['view2']
    labels = inputs['labels']
    out1, out2, online_state = views_forward(online_params, online_state, rng,
                                             view1, view2)
    if method == 'byol':
      t1, t2, target_state = views_forward(target_params, target_state, rng,
                                           view1, view2)
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
                proj_std=_global_proj_std(out1['projection'], axis_name))
    return loss, (online_state, target_state, logs)

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def example_keys(rng, micro, per_device):
    """One augmentation key per example of this device's micro-batch.

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

  def micro_step(carry, xs):
    online_state, target_state, grads_sum, params, target_params = carry
    inputs, micro, rng = xs
    aug_rng, fwd_rng = jax.random.split(rng)
    keys = example_keys(aug_rng, micro, inputs['view1'].shape[0])
    fwd_rng = jax.random.fold_in(fwd_rng, micro)
    inputs = augmentations.postprocess(inputs, keys, aug_config)
    inputs = dict(inputs, view1=normalize(inputs['view1']),
                  view2=normalize(inputs['view2']))
    grads, (online_state, target_state, logs) = grad_fn(
        params, online_state, target_params, target_state, fwd_rng, inputs)
    grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
    return (online_state, target_state, grads_sum, params,
            target_params), logs

  def update(state: TrainState, inputs, rng):
    # `rng` is the same on every device: per-example keys (example_keys) make
    # the augmentations differ between examples, and so between devices.
    zeros = jax.tree.map(jnp.zeros_like, state.online_params)
    carry = (state.online_state, state.target_state, zeros,
             state.online_params, state.target_params)
    if accum == 1:
      carry, logs = micro_step(carry, (jax.tree.map(lambda x: x[0], inputs),
                                       0, rng))
    else:
      micro = jnp.arange(accum, dtype=jnp.int32)
      carry, logs = jax.lax.scan(
          lambda c, xs: micro_step(c, xs + (rng,)), carry, (inputs, micro))
      logs = jax.tree.map(jnp.mean, logs)
    online_state, target_state, grads, _, _ = carry
    grads = jax.tree.map(lambda g: g / accum, grads)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      logs = jax.lax.pmean(logs, axis_name)

    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.online_params)
    online_params = optax.apply_updates(state.online_params, updates)
    tau = schedules.target_ema(state.step, base_ema=config.training.tau_base,
                               total_steps=total_steps)
    if method == 'byol':
      target_params = jax.tree.map(lambda t, o: t + (1.0 - tau) * (o - t),
                                   state.target_params, online_params)
    else:
      target_params = state.target_params
    logs['tau'] = tau
    # Checked on the host with the loss: a step can turn finite parameters
    # into non-finite ones while its own loss (computed before it) is finite.
    logs['param_norm'] = optax.tree.norm(online_params)
    logs['learning_rate'] = schedules.learning_rate(
        state.step, base_lr=config.training.base_lr,
        batch_size=config.training.batch_size, total_steps=total_steps,
        warmup_steps=warmup_steps(config))
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


# ---------------------------------------------------------------------------
# Host-side helpers.


def format_duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


# Fields that may change when a run is resumed: they do not change its result.
RESUMABLE_FIELDS = ('training.log_every_steps', 'training.checkpoint_every_steps',
                    'training.keep_checkpoints')
# Where the run runs, not what it computes: a preempted multi-host job may come
# back on other hosts (another coordinator address), and every process has its
# own process_id. Like the device count, the number of processes changes how
# the global batch is split and which process reads which shard (so a resumed
# run on another number of processes is a faithful continuation, though not a
# bit-identical one).
RESUMABLE_PREFIXES = ('distributed.',)


def _flatten_config(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten_config(v, key + '.'))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def config_differences(old: dict, new: dict):
  """Config fields (dotted) whose values differ, ignoring resumable ones."""
  a, b = _flatten_config(old), _flatten_config(new)
  keys = sorted(set(a) | set(b))
  return [k for k in keys if a.get(k) != b.get(k) and k not in RESUMABLE_FIELDS
          and not k.startswith(RESUMABLE_PREFIXES)]


def _drop_records_after(path: str, step: int) -> None:
  """Rewrites a metrics.jsonl without its records of steps after `step`."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= step:
        keep.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # e.g. a line cut short by a kill mid-write
  if len(keep) == len(lines):
    return
  with open(path + '.tmp', 'w') as f:
    f.writelines(keep)
  os.replace(path + '.tmp', path)


class MetricsWriter:
  """metrics.jsonl + TensorBoard events; a no-op on processes other than 0.

  `start_step`: the step the run resumes from. Records of later steps, left by
  a run killed after its last checkpoint, are dropped from metrics.jsonl, so
  that the resumed run's records replace them instead of repeating them.
  """

  def __init__(self, workdir: str, enabled: bool = True, start_step: int = 0):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    path = os.path.join(workdir, 'metrics.jsonl')
    _drop_records_after(path, start_step)
    self._jsonl = open(path, 'a')
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tb = tf.summary.create_file_writer(workdir)
    except Exception:  # pylint: disable=broad-except
      self._tb = None  # TensorBoard is a convenience; metrics.jsonl is not.

  def write(self, step: int, scalars: Dict[str, float]):
    if not self.enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      with self._tb.as_default():
        for k, v in scalars.items():
          tf.summary.scalar(k, float(v), step=int(step))
      self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


class Preempted(Exception):
  """Raised after a checkpoint was written in answer to SIGTERM."""


class PretrainExperiment:
  """Pretrains with BYOL or SimCLR on all local devices (and processes).

  Usage: `PretrainExperiment(config, workdir).train()`. Rerunning the same
  command in the same workdir resumes from the last checkpoint.
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
    self._sigterm = False

  # -- state ---------------------------------------------------------------

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
    batch = next(dataset_lib.load(
        dataset_lib.Split.TRAIN_AND_VALID,
        preprocess_mode=dataset_lib.PreprocessMode.PRETRAIN,
        batch_dims=[c.model.bn_init_batch_size], dataset=c.data.dataset,
        image_size=c.data.image_size, data_dir=c.data.data_dir or None,
        seed=c.seed + 2, deterministic=True,
        # The same batch in every process (not each process's own shard), so
        # that all replicas start from the same parameters.
        process_index=0, process_count=1))
    views = jax.jit(lambda b, r: augmentations.postprocess(
        b, r, c.data.augmentations))(batch, jax.random.PRNGKey(c.seed + 3))
    images = np.asarray(dataset_lib.normalize(views['view1'],
                                              dataset=c.data.dataset))
    return np.broadcast_to(images, (self.local_devices,) + images.shape)

  def state_template(self) -> TrainState:
    return state_template(self.config)

  def restore_or_init(self):
    """Returns (replicated state, start step)."""
    step = self.checkpointer.latest_step()
    if step is None:
      return self.initial_state(), 0
    host_state, _ = self.checkpointer.restore(step, target=self.state_template())
    self.print(f'[train] resuming from the checkpoint of step {step}')
    return devices.replicate(host_state), int(step)

  # -- data ----------------------------------------------------------------

  def _input(self, start_step: int):
    c = self.config
    it = dataset_lib.load(
        dataset_lib.Split.TRAIN_AND_VALID,
        preprocess_mode=dataset_lib.PreprocessMode.PRETRAIN,
        batch_dims=[self.local_devices, self.accum, self.per_device_batch],
        dataset=c.data.dataset, image_size=c.data.image_size,
        data_dir=c.data.data_dir or None, seed=c.seed,
        deterministic=c.training.deterministic_input, start_step=start_step)
    return devices.device_prefetch(it)

  # -- the loop --------------------------------------------------------------

  def _check_workdir(self):
    path = os.path.join(self.workdir, 'config.json')
    new = json.loads(self.config.to_json_best_effort())
    if os.path.exists(path) and self.checkpointer.latest_step() is not None:
      with open(path) as f:
        old = json.load(f)
      diff = config_differences(old, new)
      if diff:
        raise ConfigError(
            f'workdir {self.workdir} holds a run with a different config '
            f'({", ".join(diff[:5])}); use another --workdir')

  def _write_config(self):
    if self.is_chief:
      with open(os.path.join(self.workdir, 'config.json.tmp'), 'w') as f:
        f.write(self.config.to_json_best_effort(indent=2, sort_keys=True))
      os.replace(os.path.join(self.workdir, 'config.json.tmp'),
                 os.path.join(self.workdir, 'config.json'))

  def _save(self, state: TrainState, step: int):
    self.checkpointer.save(step, devices.unreplicate(state),
                           {'step': step, 'seed': self.config.seed})

  def train(self) -> Dict[str, Any]:
    """Runs (or resumes) pretraining to the end; returns the summary."""
    self._check_workdir()
    state, start = self.restore_or_init()
    inputs = iter(())
    if start < self.total_steps:
      # The first batch is read before anything is written, so that a missing
      # or unreadable dataset leaves the workdir as it was.
      inputs = self._input(start)
      inputs = itertools.chain([next(inputs)], inputs)
    self._write_config()
    writer = MetricsWriter(self.workdir, enabled=self.is_chief,
                           start_step=start)
    # One process: our handler notes SIGTERM and the loop stops after the
    # step in flight. Several: JAX's preemption service (started by
    # jax.distributed.initialize) catches SIGTERM on any process and makes
    # all of them agree on the step at which to stop (`_stop_requested`); a
    # Python handler would displace its own.
    previous = None
    if jax.process_count() == 1:
      previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    try:
      summary = self._loop(state, start, inputs, writer)
    finally:
      if previous is not None:
        signal.signal(signal.SIGTERM, previous)
      writer.close()
    return summary

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    self._sigterm = True

  def _stop_requested(self, step: int) -> bool:
    """True when the run must checkpoint `step` and stop (preemption)."""
    if jax.process_count() == 1:
      return self._sigterm
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service is off
      return False

  def _loop(self, state: TrainState, start: int, inputs: Iterator,
            writer: MetricsWriter):
    c = self.config.training
    total = self.total_steps
    base_rng = jax.random.PRNGKey(self.config.seed + 1)
    global_batch = c.batch_size
    self.print(f'[train] {self.config.method} on {self.config.data.dataset}: '
               f'{total} steps of {global_batch} images, '
               f'{jax.device_count()} device(s), from step {start}')
    t_start = t_last = time.time()
    last_step = start
    logs = None
    step = start
    for step in range(start, total):
      batch = next(inputs)
      rng = devices.replicate(jax.random.fold_in(base_rng, step))
      state, logs = self._update(state, batch, rng)
      done = step + 1
      is_log = done % c.log_every_steps == 0 or done == total
      is_ckpt = done % c.checkpoint_every_steps == 0 or done == total
      stop = self._stop_requested(done)
      if is_log or is_ckpt or stop:
        scalars = devices.unreplicate(logs)
        # Checked before any checkpoint is written, so a checkpoint never
        # holds non-finite parameters.
        for name, what in (('loss', 'the loss'),
                           ('param_norm', "the parameters' norm")):
          if not np.isfinite(scalars[name]):
            last = self.checkpointer.latest_step()
            kept = (f'the last good checkpoint (step {last}) is kept in '
                    f'{self.checkpointer.directory}' if last is not None
                    else 'no checkpoint was written')
            raise NonFiniteLossError(
                f'{what} became {scalars[name]} by step {done}; {kept}')
      if is_log:
        now = time.time()
        rate = (done - last_step) * global_batch / max(now - t_last, 1e-9)
        t_last, last_step = now, done
        scalars = {k: float(v) for k, v in scalars.items()}
        scalars['images_per_sec'] = rate
        writer.write(done, scalars)
        eta = (total - done) * global_batch / max(rate, 1e-9)
        self.print(f'[train] step {done}/{total}  loss {scalars["loss"]:.4f}  '
                   f'top1 {scalars["top1_accuracy"]:.3f}  '
                   f'proj_std {scalars["proj_std"]:.4f}  '
                   f'{rate:.0f} img/s  ETA {format_duration(eta)}')
      if is_ckpt or stop:
        self._save(state, done)
      if stop and done < total:
        raise Preempted(f'SIGTERM: saved the checkpoint of step {done}; rerun '
                        'the same command to resume')
    final = devices.unreplicate(state)
    summary = {
        'step': int(final.step),
        'total_steps': total,
        'method': self.config.method,
        'dataset': self.config.data.dataset,
        'wall_time_sec': time.time() - t_start,
        'online_params_sha256': params_checksum(final.online_params),
    }
    if logs is not None:
      summary.update(
          {k: float(v) for k, v in devices.unreplicate(logs).items()})
    if self.is_chief:
      with open(os.path.join(self.workdir, 'summary.json.tmp'), 'w') as f:
        json.dump(summary, f, indent=2, sort_keys=True)
      os.replace(os.path.join(self.workdir, 'summary.json.tmp'),
                 os.path.join(self.workdir, 'summary.json'))
    self.state = state
    return summary


class NonFiniteLossError(Exception):
  """The loss is NaN or infinite; training stopped before a bad checkpoint."""


def check_model(config: ml_collections.ConfigDict, num_classes: int) -> None:
  """Builds the network shape-only; impossible shapes become `ConfigError`."""
  forward = make_forward(config, num_classes, axis_name=None)
  s = config.data.image_size
  try:
    jax.eval_shape(lambda x: forward.init(jax.random.PRNGKey(0), x, True),
                   jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32))
  except ValueError as e:
    raise ConfigError(str(e).splitlines()[0]) from None
