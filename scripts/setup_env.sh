#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment .venv from the project's own files:
# CPU torch, then the package itself (building the native CPU extension) with the mlx, coreml and dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=23" "setuptools>=70" wheel
# The CPU build of torch (a local wheel on the project machines); a CUDA machine may pre-install its own torch.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
# --no-build-isolation: the native extension is built against the torch installed above.
.venv/bin/python -m pip install -q --no-build-isolation -e ".[mlx,coreml,dev]"
