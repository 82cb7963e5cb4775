"""Atomic, resumable, multi-host-safe checkpoints without pickle.

One checkpoint is one file, `<directory>/ckpt_<step>.npz`: an uncompressed zip
holding every leaf of the state pytree as a `.npy` member, and a
`checkpoint.json` member that records, per leaf, its tree path, shape, dtype and
the SHA-256 of its member, together with the step and the caller's metadata.

Why these choices:
  * Atomic: the file is written as `ckpt_<step>.npz.tmp-<pid>`, fsynced, then
    renamed over the final name with `os.replace` (and the directory fsynced).
    A run killed mid-write leaves only a `.tmp-` file, which readers never look
    at, so the previous checkpoint stays the latest one.
  * Safe to read: arrays are loaded with `allow_pickle=False`; the per-leaf
    checksum catches corrupt or truncated files, and comparing the stored
    paths and shapes with a `target` pytree catches a checkpoint of another
    architecture. Both raise `CheckpointError` with a one-line message.
  * Multi-host: every process calls `save`; only process 0 writes, then all
    processes meet at a barrier so none reads a checkpoint still being
    written. All processes read the same (shared) directory.
  * orbax-checkpoint was measured as an alternative and is as fast here, but it
    restored a bit-flipped array without complaint and restored an array of
    another shape than the target's silently, so it would have needed these
    checks on top of it anyway.

The leaves are keyed by `jax.tree_util.keystr` of their path, e.g.
".online_params['res_net50/~/initial_conv']['w']"; NamedTuples (the training
state, optax states) appear as attribute names.
"""

import errno
import hashlib
import io
import json
import os
import re
import zipfile

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from byol.errors import UserError

_FORMAT = 'byol-gnws-checkpoint/1'
_INDEX = 'checkpoint.json'
_NAME = re.compile(r'^ckpt_(\d+)\.npz$')
_TMP = re.compile(r'^ckpt_\d+\.npz\.tmp-(\d+)$')
# What a user can do about a damaged checkpoint file.
_REMEDY = 'delete it to fall back on an earlier checkpoint (or a fresh start)'


class CheckpointError(UserError, ValueError):
  """A checkpoint is missing, corrupt, or does not fit the requested state."""


def _file_name(step):
  return f'ckpt_{step}.npz'


def _json_default(value):
  """Lets metadata hold NumPy/JAX scalars and small arrays."""
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  raise TypeError(f'metadata value {value!r} is not JSON serialisable')


