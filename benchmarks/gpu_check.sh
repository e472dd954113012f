#!/usr/bin/env bash
# The prepared device check (one GPU, one process, a few minutes): a Qwen2.5-0.5B-shaped model with random weights
# through a few SPIN steps with the hf engine; prints rollout and update tokens/s, MFU, peak GPU memory, and the same
# update through TRL's DPOTrainer when TRL's wheels are there. Needs torch + transformers; the small pure-Python
# packages it lacks (omegaconf, trl, datasets, ...) are installed from a folder of wheels, never from the network.
#
#   benchmarks/gpu_check.sh --download-wheels [DIR]   # here, with network: fetch the wheels (default .cache/gpu_wheels)
#   benchmarks/gpu_check.sh [gpu_check.py options]     # on the GPU machine (carry .cache/gpu_wheels along)
#   benchmarks/gpu_check.sh --tiny                     # the same path at CPU size, anywhere
set -euo pipefail
cd "$(dirname "$0")/.."
# The project's virtual environment when there is one (a clone where ./run_tests.sh or ./run_spin.sh ran), else the
# machine's python3 (the GPU machine, which has torch and transformers but no .venv); PYTHON=... overrides both.
VENV=${SPINLM_VENV:-.venv}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$VENV/bin/python" ]; then PY=$VENV/bin/python
else PY=python3
fi
WHEELS=${SPINLM_GPU_WHEELS:-.cache/gpu_wheels}
# omegaconf for spinlm's config (trl and datasets, for the comparison, are installed with what they lack)
CORE=(omegaconf antlr4-python3-runtime PyYAML)

if [ "${1:-}" = "--download-wheels" ]; then
  dest=${2:-$WHEELS}
  mkdir -p "$dest"
  # the GPU machine runs Python 3.12 on x86-64 Linux; --no-deps: only what it lacks, pinned to what works here
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$dest" omegaconf==2.3.1 PyYAML trl==1.16.0 datasets==5.2.0 dill multiprocess xxhash fsspec pandas psutil
  # datasets 5.2 needs pyarrow >= 24: for a machine with an older pyarrow, pip falls back to these (pip resolves
  # over the folder, so two versions of a package there are fine)
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$dest" \
    datasets==4.8.0 fsspec==2026.2.0
  # antlr4's runtime (omegaconf's parser) is published as a source package only: build its pure-Python wheel
  "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$dest" antlr4-python3-runtime==4.9.3
  du -sh "$dest"
  exit 0
fi

missing() { for m in "$@"; do "$PY" -c "import $m" 2>/dev/null || echo "$m"; done; }
install_from_wheels() {  # only packages that do not import yet; pip keeps what is installed when it satisfies
  [ -d "$WHEELS" ] || return 1
  "$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" "$@"
}
if [ -n "$(missing omegaconf)" ]; then
  install_from_wheels "${CORE[@]}" || { echo "gpu_check: omegaconf is missing and $WHEELS has no wheels for it" >&2; exit 2; }
fi
if [ -n "$(missing trl datasets)" ]; then
  install_from_wheels trl datasets || echo "gpu_check: TRL is not installable from $WHEELS: its comparison is skipped"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
