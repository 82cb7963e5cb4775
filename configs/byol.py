"""BYOL / SimCLR pretraining configuration.

The default is the paper's configuration (Richemond et al., 2020): ResNet-50 in
which every normalization is GroupNorm(16) and every conv/linear weight is
standardized, batch 4096, projector and predictor 4096 -> 256, ImageNet,
the 1000-epoch preset.

`get_config(arg)` takes a comma-separated list of variant names; the first
number in it picks the epoch preset:

  gnws (default)  GN(16)+WS in encoder, projector and predictor (the paper).
  bn              vanilla BYOL: BatchNorm everywhere, no WS.
  bn_init         BN-free network initialised from one BatchNorm pass
                  (encoder/projector/predictor norms become `affine`).
  simclr          SimCLR instead of BYOL (no predictor, no target network).
  local           the CPU preset: Fashion-MNIST, tiny small-stem ResNet,
                  predictor learning rate x10 (docs/collapse.md), minutes on 2 cores, deterministic.
  local_long      `local` for 10 epochs (resumable; ~30 minutes of 2 idle
                  cores): where the learned encoder stands against raw
                  pixels given more time (docs/collapse.md, "10 epochs").
  40|100|300|1000 epoch preset (lr, weight decay, tau_base as DeepMind's BYOL).

Commands (each field can be overridden with --config.FIELD=VALUE):

  # The paper's GN+WS ResNet-50, 1000 epochs, on ImageNet:
  python main.py --config=configs/byol.py --workdir=/tmp/byol_gnws
  # Vanilla BatchNorm BYOL, 300 epochs:
  python main.py --config=configs/byol.py:bn,300 --workdir=/tmp/byol_bn
  # BN-init protocol, 1000 epochs:
  python main.py --config=configs/byol.py:bn_init --workdir=/tmp/byol_bninit
  # SimCLR with GN+WS:
  python main.py --config=configs/byol.py:simclr --workdir=/tmp/simclr
  # Laptop: GN+WS BYOL on Fashion-MNIST (what ./run.sh runs):
  python main.py --config=configs/byol.py:local --workdir=/tmp/byol_local
  # An ablation row: BN only in the encoder, none in the heads:
  python main.py --config=configs/byol.py:local --workdir=/tmp/enc_bn \\
      --config.model.encoder.norm=bn --config.model.encoder.weight_standardization=False \\
      --config.model.projector.norm=none --config.model.projector.weight_standardization=False \\
      --config.model.predictor.norm=none --config.model.predictor.weight_standardization=False
"""

import ml_collections

# epochs -> (base learning rate, weight decay, tau_base), as DeepMind's BYOL.
EPOCH_PRESETS = {
    40: (0.45, 1e-6, 0.97),
    100: (0.45, 1e-6, 0.99),
    300: (0.3, 1e-6, 0.99),
    1000: (0.2, 1.5e-6, 0.996),
}

# The `local_long` preset's schedule: `local` run this many epochs.
LOCAL_LONG_EPOCHS = 10.0

VARIANTS = ('gnws', 'bn', 'bn_init', 'simclr', 'local', 'local_long')


def view_augmentations(blur_prob, solarize_prob):
  """Augmentation strengths and probabilities of one view (BYOL, Table 6)."""
  return ml_collections.ConfigDict(dict(
      flip_prob=0.5,
      color_jitter_prob=0.8,
      brightness=0.4,
      contrast=0.4,
      saturation=0.2,
      hue=0.1,
      grayscale_prob=0.2,
      blur_prob=blur_prob,
      blur_sigma_min=0.1,
      blur_sigma_max=2.0,
      # Blur kernel side as a fraction of the image side, DeepMind's rule:
      # 2 * int(fraction * side / 2) + 1 taps, 23 at 224 px, 3 at 24 px and
      # 1 (no blur) below 20 px.
      blur_kernel_fraction=0.1,
      solarize_prob=solarize_prob,
      solarize_threshold=0.5,
  ))


def _component(norm, ws, **extra):
  return dict(norm=norm, weight_standardization=ws, num_groups=16, **extra)


def _set_norm(config, norm, ws):
  for part in ('encoder', 'projector', 'predictor'):
    config.model[part].norm = norm
    config.model[part].weight_standardization = ws


