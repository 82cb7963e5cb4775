"""byol-gnws: BYOL with GroupNorm + Weight Standardization, in JAX/Haiku.

Importing the package settles how TensorFlow (used only for input pipelines
and TensorBoard) starts, before any module can import it: on CPUs where its
oneDNN kernels switch on (e.g. AVX-512), TensorFlow prints start-up lines
from C++ that `TF_CPP_MIN_LOG_LEVEL` alone does not silence, and they would
come before every `error:` line and open every run. With oneDNN off and
C++ logging at warnings and above, it starts silently. oneDNN changes no
number of ours here (the same 10-step run gives the same parameter checksum
with it on and off), and off it takes one source of CPU-dependent rounding
away. Either variable set by the user is left as it is.
"""

import os

TF_ENVIRONMENT = {
    'TF_CPP_MIN_LOG_LEVEL': '2',
    'TF_ENABLE_ONEDNN_OPTS': '0',
}

for _name, _value in TF_ENVIRONMENT.items():
  os.environ.setdefault(_name, _value)
