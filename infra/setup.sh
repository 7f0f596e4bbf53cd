#!/usr/bin/env bash
# Create .venv (if needed) and install dinoforge with the pinned CPU stack and the Debian data packages.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
[ -d /usr/share/backgrounds/mate/nature ] || need_apt+=(mate-backgrounds)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${need_apt[*]}"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "[setup] need root or sudo to apt-get install ${need_apt[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

stamp="$VENV/.dinoforge-installed"
want="$(cat infra/requirements-ci.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing Python packages into $VENV (about a minute the first time)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r infra/requirements-ci.txt 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import torch, ray, faiss, webdataset, pyarrow, curation, pretrain" \
    || { echo "[setup] installation is incomplete" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
