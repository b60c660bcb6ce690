#!/usr/bin/env bash
# CI: run an SMTM .tflite with the host runtime in a virtualenv that holds only
# numpy and ai-edge-litert (the versions pyproject.toml pins): no TensorFlow,
# no Keras. Usage: bash .ci/runtime_only.sh MODEL.tflite
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-runtime-only
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q numpy==2.4.6 ai-edge-litert==2.3.0
fi
PYTHONPATH="$PWD" "$venv/bin/python" .ci/runtime_only_check.py "$1"