def get_config(arg=None):
  """Returns the locked pretraining config for the comma-separated `arg`."""
  names = [a.strip() for a in (arg or '').split(',') if a.strip()]
  epochs = 1000
  variants = []
  for name in names:
    if name.isdigit():
      epochs = int(name)
      if epochs not in EPOCH_PRESETS:
        raise ValueError(f'unknown epoch preset {epochs}; choose from '
                         f'{sorted(EPOCH_PRESETS)}')
    elif name in VARIANTS:
      variants.append(name)
    else:
      raise ValueError(f'unknown config variant {name!r}; choose from '
                       f'{", ".join(VARIANTS)} or an epoch preset '
                       f'{sorted(EPOCH_PRESETS)}')
  base_lr, weight_decay, tau_base = EPOCH_PRESETS[epochs]

  c = ml_collections.ConfigDict()
  c.experiment = 'pretrain'
  c.seed = 0
  c.method = 'byol'  # byol | simclr

  c.model = ml_collections.ConfigDict()
  c.model.encoder = ml_collections.ConfigDict(_component(
      'gn', True, depth=50, width_multiplier=1.0, stem='imagenet',
      blocks_per_group=(), zero_init_last_scale=False,
      # byol/fast_conv.py: same numbers, a backward pass XLA:CPU runs faster.
      fast_conv=False,
      # How convolutions are computed: 'lax', 'fast_conv' or 'onednn'
      # (oneDNN's kernels, float32 on XLA:CPU, lax elsewhere;
      # byol/onednn_conv.py); '' follows fast_conv. The same function,
      # other float rounding.
      conv_impl=''))
  c.model.projector = ml_collections.ConfigDict(_component(
      'gn', True, hidden_size=4096, output_size=256))
  c.model.predictor = ml_collections.ConfigDict(_component(
      'gn', True, hidden_size=4096, output_size=256))
  c.model.bn_decay = 0.9
  c.model.bn_eps = 1e-5
  c.model.gn_eps = 1e-5
  c.model.ws_eps = 1e-10  # on the variance: std floor 1e-5 (Qiao et al.)
  c.model.dtype = 'float32'  # float32 | bfloat16 (compute; params stay f32)
  c.model.init = 'default'  # default | bn_init
  c.model.bn_init_batch_size = 256

  c.data = ml_collections.ConfigDict()
  # imagenet2012 | fashion_mnist | mock | tfds:NAME[/CONFIG] | tfds_dir:PATH
  # | folder:PATH (docs/data.md)
  c.data.dataset = 'imagenet2012'
  c.data.data_dir = ''  # '' -> tfds default / the Debian folder
  # The split pretraining reads: '' -> train_and_valid, and the dataset's
  # unlabelled images after it where it has some (STL-10's `unlabelled`):
  # train_and_valid_and_unlabelled. Or name one: train_and_valid, train,
  # valid, unlabelled, train_and_valid_and_unlabelled.
  c.data.pretrain_split = ''
  # Per-channel normalisation statistics (3 values each, std > 0) replacing
  # the dataset's known or sampled ones; () -> those.
  c.data.mean = ()
  c.data.std = ()
  c.data.image_size = 224
  # Threads of the pretraining input pipeline's own pool (0: TensorFlow's
  # default, one per core). On a CPU the pipeline shares the cores with the
  # training step; where it is much faster than the step, fewer threads keep
  # it from taking the step's cores in bursts (docs/performance.md).
  c.data.input_threads = 0
  c.data.augmentations = ml_collections.ConfigDict(dict(
      view1=view_augmentations(blur_prob=1.0, solarize_prob=0.0),
      view2=view_augmentations(blur_prob=0.1, solarize_prob=0.2),
  ))

  c.training = ml_collections.ConfigDict()
  c.training.batch_size = 4096  # global, over all devices and processes
  c.training.epochs = float(epochs)
  c.training.max_steps = -1  # > 0 overrides the length given by epochs
  c.training.warmup_epochs = 10.0
  c.training.base_lr = base_lr  # scaled by batch_size / 256
  c.training.weight_decay = weight_decay
  c.training.lars_eta = 1e-3
  c.training.momentum = 0.9
  # DeepMind's rule: biases and normalization parameters get neither weight
  # decay nor the LARS trust ratio (they move at the raw learning rate).
  c.training.weight_decay_on_norm_and_bias = False
  c.training.trust_ratio_on_norm_and_bias = False
  # The predictor's learning rate over the rest's (BYOL, Grill et al. 2020,
  # section 5: a faster predictor keeps it near-optimal).
  c.training.predictor_lr_multiplier = 1.0
  c.training.tau_base = tau_base
  c.training.temperature = 0.1  # SimCLR only
  c.training.accumulation_steps = 1
  # Networks without batch statistics (GN, LN, affine, none) take both views
  # of a (micro-)batch through the network in passes of at most this many
  # images each (0: all 2B in one pass). The same function and gradients up
  # to float rounding; on XLA:CPU, passes of 64 run the `local` GN+WS step
  # ~15-20% faster than one pass of 512 (docs/performance.md). BatchNorm
  # networks always take one view per pass.
  c.training.images_per_pass = 0
  c.training.log_every_steps = 100
  c.training.checkpoint_every_steps = 1000
  c.training.keep_checkpoints = 3
  c.training.deterministic_input = False

  # What the training loop measures, and when (byol/evaluation/): each
  # (every_steps, evaluator) pair runs that evaluator on the online network
  # every that many steps and after the last step, its results joining that
  # step's metrics.jsonl record. () measures nothing. Each evaluator's
  # settings are its block below.
  c.evaluators = ml_collections.ConfigDict()
  c.evaluators.schedule = ((100, 'collapse'), (5000, 'online_classifier'))
  # The online classifier's TEST accuracy, over every TEST example once.
  c.evaluators.online_classifier = ml_collections.ConfigDict(dict(
      batch_size=1000))  # over this process's devices
  # proj_std and RankMe (byol/diagnostics.py) on a fixed batch of this many
  # unaugmented training images.
  c.evaluators.collapse = ml_collections.ConfigDict(dict(batch_size=512))

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ''  # host:port; '' -> single process
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.distributed.auto = False  # jax.distributed.initialize() auto-detection
  # On the CPU: run as this many XLA devices, the batch split over them by
  # pmap; BatchNorm keeps the statistics of the whole batch (cross-replica),
  # so it is the same function, other rounding. 0 (automatic): one device per
  # core for a network with batch statistics whose batch divides by the
  # cores, else one (byol.distributed.cpu_device_count); on 2 cores the
  # `local` BN step runs ~1.2x faster so (docs/performance.md). 1 turns it
  # off. Ignored by accelerators.
  c.distributed.cpu_devices = 0

  if 'bn' in variants:
    _set_norm(c, 'bn', False)
  if 'bn_init' in variants:
    _set_norm(c, 'bn', False)
    c.model.init = 'bn_init'
  if 'simclr' in variants:
    c.method = 'simclr'
  if 'local' in variants or 'local_long' in variants:
    _local(c)
  if 'local_long' in variants:
    c.training.epochs = LOCAL_LONG_EPOCHS
  c.lock()
  return c


