#!/usr/bin/env bash
# Sets up everything mim needs on a fresh machine: Debian packages (when root),
# a virtual environment in .venv with torch, the project and its dev tools.
# --for-tests (or --with-slurm): what the tests need besides: Slurm, munge, curl, and
# img2dataset in a virtual environment of its own (.venv-img2dataset: it pins webdataset<0.3,
# which must not replace the webdataset mim is tested with), run as its CLI by the tests.
# Idempotent: a second run checks and does nothing that is already done.
#   usage: scripts/bootstrap.sh [--for-tests]
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${MIM_VENV:-.venv}
TORCH_SPEC=${MIM_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
IMG2DATASET_VENV=${MIM_IMG2DATASET_VENV:-.venv-img2dataset}
IMG2DATASET_SPEC="img2dataset==1.47.0"
APT_PACKAGES=(dataset-fashion-mnist)
FOR_TESTS=0
if [[ "${1:-}" == "--for-tests" || "${1:-}" == "--with-slurm" ]]; then
  FOR_TESTS=1
  APT_PACKAGES+=(slurm-wlm munge curl)  # the tests: a real Slurm; curl for `pipe:curl` shards
fi

log() { echo "[bootstrap] $*"; }

install_apt_packages() {
  local missing=()
  for package in "${APT_PACKAGES[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ $(id -u) -ne 0 ]]; then
    log "not root: cannot install ${missing[*]}; install them yourself (apt-get install ${missing[*]})"
    return 0
  fi
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

create_venv() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  local stamp="$VENV/.mim-installed"
  if [[ -f "$stamp" && "$stamp" -nt pyproject.toml ]]; then
    return 0
  fi
  # This project's distribution was called "mim" before "mim-mae": drop that install of this checkout.
  if "$VENV/bin/python" -m pip show mim 2>/dev/null | grep -qx "Editable project location: $(pwd)"; then
    "$VENV/bin/python" -m pip uninstall -y -q mim
  fi
  # torch first, pinned to the builds this machine kind carries on disk; the project
  # itself only asks for a range.
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $TORCH_SPEC
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
}

create_img2dataset_venv() {
  local stamp="$IMG2DATASET_VENV/.installed-$IMG2DATASET_SPEC"
  [[ -f "$stamp" ]] && return 0
  log "creating $IMG2DATASET_VENV ($IMG2DATASET_SPEC, for the foreign-shard tests)"
  python3 -m venv "$IMG2DATASET_VENV"
  "$IMG2DATASET_VENV/bin/python" -m pip install -q "$IMG2DATASET_SPEC"
  touch "$stamp"
}

install_apt_packages
create_venv
if (( FOR_TESTS )); then create_img2dataset_venv; fi
log "ready: $VENV"
