#!/usr/bin/env bash
# The test command: set up the environment if missing, then run the whole suite (about 7 minutes on 2 cores).
# Two pytest workers (SPINLM_TEST_WORKERS), one test file each at a time (its module fixtures built once): most
# tests wait on a subprocess or Python imports, so two of them share 2 cores well.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh
VENV=${SPINLM_VENV:-.venv}
exec "$VENV/bin/python" -m pytest -q -n "${SPINLM_TEST_WORKERS:-2}" --dist loadfile "$@"
