#!/usr/bin/env bash
# The start button: set up the environment if missing, build the tiny task (cached), run SPIN rounds.
# Any key=value override is passed through, e.g. ./run_spin.sh algorithm.mode=online_dpo rollout.n=4
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh
VENV=${SPINLM_VENV:-.venv}
"$VENV/bin/spinlm" task build --output "${SPINLM_TINY_DIR:-.cache/tiny_task}"
exec "$VENV/bin/spinlm" train preset=tiny "$@"
