#!/usr/bin/env bash
# byol-gnws: set-up, then one of
#   ./run.sh                 the main job: GN+WS BYOL on Fashion-MNIST, then linear probes
#   ./run.sh test [ARGS]     the test suite (ARGS go to pytest)
#   ./run.sh ablation [--full]  the paper's ablation table at CPU scale
#   ./run.sh bench [ARGS]    throughput benchmarks (experiments/benchmark.py)
# Each verb first creates .venv, installs requirements.txt and, when it is missing and
# this user may install packages, Debian's dataset-fashion-mnist; then builds the oneDNN
# convolution (byol/ops/, into build/onednn/) when it is out of date.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
FMNIST_DIR=${BYOL_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}

say() { echo "[run.sh] $*" >&2; }

setup_python() {
  # Each requirements file named is installed when its content changed since
  # the last install (one sha256 stamp per file): requirements.txt always,
  # requirements-test.txt for the tests.
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
  fi
  local file stamp want
  for file in requirements.txt "$@"; do
    stamp="$VENV/.${file%.txt}.sha256"
    want=$(sha256sum "$file" | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
      say "installing $file into $VENV (a few minutes the first time)"
      "$VENV/bin/python" -m pip install --quiet --upgrade pip
      # -c: a test dependency may not move a pinned runtime one.
      "$VENV/bin/python" -m pip install --quiet -r "$file" -c requirements.txt
      echo "$want" > "$stamp"
    fi
  done
}

setup_dataset() {
  if [ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    return
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
      sudo="sudo -n"
    else
      say "Fashion-MNIST is not in $FMNIST_DIR and this user cannot install packages."
      say "Ask an administrator for 'apt-get install dataset-fashion-mnist', or set"
      say "BYOL_FASHION_MNIST_DIR to a folder with the four idx .gz files."
      return
    fi
  fi
  say "installing Debian's dataset-fashion-mnist (offline Fashion-MNIST)"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
}

setup_native() {
  # byol/ops/onednn_conv.cc -> build/onednn/ (model.encoder.conv_impl='onednn');
  # rebuilt when its source, jaxlib or oneDNN changes, else a no-op.
  if ! command -v "${CXX:-g++}" >/dev/null; then
    if [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; then
      local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
      say "installing Debian's g++ (to build the oneDNN convolution)"
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq g++ >/dev/null
    fi
  fi
  if ! "$VENV/bin/python" -m byol.ops.build_onednn >&2; then
    say "the oneDNN convolution is not built: conv_impl='onednn' will say why"
  fi
}

setup() {
  setup_python "$@"
  setup_dataset
  setup_native
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
}

verb=${1:-main}
[ $# -gt 0 ] && shift

case "$verb" in
  main)
    setup
    WORKDIR=${WORKDIR:-workdirs/local}
    say "main job: GN+WS BYOL pretraining on Fashion-MNIST, then linear probes; workdir $WORKDIR"
    exec "$VENV/bin/python" main.py --config=configs/byol.py:local --workdir="$WORKDIR" \
        --probe "$@"
    ;;
  test)
    setup requirements-test.txt
    say "running the test suite on 2 workers"
    # pytest.ini names tests/ as the test path; arguments narrow it (and a
    # later -n overrides this one: -n 0 runs in one process). loadgroup keeps
    # the tests that share one main.py reference run on one worker.
    exec "$VENV/bin/python" -m pytest -q -n 2 --dist loadgroup "$@"
    ;;
  ablation)
    setup
    say "ablation table (quick subset; --full for every row)"
    exec "$VENV/bin/python" -m experiments.ablation "$@"
    ;;
  bench)
    setup
    say "throughput benchmarks"
    exec "$VENV/bin/python" -m experiments.benchmark "$@"
    ;;
  *)
    echo "error: unknown verb '$verb' (use: ./run.sh [test|ablation|bench])" >&2
    exit 2
    ;;
esac
