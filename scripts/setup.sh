#!/usr/bin/env bash
# Create .venv and install cscctrl with its test dependencies. Idempotent: a second run only
# re-checks. Used by scripts/demo.sh and scripts/test.sh; safe to run by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CSCCTRL_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtualenv $VENV"
    "$PY" -m venv "$VENV"
fi
# Run a command, hiding pip's notes about unused local index folders; keeps the command's exit status.
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

# Re-install only when the project's dependency list changed since the last successful install.
stamp="$VENV/.cscctrl-installed"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing torch (CPU build 2.13.0 unless a torch is already installed)"
    "$VENV/bin/python" -c "import torch" 2>/dev/null || quiet "$VENV/bin/pip" install -q torch==2.13.0
    echo "[setup] installing cscctrl[dev] (editable)"
    quiet "$VENV/bin/pip" install -q -e ".[dev]"
    echo "$want" > "$stamp"
fi

# Real Fashion-MNIST photos from Debian (used by the Fashion-MNIST source and its tests).
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        echo "[setup] apt-get install dataset-fashion-mnist"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
            || echo "[setup] warning: could not install dataset-fashion-mnist; its tests will be skipped"
    else
        echo "[setup] note: run 'sudo apt-get install dataset-fashion-mnist' for the Fashion-MNIST source"
    fi
fi
