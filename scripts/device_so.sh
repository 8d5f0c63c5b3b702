#!/usr/bin/env bash
# Builds the extension on this machine for the GPU machine's Python (3.12, torch 2.11 + CUDA 13.0
# there), so that a device call can carry the built module instead of spending minutes of its
# device time compiling it:
#
#   bash scripts/device_so.sh
#   run(command=..., carry=["headq_torch/_C.cpython-312-x86_64-linux-gnu.so",
#                           "headq_torch/_C.cpython-312-x86_64-linux-gnu.so.src-sha256"])
#
# Beside it goes `<module>.src-sha256`, the hash of the sources it was built from
# (scripts/src_hash.sh); carry both. scripts/gpu_check.sh skips its build step when that hash
# equals the tree's and the module imports, and builds otherwise (a stale module is never used).
# Creates (once) a build-only virtual environment $HEADQ_VENV312 (python3.12, the torch pinned in
# requirements.txt, setuptools, ninja) and builds in place; the module sits beside this
# machine's cp311 one, and Python loads the one matching its version. Incremental when already
# built. Not part of CI.
set -euo pipefail
HEADQ_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HEADQ_VENV312=${HEADQ_VENV312:-$HOME/.venvs/headq312}
PY312=${PY312:-python3.12}
if ! "$PY312" --version >/dev/null 2>&1; then  # e.g. pyenv with another global version
  PY312=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1)
  [ -n "$PY312" ] || { echo "[device_so] needs Python 3.12 (set PY312)" >&2; exit 1; }
fi
export MAX_JOBS=${MAX_JOBS:-2}

if [ ! -x "$HEADQ_VENV312/bin/python" ]; then
  echo "[device_so] creating $HEADQ_VENV312 with $($PY312 --version)"
  "$PY312" -m venv "$HEADQ_VENV312"
fi
torch_pin=$(grep -E '^torch==' "$HEADQ_ROOT/requirements.txt")
if ! "$HEADQ_VENV312/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${torch_pin#torch==}')" 2>/dev/null; then
  echo "[device_so] installing $torch_pin, setuptools, ninja (torch is a few GB the first time)"
  "$HEADQ_VENV312/bin/python" -m pip install -q --upgrade pip
  "$HEADQ_VENV312/bin/python" -m pip install -q "$torch_pin" setuptools ninja numpy
fi
echo "[device_so] building (MAX_JOBS=$MAX_JOBS)"
(cd "$HEADQ_ROOT" && "$HEADQ_VENV312/bin/python" setup.py -q build_ext --inplace)
so=$(cd "$HEADQ_ROOT" && ls headq_torch/_C.cpython-312-*.so)
bash "$HEADQ_ROOT/scripts/src_hash.sh" > "$HEADQ_ROOT/$so.src-sha256"
"$HEADQ_VENV312/bin/python" -c "
import sys; sys.path.insert(0, '$HEADQ_ROOT')
import headq_torch._C, torch
print('[device_so] built', '$so', 'for torch', torch.__version__, 'CUDA', torch.version.cuda)"
ls -la "$HEADQ_ROOT/$so" "$HEADQ_ROOT/$so.src-sha256"
