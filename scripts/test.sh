#!/usr/bin/env bash
# Set everything up and run the CI test set (no GPU, no slow tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -m "not gpu and not slow" "$@"
