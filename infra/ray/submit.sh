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
# RUN_DIR resumes: finished stages and parts are skipped. RUN_DIR is a URL or a path the cluster's nodes see (a
# relative path is taken from the current directory, not from the job's copy of the repository).
# The `ray` CLI is the repository's .venv/bin/ray when there is one, else `ray` on PATH. The job's interpreter:
# PYTHON=<interpreter> if set; for a head on this machine (127.0.0.1, localhost) the python of that same
# environment (the head's PATH need not contain it); for any other head `python` on the cluster (its image).
# Env: RAY_JOB_ID=<id> to name the submission.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,17p' "$0" >&2
  exit 2
fi
address=$1 recipe=$2 out=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
if [[ "$out" != *://* && "$out" != /* ]]; then
  out="$PWD/$out"
fi
cd "$repo"

if [[ -x "$repo/.venv/bin/ray" ]]; then
  ray="$repo/.venv/bin/ray"
else
  ray=$(command -v ray) || { echo "submit.sh: no .venv/bin/ray and no ray on PATH (run make setup)" >&2; exit 2; }
fi
host=${address#*://}
host=${host%%/*}
host=${host%:*}
case "$host" in
  127.*|localhost|\[::1\]) local_python="$(dirname "$ray")/python" ;;
  *) local_python=python ;;
esac
if [[ "$local_python" == */* && ! -x "$local_python" ]]; then
  local_python=python
fi
python=${PYTHON:-$local_python}

args=(job submit --address "$address" --working-dir . --runtime-env "$here/runtime_env.yaml")
if [[ -n "${RAY_JOB_ID:-}" ]]; then
  args+=(--submission-id "$RAY_JOB_ID")
fi
exec "$ray" "${args[@]}" -- "$python" -m curation run "$recipe" --out "$out" "$@"
