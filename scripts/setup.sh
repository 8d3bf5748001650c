#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with everything the demo and the tests need.
# torch is pinned to the CPU build 2.13.0 (a looser pin pulls GBs of CUDA packages); PySide6 6.12.0 crashes
# Python 3.11, hence the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.iterreg-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -m pip install --quiet "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -m pip install --quiet -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
    .venv/bin/python -c "import torch, SimpleITK, monai, iterreg" 
    rm -f .venv/.iterreg-setup-*
    touch "$stamp"
fi
