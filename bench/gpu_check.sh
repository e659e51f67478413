#!/usr/bin/env bash
# The one-shot accelerator check (bench/gpu_check.py; its docstring lists the checks): one table, exit status 1 if
# any check failed. On a GPU machine after `make install TORCH_INDEX_URL=<CUDA wheel index>`:
#   bash bench/gpu_check.sh --json bench/results/gpu_check.json
# Anywhere, the same code on the CPU, small (the test suite runs this): bash bench/gpu_check.sh --cpu
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0
exec "${VENV:-.venv}/bin/python" bench/gpu_check.py "$@"
