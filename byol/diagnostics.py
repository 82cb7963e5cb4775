"""Collapse diagnostics: how spread out a network's outputs are over a batch.

Two measures, both computed from a [N, d] matrix of features (projections or
embeddings) of N different images:

- `proj_std`: the standard deviation over the batch of the L2-normalised
  features, averaged over dimensions. Features spread uniformly on the sphere
  give about 1/sqrt(d); a collapsed network (every image mapped to one
  direction) gives 0.
- `effective_rank` (RankMe, Garrido et al. 2023): exp of the entropy of the
  singular values of the feature matrix, normalised to sum to 1. It lies in
  [1, min(N, d)]: 1 when every feature is the same vector (complete collapse),
  d when the features fill every direction equally. It also sees dimensional
  collapse (features spanning a few directions only), which `proj_std` does
  not.

During pretraining both are measured on a fixed batch of unaugmented training
images by the collapse evaluator (`byol/evaluation/collapse.py`, through
`make_diagnostics_fn`), on the schedule of the config, so that their curves
over training compare like with like.
"""

from typing import Dict, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

# Added to the normalised singular values before the log, as in RankMe.
RANKME_EPS = 1e-7


def proj_std(features: jax.Array, axis_name: Optional[str] = None) -> jax.Array:
  """Std over the (global) batch of L2-normalised features, dim-averaged.

  Args:
    features: [B, d], this device's part of the batch.
    axis_name: the pmapped axis over which the batch is split, or None.
  """
  z = features.astype(jnp.float32)
  z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, -1, keepdims=True), 1e-12))
  mean, mean_sq = jnp.mean(z, 0), jnp.mean(z * z, 0)
  if axis_name is not None:
    mean, mean_sq = jax.lax.pmean((mean, mean_sq), axis_name)
  return jnp.mean(jnp.sqrt(jnp.maximum(mean_sq - mean * mean, 0.0)))


def effective_rank(features: np.ndarray) -> float:
  """RankMe of a [N, d] feature matrix (not centred), in [1, min(N, d)]."""
  s = np.linalg.svd(np.asarray(features, np.float64), compute_uv=False)
  if s.sum() <= 0:
    return 1.0
  p = s / s.sum() + RANKME_EPS
  return float(np.exp(-np.sum(p * np.log(p))))


def make_diagnostics_fn(forward: hk.TransformedWithState, axis_name: str):
  """Returns `fn(params, state, images) -> dict of [N_global, d] features`.

  Run it under `jax.pmap(axis_name=axis_name)` with `images` split over the
  devices; every device returns the features of the whole (global) batch.
  The network runs as in training (BatchNorm on the batch's statistics); its
  state updates are discarded.
  """
  def fn(params, state, images):
    out, _ = forward.apply(params, state, None, images, True)
    return {k: jax.lax.all_gather(out[k].astype(jnp.float32), axis_name,
                                  tiled=True)
            for k in ('projection', 'embedding')}

  return fn


def summarize(features: Dict[str, np.ndarray]) -> Dict[str, float]:
  """The scalars logged for one fixed batch's projections and embeddings."""
  out = {}
  for name, short in (('projection', 'proj'), ('embedding', 'emb')):
    z = np.asarray(features[name], np.float64)
    out[f'rankme_{short}'] = effective_rank(z)
    out[f'fixed_{short}_std'] = float(proj_std(jnp.asarray(z, jnp.float32)))
  return out