def _is_key_array(leaf):
  dtype = getattr(leaf, 'dtype', None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_signature(leaf):
  """(shape, dtype name) of a leaf: array, ShapeDtypeStruct or scalar."""
  dtype = getattr(leaf, 'dtype', None)
  if dtype is None:
    dtype = np.asarray(leaf).dtype
  if not _is_key_array(leaf):
    dtype = np.dtype(dtype)
  return tuple(np.shape(leaf)), str(dtype)


def _to_storable(leaf):
  """A host NumPy copy of `leaf`, and its index entry fields."""
  shape, dtype = _leaf_signature(leaf)
  fields = {'shape': list(shape), 'dtype': dtype}
  if _is_key_array(leaf):
    # Typed PRNG keys are stored as their raw key data.
    fields['key_impl'] = str(jax.random.key_impl(leaf))
    return np.asarray(jax.random.key_data(leaf)), fields
  array = np.asarray(jax.device_get(leaf))
  if np.dtype(array.dtype.str) != array.dtype:
    # bfloat16 and friends (ml_dtypes): store the raw bits as unsigned ints,
    # since .npy files cannot name these types.
    array = array.view(f'u{array.dtype.itemsize}')
  return array, fields


def _from_storable(array, entry):
  if 'key_impl' in entry:
    return jax.random.wrap_key_data(array, impl=entry['key_impl'])
  dtype = jnp.dtype(entry['dtype'])
  if array.dtype != dtype:
    array = array.view(dtype)
  if array.shape != tuple(entry['shape']):
    raise ValueError(f'{entry["path"]} has shape {array.shape}, index says '
                     f'{entry["shape"]}')
  return array


def _npy_bytes(array):
  buffer = io.BytesIO()
  np.lib.format.write_array(buffer, array,
                            allow_pickle=False)
  return buffer.getvalue()


class Checkpointer:
  """Saves and restores pytrees of arrays in `directory`, keeping the last N.

  Usage:
    ckpt = Checkpointer(workdir, keep=3)
    ckpt.save(step, state, {'step': step, 'config': fingerprint})
    if ckpt.latest_step() is not None:
      state, metadata = ckpt.restore(target=state)
  """

  def __init__(self, directory, *, keep=3):
    """Args: directory, created on first save; keep: how many of the newest
    checkpoints survive each save (None keeps all)."""
    if keep is not None and keep < 1:
      raise ValueError(f'keep must be >= 1 or None, got {keep}')
    self._directory = os.fspath(directory)
    self._keep = keep

  @property
  def directory(self):
    return self._directory

  def steps(self):
    """Steps of the complete checkpoints in the directory, ascending."""
    try:
      names = os.listdir(self._directory)
    except FileNotFoundError:
      return []
    except NotADirectoryError:
      raise CheckpointError(f'{self._directory} is a file, not the folder of '
                            'checkpoints; move it aside') from None
    return sorted(int(m.group(1)) for m in map(_NAME.match, names) if m)

  def latest_step(self):
    """The newest checkpointed step, or None when there is none."""
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step, state, metadata=None):
    """Writes `state` (a pytree of arrays) and JSON `metadata` for `step`.

    Call it on every process with the same arguments: process 0 writes, the
    others wait until the file is in place. Pass host-side or unreplicated
    arrays (under pmap, take one replica first).

    Args:
      step: the global step, a non-negative int; names the file.
      state: a pytree of arrays (jax or numpy), e.g. the training NamedTuple.
      metadata: a JSON-serialisable dict (NumPy scalars/arrays allowed).

    Returns:
      The path of the checkpoint file.
    """
    step = int(step)
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    path = os.path.join(self._directory, _file_name(step))
    if jax.process_index() == 0:
      self._write(step, state, dict(metadata or {}), path)
      self._prune()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'byol_checkpoint_{step}')
    return path

  def _write(self, step, state, metadata, path):
    os.makedirs(self._directory, exist_ok=True)
    leaves_with_paths = jax.tree_util.tree_flatten_with_path(state)[0]
    tmp_path = f'{path}.tmp-{os.getpid()}'
    index = {'format': _FORMAT, 'step': step, 'metadata': metadata,
             'leaves': []}
    try:
      with open(tmp_path, 'wb') as f:
        with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED,
                             allowZip64=True) as zf:
          for i, (key_path, leaf) in enumerate(leaves_with_paths):
            array, fields = _to_storable(leaf)
            data = _npy_bytes(array)
            member = f'leaf_{i}.npy'
            zf.writestr(member, data)
            index['leaves'].append({
                'path': jax.tree_util.keystr(key_path),
                'member': member,
                **fields,
                'sha256': hashlib.sha256(data).hexdigest(),
            })
          # The index goes last: a file without it is incomplete.
          zf.writestr(_INDEX, json.dumps(index, default=_json_default,
                                         indent=1))
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp_path, path)
    except BaseException as e:
      if os.path.exists(tmp_path):
        os.remove(tmp_path)
      if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        last = self.latest_step()
        kept = (f'the checkpoint of step {last} stays the newest'
                if last is not None else 'no checkpoint was written')
        raise CheckpointError(
            f'the disk is full: no space left to write the checkpoint of step '
            f'{step} in {self._directory}; {kept}; free space and rerun the '
            'same command to resume') from None
      raise
    _fsync_directory(self._directory)

  def _prune(self):
    """Keeps the newest `keep` checkpoints and removes stray temporary files."""
    steps = self.steps()
    doomed = steps[:-self._keep] if self._keep else []
    for step in doomed:
      _remove(os.path.join(self._directory, _file_name(step)))
    for name in os.listdir(self._directory):
      # Left behind by a killed writer: ours (the pid may be ours again, e.g.
      # pid 1 in a restarted container; our own file in flight has just been
      # renamed) or a process that has ended. A living process's file is
      # its write in flight, whoever it is.
      match = _TMP.match(name)
      if match and not _alive(int(match.group(1))):
        _remove(os.path.join(self._directory, name))

  def restore(self, step=None, *, target=None):
    """Reads a checkpoint.

    Args:
      step: the step to read; None reads the latest.
      target: a pytree with the structure, shapes and dtypes of the saved state
        (arrays or `jax.ShapeDtypeStruct`s, e.g. a freshly initialised state).
        None returns a flat dict {leaf path: array} instead.

    Returns:
      (state, metadata): `state` has the structure of `target` with NumPy
      array leaves (PRNG key leaves come back as JAX key arrays); `metadata`
      is the dict given to `save`.

    Raises:
      CheckpointError: no checkpoint (at `step`), a corrupt or truncated file,
        or a saved state whose paths/shapes/dtypes differ from `target`'s.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise CheckpointError(f'no checkpoint found in {self._directory}')
    path = os.path.join(self._directory, _file_name(int(step)))
    if not os.path.exists(path):
      raise CheckpointError(f'no checkpoint for step {step} in '
                            f'{self._directory} (have: {self.steps()})')
    try:
      with zipfile.ZipFile(path, 'r') as zf:
        try:
          index = json.loads(zf.read(_INDEX))
        except ValueError as e:  # not JSON, or not UTF-8
          raise CheckpointError(
              f'{path} is corrupt: its index {_INDEX} is unreadable '
              f'({str(e).splitlines()[0]}); {_REMEDY}') from None
        if not isinstance(index, dict) or index.get('format') != _FORMAT:
          raise CheckpointError(f'{path} is not a checkpoint of this format; '
                                f'{_REMEDY}')
        if target is not None:
          _check_structure(index['leaves'], target, path)
        arrays = []
        for entry in index['leaves']:
          data = zf.read(entry['member'])
          if hashlib.sha256(data).hexdigest() != entry['sha256']:
            raise CheckpointError(f'{path} is corrupt: checksum mismatch for '
                                  f'{entry["path"]}; {_REMEDY}')
          array = np.lib.format.read_array(io.BytesIO(data),
                                           allow_pickle=False)
          arrays.append(_from_storable(array, entry))
    except CheckpointError:
      raise
    except (OSError, EOFError, KeyError, TypeError, ValueError,
            zipfile.BadZipFile) as e:
      message = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise CheckpointError(f'{path} is corrupt or truncated: {message}; '
                            f'{_REMEDY}') from e
    if target is None:
      state = {e['path']: a for e, a in zip(index['leaves'], arrays)}
    else:
      state = jax.tree_util.tree_unflatten(
          jax.tree_util.tree_structure(target), arrays)
    return state, index['metadata']


def _check_structure(entries, target, path):
  """Raises CheckpointError naming the first leaf where `target` differs."""
  target_leaves = jax.tree_util.tree_flatten_with_path(target)[0]
  for i, (key_path, leaf) in enumerate(target_leaves):
    want = jax.tree_util.keystr(key_path)
    if i >= len(entries):
      raise CheckpointError(f'{path} does not match the model: it has no '
                            f'{want} (saved state has {len(entries)} leaves, '
                            f'model {len(target_leaves)})')
    entry = entries[i]
    if entry['path'] != want:
      raise CheckpointError(f'{path} does not match the model: saved leaf '
                            f'{entry["path"]} where the model has {want}')
    shape, dtype = _leaf_signature(leaf)
    saved = (tuple(entry['shape']), entry['dtype'])
    if saved != (shape, dtype):
      raise CheckpointError(
          f'{path} does not match the model at {want}: saved '
          f'{saved[1]}{list(saved[0])}, model {dtype}{list(shape)}')
  if len(entries) > len(target_leaves):
    raise CheckpointError(f'{path} does not match the model: saved leaf '
                          f'{entries[len(target_leaves)]["path"]} is not in '
                          f'the model')


def _alive(pid):
  """Whether another process `pid` runs on this machine (ours counts as not:
  a file of ours that is not in flight is debris)."""
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's process
  except OverflowError:
    return False
  return True


def _remove(path):
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def _fsync_directory(directory):
  """Makes the rename itself durable (POSIX; a no-op where unsupported)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
