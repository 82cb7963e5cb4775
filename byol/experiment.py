"""BYOL and SimCLR pretraining: the training state and the experiment.

In reading order: config checks and the numbers derived from the config
(per-device batch, steps, warmup); the one-off augmented batch of the BN-init
pass; the initial state (`make_init_fn`, `state_template`); and
`PretrainExperiment`, which holds the replicated state and initialises,
restores, advances and saves it -- and measures nothing. The network it
trains is `byol/model.py`'s `Network`, the pure update step it runs
`byol/update.py`'s; the loop that drives it, runs the evaluators on their
schedule and writes everything besides checkpoints is `byol/train_loop.py`.
"""

import hashlib
import math
import os
from typing import Any, Callable, Dict, Iterator, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from byol import augmentations
from byol import bn_init
from byol import checkpointing
from byol import dataset as dataset_lib
from byol import devices
from byol import distributed
from byol import model
from byol import update as update_lib
from byol.errors import ConfigError


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
  the networks' constructors, when `model.Network.check` builds them
  shape-only.
  """
  if config.method not in ('byol', 'simclr'):
    raise ConfigError(f'method must be byol or simclr, got {config.method!r}')
  if config.model.init not in ('default', 'bn_init'):
    raise ConfigError(f'model.init must be default or bn_init, got '
                      f'{config.model.init!r}')
  _check_numbers(config)
  t = config.training
  for field in ('batch_size', 'accumulation_steps', 'log_every_steps',
                'checkpoint_every_steps', 'keep_checkpoints'):
    if t[field] <= 0:
      raise ConfigError(f'training.{field} must be positive, got {t[field]}')
  if t.images_per_pass < 0:
    raise ConfigError(f'training.images_per_pass must be 0 (one pass) or '
                      f'positive, got {t.images_per_pass}')
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
  try:
    dataset_lib.check_dataset(config.data.dataset)
  except dataset_lib.DatasetError as e:
    raise ConfigError(f'data.dataset: {e}') from None
  # Statistics and the split are checked before anything reads the data.
  if config.data.get('pretrain_split', ''):
    name = config.data.pretrain_split
    allowed = [s.name.lower() for s in dataset_lib.Split
               if s != dataset_lib.Split.TEST]
    if not isinstance(name, str) or name.lower() not in allowed:
      raise ConfigError(
          f'data.pretrain_split must be empty (automatic) or one of '
          f'{", ".join(allowed)}, got {name!r}')
  try:
    dataset_lib.given_stats(config.data)
  except dataset_lib.DatasetError as e:
    raise ConfigError(str(e)) from None
  steps = num_steps(config)
  if steps > MAX_STEPS:
    raise ConfigError(
        f'training.epochs={t.epochs} / training.max_steps={t.max_steps} make '
        f'{steps} steps; the step counter holds at most {MAX_STEPS}')
  check_host_memory(config)


# The training state counts steps in an int32.
MAX_STEPS = 2**31 - 1
# Fields that must be >= 0 (besides being finite).
_NON_NEGATIVE = ('training.epochs', 'training.warmup_epochs',
                 'training.base_lr', 'training.weight_decay',
                 'training.lars_eta', 'training.predictor_lr_multiplier',
                 'model.bn_eps', 'model.gn_eps', 'model.ws_eps',
                 'model.bn_init_batch_size')


def _flat_numbers(tree, prefix=''):
  for key, value in tree.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      yield from _flat_numbers(value, f'{prefix}{key}.')
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield f'{prefix}{key}', value


def _check_numbers(config: ml_collections.ConfigDict) -> None:
  """Every number of the config finite; the ones that are amounts >= 0.

  NaN passes every comparison-based check (`nan <= 0` is False), so a NaN
  epoch count would otherwise reach the schedules; infinities overflow the
  step counts.
  """
  values = dict(_flat_numbers(config))
  for name, value in values.items():
    if not math.isfinite(value):
      raise ConfigError(f'{name} must be a finite number, got {value}')
  for name in _NON_NEGATIVE:
    if name in values and values[name] < 0:
      raise ConfigError(f'{name} must be >= 0, got {values[name]}')
  if not 0.0 <= config.training.momentum < 1.0:
    raise ConfigError(f'training.momentum must be in [0, 1), got '
                      f'{config.training.momentum}')
  if config.data.image_size > 4096:
    raise ConfigError(f'data.image_size={config.data.image_size} is more than '
                      '4096 pixels a side')


def host_memory_bytes() -> int:
  """This machine's physical memory (0 where unknown)."""
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return 0


