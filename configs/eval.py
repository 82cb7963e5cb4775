"""Evaluation of a pretraining run: linear evaluation, fine-tuning, fast probe.

`--workdir` is the pretraining workdir (or one made by `main.py --import_dm`
from a DeepMind checkpoint); results go to `<workdir>/<output_name>/`
(`summary.json` with top-1 and top-5, `config.json`, and for the SGD
protocols `metrics.jsonl`). Variants (comma-separated):

  (default)  the BYOL paper's linear protocol: a frozen encoder (BatchNorm
             in inference mode), linear heads trained by SGD + Nesterov 0.9,
             no weight decay, lr = base * batch/256 with cosine decay, 80
             epochs of batch 1024, random-resized-crop + flip on the training
             images, centre crop for evaluation. One head per base rate of
             `lr_grid` {0.4, 0.3, 0.2, 0.1, 0.05}, all trained side by side on
             TRAIN (the training images minus their first 10,000); the rate
             is chosen on VALID (those 10,000) and the chosen head's TEST
             accuracy is reported. Nothing is selected on TEST.
             -> eval_linear/
  dm         DeepMind's code defaults (byol/configs/eval.py): one base rate
             0.2, batch 4096, trained on TRAIN_AND_VALID, the head
             initialised as Haiku's `hk.Linear` (truncated normal, std
             1/sqrt(fan in); zero bias) instead of zeros. -> eval_linear_dm/
  finetune   DeepMind's fine-tuning (`freeze_backbone=False`): the dm
             settings with the encoder trained too (same SGD, same rate),
             BatchNorm in training mode (batch statistics over all devices)
             while training, inference mode for evaluation. -> eval_finetune/
  fast       a different, quicker protocol: encode every image once without
             augmentation and fit a multinomial logistic regression (L-BFGS)
             on the cached features; also reports kNN (cosine, k=200,
             votes weighted by exp(similarity / 0.07)). Its numbers are not
             comparable with the SGD protocols'. -> eval_fast/
  1pct, 10pct
             low-label fine-tuning (BYOL's Table 2): the whole network
             fine-tuned on 1% / 10% of the TRAIN labels (ImageNet: tfds'
             fixed imagenet2012_subset lists; otherwise a seeded,
             class-balanced subset, listed in subset.json), SGD Nesterov
             0.9, no weight decay, batch 1024, base rate x epochs from
             {0.01, 0.02, 0.05, 0.1, 0.005} x {30, 50} chosen on VALID,
             TEST reported. -> eval_lowlabel_1pct/ (eval_lowlabel_10pct/);
             lowlabel.fraction=1 is transfer fine-tuning with selection.
  local      the CPU scale: 10 epochs, batch 512 (for Fashion-MNIST runs);
             with 1pct/10pct: batch 256, epochs {30, 50} kept.

Transfer: pretrain on one dataset, evaluate on another with
--config.data.dataset=NAME (any name of docs/data.md: fashion_mnist,
tfds:NAME, tfds_dir:PATH, folder:PATH); the network keeps its own input
normalisation, the images are the new dataset's.
  select     accepted for old command lines: selection on VALID is the
             default.

Commands:

  python main.py --config=configs/eval.py --workdir=/ckpt/byol_gnws
  python main.py --config=configs/eval.py:dm --workdir=/ckpt/byol_gnws
  python main.py --config=configs/eval.py:finetune --workdir=/ckpt/byol_gnws
  python main.py --config=configs/eval.py:local,fast --workdir=workdirs/local
  python main.py --config=configs/eval.py:1pct --workdir=/ckpt/byol_gnws
  python main.py --config=configs/eval.py:local,10pct --workdir=workdirs/local
  # Transfer: the same encoder, linear evaluation on a folder of images.
  python main.py --config=configs/eval.py:local \
      --config.data.dataset=folder:/data/flowers --workdir=workdirs/local
  # DeepMind's released ResNet-50: import it, then evaluate it like a run.
  python main.py --config=configs/byol.py:bn --workdir=/ckpt/dm_res50 \\
      --import_dm=pretrain_res50x1.pkl
  python main.py --config=configs/eval.py:dm --workdir=/ckpt/dm_res50
"""

