#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs the project with the tested versions from constraints.txt.
# torch is installed first and pinned: a bare `torch` requirement in a fresh environment would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,triton]"
