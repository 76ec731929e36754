#!/usr/bin/env bash
# The project's two entry points on a fresh machine:
#   bash run.sh demo   -> set up .venv (first time) and run the demo on the zoo's models
#   bash run.sh test   -> set up .venv (first time) and run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MMSKIP_VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.mmskip-installed" ] || [ pyproject.toml -nt "$VENV/.mmskip-installed" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    # torch first, pinned, from the machine's local disk (a CUDA build that also runs on CPU)
    "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
    "$VENV/bin/pip" install -q -e ".[dev]"
    touch "$VENV/.mmskip-installed"
  fi
}

case "${1:-}" in
  demo) setup; shift; exec "$VENV/bin/python" apps/demo.py "$@" ;;
  # one worker per core (each test runs torch on one thread)
  test) setup; shift; exec "$VENV/bin/python" -m pytest -q -n auto "$@" ;;
  *) echo "usage: bash run.sh {demo|test} [args]" >&2; exit 2 ;;
esac