import ml_collections

VARIANTS = ('dm', 'finetune', 'fast', 'local', 'select', '1pct', '10pct')


def get_config(arg=None):
  """Returns the locked evaluation config for the variants in `arg`."""
  variants = [a.strip() for a in (arg or '').split(',') if a.strip()]
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f'unknown eval variant {v!r}; choose from '
                       f'{", ".join(VARIANTS)}')
  c = ml_collections.ConfigDict()
  c.experiment = 'linear_eval'
  c.seed = 0
  c.mode = 'linear'  # linear | finetune | fast | lowlabel
  c.output_name = 'eval_linear'  # the results folder inside the workdir
  c.checkpoint_step = -1  # -1: the latest checkpoint of the workdir
  c.encoder = 'online'  # online | target
  c.data = ml_collections.ConfigDict()
  c.data.dataset = ''  # '' -> the pretraining run's dataset
  c.data.data_dir = ''
  c.data.image_size = -1  # -1 -> the pretraining run's image size
  c.training = ml_collections.ConfigDict()
  c.training.batch_size = 1024
  c.training.epochs = 80
  c.training.max_steps = -1
  # The base rates of the heads; () trains one head at `base_lr`.
  c.training.lr_grid = (0.4, 0.3, 0.2, 0.1, 0.05)
  c.training.base_lr = 0.2
  c.training.momentum = 0.9
  # TRAIN (selection on VALID) | TRAIN_AND_VALID (one rate, no selection).
  c.training.train_split = 'TRAIN'
  c.training.head_init = 'zeros'  # zeros | haiku (hk.Linear's default)
  c.training.log_every_steps = 100
  c.fast = ml_collections.ConfigDict()
  c.fast.l2 = 1e-4  # on the standardized features
  c.fast.iterations = 300
  c.fast.max_train_examples = -1  # > 0: fit on the first N train examples
  c.knn = ml_collections.ConfigDict()
  c.knn.k = 200
  c.knn.temperature = 0.07
  c.eval_batch_size = 1000
  # Low-label fine-tuning (mode=lowlabel; byol/evaluation/lowlabel.py).
  c.lowlabel = ml_collections.ConfigDict()
  c.lowlabel.fraction = 0.01  # of the TRAIN labels; 1: all (transfer)
  c.lowlabel.subset_seed = 0  # which images, where the subset is drawn
  c.lowlabel.lr_grid = (0.01, 0.02, 0.05, 0.1, 0.005)
  c.lowlabel.epochs_grid = (30, 50)
  if 'dm' in variants or 'finetune' in variants:
    c.output_name = 'eval_linear_dm'
    c.training.batch_size = 4096  # DeepMind's main_loop --batch_size
    c.training.lr_grid = ()
    c.training.base_lr = 0.2
    c.training.train_split = 'TRAIN_AND_VALID'
    c.training.head_init = 'haiku'
  if 'finetune' in variants:
    c.mode = 'finetune'
    c.output_name = 'eval_finetune'
  if 'fast' in variants:
    c.mode = 'fast'
    c.output_name = 'eval_fast'
  if '1pct' in variants or '10pct' in variants:
    c.mode = 'lowlabel'
    c.lowlabel.fraction = 0.1 if '10pct' in variants else 0.01
    c.output_name = 'eval_lowlabel_' + ('10pct' if '10pct' in variants
                                        else '1pct')
    c.training.lr_grid = ()
    c.training.train_split = 'TRAIN'
  if 'local' in variants:
    c.training.batch_size = 512
    c.training.epochs = 10
    c.training.log_every_steps = 50
    if c.mode == 'lowlabel':
      c.training.batch_size = 256
  c.lock()
  return c
