"""Linear evaluation of a pretraining run's frozen online encoder.

`--workdir` is the pretraining workdir; results go to
`<workdir>/eval_linear/`, `eval_linear_select/` or `eval_fast/`
(`summary.json` with top-1 and top-5, `config.json`, and for the linear
protocol `metrics.jsonl`). Variants (comma-separated):

  (default)  DeepMind's protocol: SGD + Nesterov 0.9, no weight decay,
             lr = base_lr * batch/256 with cosine decay, 80 epochs, batch 1024,
             random-resized-crop + flip on the training images, centre crop
             for the test images; one linear head per learning rate in
             `lr_grid`, trained side by side on the same frozen features;
             the head best on TEST is reported (optimistic: see `select`).
  select     pick the learning rate on VALID after training on TRAIN (the
             paper's protocol), then report that head's TEST accuracy.
  fast       a different, quicker protocol: encode every image once without
             augmentation and fit a multinomial logistic regression (L-BFGS)
             on the cached features; also reports kNN (cosine, k=200,
             votes weighted by exp(similarity / 0.07)). Its numbers are not
             comparable with the linear protocol's.
  local      the CPU scale: 10 epochs, batch 512 (for Fashion-MNIST runs).

Commands:

  python main.py --config=configs/eval.py --workdir=/tmp/byol_gnws
  python main.py --config=configs/eval.py:select --workdir=/tmp/byol_gnws
  python main.py --config=configs/eval.py:local,fast --workdir=workdirs/local
"""

import ml_collections

VARIANTS = ('select', 'fast', 'local')


def get_config(arg=None):
  """Returns the locked linear-evaluation config for the variants in `arg`."""
  variants = [a.strip() for a in (arg or '').split(',') if a.strip()]
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f'unknown eval variant {v!r}; choose from '
                       f'{", ".join(VARIANTS)}')
  c = ml_collections.ConfigDict()
  c.experiment = 'linear_eval'
  c.seed = 0
  c.mode = 'fast' if 'fast' in variants else 'linear'  # linear | fast
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
  c.training.base_lr = 0.2
  c.training.lr_grid = (0.4, 0.3, 0.2, 0.1, 0.05)
  c.training.momentum = 0.9
  c.training.select_on_valid = 'select' in variants
  c.training.log_every_steps = 100
  c.fast = ml_collections.ConfigDict()
  c.fast.l2 = 1e-4  # on the standardized features
  c.fast.iterations = 300
  c.fast.max_train_examples = -1  # > 0: fit on the first N train examples
  c.knn = ml_collections.ConfigDict()
  c.knn.k = 200
  c.knn.temperature = 0.07
  c.eval_batch_size = 1000
  if 'local' in variants:
    c.training.batch_size = 512
    c.training.epochs = 10
    c.training.log_every_steps = 50
  c.lock()
  return c
