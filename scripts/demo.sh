#!/usr/bin/env bash
# Set everything up and run the end-to-end demo on this machine (CPU, in-process Ray, local files).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pretrain demo --out "${1:-demo_out}"
