#!/usr/bin/env bash
# Create the virtual environment if it is missing. torch is installed FIRST and pinned, so that no other
# package pulls a different (multi-GB CUDA) build; override with SPINLM_TORCH="torch==X --index-url ...".
# The marker holds pyproject.toml's hash: after a change of dependencies the project is installed again.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SPINLM_VENV:-.venv}
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$VENV/.spinlm-ready" ]; then
  echo "setting up $VENV (first run only, about 2 minutes)..."
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check ${SPINLM_TORCH:-torch==2.13.0}
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[test,ray]"
  echo "$WANT" > "$VENV/.spinlm-ready"
elif [ "$(cat "$VENV/.spinlm-ready")" != "$WANT" ]; then
  echo "pyproject.toml changed: updating $VENV..."
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[test,ray]"
  echo "$WANT" > "$VENV/.spinlm-ready"
fi