def check_host_memory(config: ml_collections.ConfigDict) -> None:
  """Refuses a batch whose images alone would not fit in this host's memory.

  Each process holds its share of the global batch as two float32 views of
  H x W x 3 (and the input pipeline and prefetch keep about as much again);
  asking for more than the machine has ends in an allocation failure deep
  in NumPy or TensorFlow, after the workdir was made.
  """
  s = config.data.image_size
  processes = max(1, config.distributed.num_processes)
  per_process = -(-config.training.batch_size // processes)
  need = 2 * 2 * per_process * s * s * 3 * 4
  have = host_memory_bytes()
  if have and need > have:
    raise ConfigError(
        f'training.batch_size={config.training.batch_size} needs about '
        f'{need / 2**30:.1f} GiB of host memory per process for the images of '
        f'one step ({processes} process(es), {s}x{s} px); this machine has '
        f'{have / 2**30:.1f} GiB: use a smaller batch or more processes')


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


def num_steps_for(epochs: float, max_steps: int, num_examples: int,
                  batch_size: int) -> int:
  """`max_steps` when positive, else `epochs` passes over `num_examples`.

  The one rule for the length of a run, pretraining's and the evaluations'.
  """
  if max_steps > 0:
    return int(max_steps)
  return max(1, int(epochs * num_examples // batch_size))


def num_steps(config: ml_collections.ConfigDict) -> int:
  """The pretraining run's length in steps."""
  t = config.training
  return num_steps_for(
      t.epochs, t.max_steps,
      dataset_lib.num_examples(dataset_lib.pretrain_split(config.data),
                               config.data.dataset,
                               config.data.data_dir or None), t.batch_size)


def warmup_steps(config: ml_collections.ConfigDict) -> int:
  examples = dataset_lib.num_examples(dataset_lib.pretrain_split(config.data),
                                      config.data.dataset,
                                      config.data.data_dir or None)
  return int(config.training.warmup_epochs * examples
             // config.training.batch_size)


def augmented_batch(config: ml_collections.ConfigDict, batch_size: int, *,
                    data_seed: int, rng: jax.Array, **load_kwargs) -> np.ndarray:
  """One pretraining batch as the network gets it: view 1, augmented.

  The first batch of the deterministic pretraining stream of `data_seed`,
  through the on-device augmentations of view 1 (keys from `rng`), in [0, 1]
  (the network normalises it). For one-off passes outside the training loop:
  the BN-init statistics, proj_std at initialisation.

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
      dataset_lib.pretrain_split(c.data),
      preprocess_mode=dataset_lib.PreprocessMode.PRETRAIN,
      batch_dims=[batch_size], dataset=c.data.dataset,
      image_size=c.data.image_size, data_dir=c.data.data_dir or None,
      seed=data_seed, deterministic=True, **load_kwargs))
  views = jax.jit(lambda b, r: augmentations.postprocess(
      b, r, c.data.augmentations))(batch, rng)
  return np.asarray(views['view1'])


def make_init_fn(network: model.Network,
                 optimizer: optax.GradientTransformation):
  """Returns `init(rng, images) -> TrainState` of `network`.

  Under the BN-init protocol `images` must be a real, augmented batch (the
  same on every device, so that replicas agree); otherwise only its shape
  matters.
  """
  config = network.config

  def init_network(rng, images):
    if config.model.init == 'bn_init':
      return bn_init.bn_initialised_params(config, rng, images)
    return network.forward.init(rng, images, True)

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
  # The optimizer's state has the same structure whatever the schedule.
  init = make_init_fn(model.Network(config, axis_name=None),
                      update_lib.make_optimizer(config, 1, 0))
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
  drives it and runs the evaluators. Usage:

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
    # On a CPU, a BatchNorm run may take one device per core while other
    # runs of the same process take one (byol/distributed.py).
    self.devices = distributed.local_training_devices(config)
    self.sharding = devices.local_mesh_sharding(self.devices)
    self.local_devices = len(self.devices)
    self.per_device_batch = per_device_batch(
        config, self.local_devices * jax.process_count())
    self.accum = config.training.accumulation_steps
    self.total_steps = num_steps(config)
    self.warmup = warmup_steps(config)
    # The network, built once: its forward normalises its own input.
    self.network = model.Network(config, devices.AXIS)
    self.network.check()
    self.optimizer = update_lib.make_optimizer(config, self.total_steps,
                                               self.warmup)
    self._init = jax.pmap(make_init_fn(self.network, self.optimizer),
                          axis_name=devices.AXIS, devices=self._pmap_devices())
    self._update = jax.pmap(
        update_lib.make_update_fn(config, self.network.forward,
                                  self.optimizer, self.total_steps,
                                  self.warmup, devices.AXIS),
        axis_name=devices.AXIS, donate_argnums=(0,),
        devices=self._pmap_devices())
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, 'checkpoints'),
        keep=config.training.keep_checkpoints)
    self._base_rng = jax.random.PRNGKey(config.seed + 1)
    # The replicated TrainState; set by `restore_or_init`, advanced by `step`.
    self.state = None

  def _pmap_devices(self):
    # pmap's `devices` only where it is a subset: across processes pmap
    # takes every device of every process.
    return (self.devices if len(self.devices) < jax.local_device_count()
            else None)

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
    return self._init(devices.replicate(rng, self.sharding), images)

  def bn_init_batch(self) -> np.ndarray:
    """The augmented batch of the BN-init pass, on every device."""
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
    self.state = devices.replicate(host_state, self.sharding)
    return int(step)

  # What the training loop calls.

  def input(self, start_step: int) -> Iterator:
    """Batches of steps `start_step`, `start_step + 1`, ... on the devices."""
    c = self.config
    it = dataset_lib.load(
        dataset_lib.pretrain_split(c.data),
        preprocess_mode=dataset_lib.PreprocessMode.PRETRAIN,
        batch_dims=[self.local_devices, self.accum, self.per_device_batch],
        dataset=c.data.dataset, image_size=c.data.image_size,
        data_dir=c.data.data_dir or None, seed=c.seed,
        deterministic=c.training.deterministic_input, start_step=start_step,
        threads=c.data.input_threads)
    return devices.device_prefetch(it, sharding=self.sharding)

  def step(self, batch, step: int):
    """Runs training step `step` on `batch`; returns its (device) scalars."""
    # One key per step, derived from the step alone: a resumed run draws the
    # same keys as an uninterrupted one.
    rng = devices.replicate(jax.random.fold_in(self._base_rng, step),
                            self.sharding)
    self.state, logs = self._update(self.state, batch, rng)
    return logs

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

