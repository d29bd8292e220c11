#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv, then runs `cscctrl demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/cscctrl demo "$@"
