#!/usr/bin/env bash
# Submit a curation run to a Ray cluster as a Ray job.
#
#   infra/ray/submit.sh http://HEAD:8265 RECIPE.toml RUN_DIR [--set a.b=value ...]
#
# Example:
#   infra/ray/submit.sh http://10.0.0.5:8265 curation/recipes/sscd.toml s3://bucket/runs/web-2026-11 \
#       --set 'ingest.sources=["s3://bucket/shards/web-{000000..009999}.tar"]'
#
# The repository (minus .venv/.git, see runtime_env.yaml) is uploaded as the job's working directory; inside
# the job `python -m curation` joins the cluster through RAY_ADDRESS, which Ray sets. A rerun with the same
# RUN_DIR resumes: finished stages and parts are skipped. Env: RAY_JOB_ID=<id> to name the submission,
# PYTHON=<interpreter> if `python` on the cluster is not the one with the project installed.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,14p' "$0" >&2
  exit 2
fi
address=$1 recipe=$2 out=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"

args=(job submit --address "$address" --working-dir . --runtime-env "$here/runtime_env.yaml")
if [[ -n "${RAY_JOB_ID:-}" ]]; then
  args+=(--submission-id "$RAY_JOB_ID")
fi
exec ray "${args[@]}" -- "${PYTHON:-python}" -m curation run "$recipe" --out "$out" "$@"
