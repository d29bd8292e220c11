#!/usr/bin/env bash
# The test command: sets up .venv, lints with ruff and type-checks models/ and sharding/ with mypy (config of
# both in pyproject.toml), then runs the CPU test suite. Extra arguments go to pytest. pytest's exit code 5
# ("no tests ran") is turned into a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
.venv/bin/ruff check . || { echo "error: ruff found problems (see above; 'ruff check --fix .' fixes many)" >&2; exit 1; }
.venv/bin/mypy || { echo "error: mypy found type errors in models/ or sharding/ (see above)" >&2; exit 1; }
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
