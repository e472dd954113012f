#!/usr/bin/env bash
# The test command: set up the environment if missing, then run the whole suite (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh
VENV=${SPINLM_VENV:-.venv}
exec "$VENV/bin/python" -m pytest -q "$@"
