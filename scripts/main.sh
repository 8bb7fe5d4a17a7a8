#!/usr/bin/env bash
# The main job on the embedded default corpus, no network: train a small ParaRNN language model
# with PyTorch, convert it to MLX, generate text on MLX; then the parallel-vs-sequential layer check.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
.venv/bin/pararnn-demo --force "$@"
.venv/bin/python -m pararnn_torch.demo
