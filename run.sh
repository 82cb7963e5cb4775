#!/usr/bin/env bash
# byol-gnws: set-up, then one of
#   ./run.sh                 the main job: GN+WS BYOL on Fashion-MNIST, then linear probes
#   ./run.sh test [ARGS]     the test suite (ARGS go to pytest)
#   ./run.sh ablation [--full]  the paper's ablation table at CPU scale
#   ./run.sh bench [ARGS]    throughput benchmarks (experiments/benchmark.py)
# Each verb first creates .venv, installs requirements.txt and, when it is missing and
# this user may install packages, Debian's dataset-fashion-mnist.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
FMNIST_DIR=${BYOL_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}

say() { echo "[run.sh] $*" >&2; }

# setup_python [FILE...]: the requirement files to install (default
# requirements.txt); the stamp holds the hash of all of them, so that a change
# to any one (or another set of files) installs again.
setup_python() {
  local reqs=("$@")
  [ ${#reqs[@]} -gt 0 ] || reqs=(requirements.txt)
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.requirements.sha256"
  local want
  want=$(cat "${reqs[@]}" | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing ${reqs[*]} into $VENV (a few minutes the first time)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    local args=()
    for r in "${reqs[@]}"; do args+=(-r "$r"); done
    "$VENV/bin/python" -m pip install --quiet "${args[@]}"
    echo "$want" > "$stamp"
  fi
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

setup() {
  setup_python "$@"
  setup_dataset
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
    setup requirements.txt requirements-test.txt
    say "running the test suite"
    # pytest.ini names tests/ as the test path; arguments narrow it.
    exec "$VENV/bin/python" -m pytest -q "$@"
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
