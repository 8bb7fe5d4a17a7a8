#!/usr/bin/env bash
# The project's test command: lint, the whole pytest suite on 2 processes, the GPU-kernel emulator under
# sanitizers (a subset), and the CUDA compile check.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -n 2 -q "$@"
scripts/emulation_sanitizers.sh
scripts/check_cuda.sh
