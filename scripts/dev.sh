#!/usr/bin/env bash
# One entry point for a fresh machine:  bash scripts/dev.sh tour | test [pytest args...]
# Creates/refreshes .venv, installs torch==2.13.0 first when torch is not importable (a bare
# "torch" would pull a multi-GB CUDA build), then torchmagic with its test extra.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-test}"; shift || true
PY="${PYTHON:-python3}"
VENV=.venv
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[dev] installing torch==2.13.0 (CPU build)"
  "$VENV/bin/pip" install -q torch==2.13.0
fi
stamp="$VENV/.torchmagic-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[dev] installing torchmagic[test]"
  "$VENV/bin/pip" install -q -e ".[test]"
  touch "$stamp"
fi

case "$cmd" in
  tour)
    exec "$VENV/bin/python" examples/tour.py
    ;;
  test)
    # The browser test drives Debian's Chromium (never a downloaded browser).
    if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      echo "[dev] installing chromium (apt)"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
    fi
    "$VENV/bin/ruff" check torchmagic tests benchmarks examples
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  bench)
    exec "$VENV/bin/python" benchmarks/run.py "$@"
    ;;
  *)
    echo "usage: bash scripts/dev.sh tour|test|bench" >&2; exit 2
    ;;
esac
