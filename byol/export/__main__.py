r"""Export a pretraining run's encoder for PyTorch and TensorFlow.

  python -m byol.export --workdir=W --format=torch|savedmodel|all --out=DIR \
      [--encoder=online|target] [--checkpoint_step=N] [--heads] [--overwrite]

torch: DIR/encoder.safetensors (torchvision names), DIR/encoder.json (how to
build the module), DIR/torch_resnet.py (the module; needs only torch).
savedmodel: DIR/savedmodel/, serving signature float32 images in [0, 1] ->
embedding. See docs/export.md. Bad input (no checkpoint, unknown format, a
normalization without a torch layer, an existing DIR) ends with one `error:`
line and exit status 2.
"""

import re
import sys

from absl import app
from absl import flags
from absl import logging

from byol.errors import UserError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A pretraining workdir (or '
                               'one made by main.py --import_dm).')
_OUT = flags.DEFINE_string('out', None, 'The export folder (must not exist '
                           'unless --overwrite).')
_FORMAT = flags.DEFINE_string('format', None, 'torch, savedmodel or all.')
_ENCODER = flags.DEFINE_string('encoder', 'online', 'online or target.')
_STEP = flags.DEFINE_integer('checkpoint_step', -1, 'Checkpoint step; -1: '
                             'the latest.')
_HEADS = flags.DEFINE_bool('heads', False, 'Also export the projector and '
                           'predictor.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing '
                               '--out.')


def fail(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    fail(re.sub(r'^\w+(Error|Exception): ', '', lines[0]))
  return None


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value:
    fail('--workdir is required')
  if not _OUT.value:
    fail('--out is required')
  if not _FORMAT.value:
    fail('--format is required: torch, savedmodel or all')
  logging.set_verbosity(logging.ERROR)
  # Imported after the flags: a flag error comes back without loading JAX/TF.
  from byol.export import exporter  # pylint: disable=g-import-not-at-top
  try:
    exporter.export(
        _WORKDIR.value, _OUT.value, _FORMAT.value, encoder=_ENCODER.value,
        checkpoint_step=None if _STEP.value < 0 else _STEP.value,
        heads=_HEADS.value, overwrite=_OVERWRITE.value)
  except UserError as e:
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
