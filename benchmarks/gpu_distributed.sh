#!/usr/bin/env bash
# DDP vs FSDP2 vs DeepSpeed ZeRO-2 (one process each) on a real-width FLUX Kontext block stack:
# peak memory and s/step, and the ratio to DDP. Needs one CUDA GPU (< 5 min on an H100);
# --tiny runs a tiny width on the CPU (the test suite's check). Other options: --help.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python
exec env HF_HUB_OFFLINE=1 "$PYTHON" benchmarks/gpu_distributed.py "$@"
