"""main.py in which every process reads its slice of one shared data stream.

Test helper for tests/test_scaling.py. `byol.dataset.load` normally gives each
process its own shard of the dataset, so a 2-process run and a 1-process run
see different global batches. Here every process reads the stream that a
single process would read (`process_index=0, process_count=1`, the batch of
all processes) and keeps its own rows of it, so any process layout sees the
same global batch and results can be compared across layouts.

  python tests/same_data_main.py <main.py's flags>
"""

# pylint: disable=g-import-not-at-top,wrong-import-position,protected-access
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main  # first: it quiets TensorFlow before anything imports it
from absl import app

from byol import dataset

_load = dataset.load


def _load_slice(split, *, batch_dims, process_index=None, process_count=None,
                **kwargs):
  if process_index is not None or process_count is not None:
    # The caller chose the shard itself (e.g. the BN-init batch).
    return _load(split, batch_dims=batch_dims, process_index=process_index,
                 process_count=process_count, **kwargs)
  import jax
  count, index = jax.process_count(), jax.process_index()
  local = batch_dims[0]
  stream = _load(split, batch_dims=[local * count] + list(batch_dims[1:]),
                 process_index=0, process_count=1, **kwargs)
  return ({k: v[index * local:(index + 1) * local] for k, v in batch.items()}
          for batch in stream)


dataset.load = _load_slice

if __name__ == '__main__':
  app.run(main.main, flags_parser=main._parse_flags)