def _local(c):
  """The laptop preset: minutes of 2 CPU cores, same numbers every run."""
  c.model.encoder.depth = 18
  c.model.encoder.blocks_per_group = (1, 1, 1, 1)
  c.model.encoder.width_multiplier = 0.25
  c.model.encoder.stem = 'small'
  c.model.encoder.num_groups = 8
  for head in ('projector', 'predictor'):
    c.model[head].hidden_size = 256
    c.model[head].output_size = 64
    c.model[head].num_groups = 8
  # XLA:CPU arrangements of the same step (docs/performance.md): oneDNN's
  # convolutions as custom calls (byol/onednn_conv.py; built by run.sh), and
  # both views in passes of 64 images instead of one of 512. oneDNN: 0.57x
  # the GN+WS step time of fast_conv's convolution, 0.63x BatchNorm's
  # (interleaved, 2 cores); the same function, other float rounding.
  c.model.encoder.conv_impl = 'onednn'
  c.training.images_per_pass = 64
  c.data.dataset = 'fashion_mnist'
  c.data.image_size = 24
  # One thread gives >10,000 images/s at 24 px, >20x what the step takes.
  c.data.input_threads = 1
  c.training.batch_size = 256
  # About 4 minutes of pretraining on 2 idle CPU cores; see README, "Results".
  c.training.epochs = 1.5
  c.training.warmup_epochs = 0.15
  c.training.base_lr = 1.0
  c.training.weight_decay = 1e-6
  c.training.tau_base = 0.99
  # Without it, GN+WS projections collapse within ~20 steps at this scale
  # (docs/collapse.md): a predictor that adapts 10x faster
  # than the rest stays near-optimal, as BYOL's section 5 recommends.
  c.training.predictor_lr_multiplier = 10.0
  c.training.log_every_steps = 20
  c.evaluators.schedule = ((20, 'collapse'), (120, 'online_classifier'))
  c.training.checkpoint_every_steps = 200
  c.training.deterministic_input = True
