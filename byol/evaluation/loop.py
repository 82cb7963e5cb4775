"""What the evaluators share: data settings, the step loop, top-k accuracy.

The linear protocol (`linear.py`) and fine-tuning (`finetune.py`) both train
on random-resized-crop + flip images for a number of steps, log a line and a
metrics record every few steps, and count top-1/top-5 hits over every example
of an evaluation split (centre crops). `topk_hits` is the one top-k rule of
every evaluator (these two, the fast probe, the online classifier).

`run_steps` is a step loop of its own, apart from pretraining's
(`train_loop`): an evaluation runs a fixed number of steps from nothing, in
one go, while pretraining's loop resumes, checkpoints, stops on signals and
runs evaluators on a schedule; sharing one loop would give the evaluations
all of that to step around.
"""

import time
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from byol import dataset as dataset_lib
from byol import metrics as metrics_lib
from byol.errors import ConfigError

Printer = Callable[[str], None]
# `metrics(record)`: a record {'step': ..., scalars...} of metrics.jsonl.
MetricsFn = Callable[[Dict[str, Any]], None]


def topk_hits(logits: jax.Array, labels: jax.Array, k: int,
              mask: Optional[jax.Array] = None) -> jax.Array:
  """How many rows have their label among their k largest logits.

  Ties go to the lower class index (`lax.top_k`'s order). Works traced
  (inside jit/pmap) and on host arrays alike.

  Args:
    logits: [..., B, C] (leading axes, e.g. one per head, are kept).
    labels: [B] integers.
    k: how many of the largest logits count (at most C).
    mask: [B] weights (0 for padding examples), or None.

  Returns:
    [...] counts: the sum over the batch of (label in top k) x mask.
  """
  top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
  hit = jnp.any(top == labels[:, None], -1)
  if mask is not None:
    hit = hit * mask
  return jnp.sum(hit, -1)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of rows whose label is among their k largest scores.

  Host arrays in, a Python float out; the rule is `topk_hits`'s.
  """
  hits = topk_hits(jnp.asarray(logits), jnp.asarray(labels), k)
  return int(hits) / len(labels)


class DataSpec(NamedTuple):
  """Which images an evaluation reads.

  `subset`: positions in the training split of the only examples to train
  on (a low-label subset, `byol/evaluation/lowlabel.py`); None: all of them.
  """
  dataset: str
  image_size: int
  data_dir: Optional[str]
  subset: Optional[Tuple[int, ...]] = None


def resolve_data(config: ml_collections.ConfigDict,
                 pretrain_config: ml_collections.ConfigDict) -> DataSpec:
  """The evaluation's data: its own fields, else the pretraining run's.

  Another dataset than the pretraining run's (transfer) does not inherit
  that run's data_dir. Raises `DatasetError` for a dataset without labels.
  """
  dataset = config.data.dataset or pretrain_config.data.dataset
  image_size = (config.data.image_size if config.data.image_size > 0 else
                pretrain_config.data.image_size)
  data_dir = config.data.data_dir or None
  if dataset == pretrain_config.data.dataset:
    data_dir = data_dir or pretrain_config.data.data_dir or None
  if not dataset_lib.has_labels(dataset, data_dir):
    raise dataset_lib.DatasetError(
        f'{dataset} is unlabelled: evaluation needs labels (one subfolder '
        'per class); evaluate on another dataset with --config.data.dataset')
  return DataSpec(dataset, image_size, data_dir)


def per_device_batch(batch_size: int) -> int:
  """The per-device batch; `ConfigError` when the batch does not divide."""
  if batch_size <= 0 or batch_size % jax.device_count():
    raise ConfigError(f'training.batch_size={batch_size} is not a positive '
                      f'multiple of the {jax.device_count()} devices')
  return batch_size // jax.device_count()


def train_input(data: DataSpec, split, batch_size: int,
                seed: int) -> Iterator[Dict[str, np.ndarray]]:
  """Augmented (crop + flip) training batches, [local devices, per device]."""
  return dataset_lib.load(
      split, preprocess_mode=dataset_lib.PreprocessMode.LINEAR_TRAIN,
      batch_dims=[jax.local_device_count(), per_device_batch(batch_size)],
      dataset=data.dataset, image_size=data.image_size,
      data_dir=data.data_dir, seed=seed, deterministic=True,
      subset=data.subset)


def run_steps(step_fn: Callable[[Any, Dict[str, np.ndarray]],
                                Tuple[Any, Any]],
              carry: Any, inputs: Iterator, *, steps: int, batch_size: int,
              log_every: int, tag: str, printer: Printer,
              record: Callable[[int, np.ndarray], Dict[str, Any]],
              metrics: Optional[MetricsFn] = None) -> Any:
  """Runs `carry, loss = step_fn(carry, batch)` `steps` times; returns carry.

  Every `log_every` steps (and after the last) prints the loss of each head
  (`loss` is pmapped: its first replica is read), warns of non-finite
  losses, and passes `record(step, loss)` with the image rate to `metrics`.
  """
  if log_every <= 0:
    raise ConfigError(f'training.log_every_steps must be positive, got '
                      f'{log_every}')
  t0 = time.time()
  for step in range(steps):
    carry, loss = step_fn(carry, next(inputs))
    done = step + 1
    if done % log_every and done != steps:
      continue
    loss = np.atleast_1d(np.asarray(loss)[0])
    if not np.all(np.isfinite(loss)):
      printer(f'[{tag}] warning: non-finite loss at step {done}: {loss}')
    rate = done * batch_size / max(time.time() - t0, 1e-9)
    eta = (steps - done) * batch_size / max(rate, 1e-9)
    printer(f'[{tag}] step {done}/{steps}  loss '
            f'{" ".join(f"{l:.4f}" for l in loss)}  {rate:.0f} img/s  '
            f'ETA {metrics_lib.format_duration(eta)}')
    if metrics is not None:
      metrics({'step': done, 'images_per_sec': rate, **record(step, loss)})
  return carry


def count_hits(eval_fn: Callable[..., Tuple[Any, Any, Any]], data: DataSpec,
               split, batch_size: int) -> Tuple[np.ndarray, np.ndarray, int]:
  """Sums `eval_fn(images, labels, mask) -> (hits1, hits5, count)` over split.

  `eval_fn` is pmapped and psums over devices; every example of the split
  is visited once (padding examples have mask 0).

  Returns:
    (top-1 accuracy, top-5 accuracy, number of examples); the accuracies
    have the shape of `eval_fn`'s hit counts (e.g. one per head).
  """
  hits1 = hits5 = count = 0
  for batch in dataset_lib.load(
      split, preprocess_mode=dataset_lib.PreprocessMode.EVAL,
      batch_dims=[jax.local_device_count(), per_device_batch(batch_size)],
      dataset=data.dataset, image_size=data.image_size,
      data_dir=data.data_dir):
    h1, h5, c = eval_fn(batch['images'], batch['labels'],
                        batch['mask'].astype(np.float32))
    hits1 = hits1 + np.asarray(h1)[0]
    hits5 = hits5 + np.asarray(h5)[0]
    count += float(np.asarray(c)[0])
  return hits1 / count, hits5 / count, int(count)
