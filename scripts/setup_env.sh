#!/usr/bin/env bash
# Create the virtual environment if it is missing. torch is installed FIRST and pinned, so that no other
# package pulls a different (multi-GB CUDA) build; override with SPINLM_TORCH="torch==X --index-url ...".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPINLM_VENV:-.venv}
if [ ! -f "$VENV/.spinlm-ready" ]; then
  echo "setting up $VENV (first run only, about 2 minutes)..."
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check ${SPINLM_TORCH:-torch==2.13.0}
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[test,ray]"
  touch "$VENV/.spinlm-ready"
fi
