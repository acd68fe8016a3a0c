#!/usr/bin/env bash
# The GPU check in one command (benchmarks/device_check.py says what it runs): the CUDA-only
# tests, short fp16 AMP runs of GK, KD and LD that must stay finite, the step-time, PGM,
# refresh and inference benchmarks, one summary. Exit 2 without CUDA; --dry-run prints the plan.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
exec "$PY" benchmarks/device_check.py --python "$PY" "$@"
