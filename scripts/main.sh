#!/usr/bin/env bash
# The main job on the embedded default: sets up the environment, builds the extension, loads the
# packaged SmolLM2-135M, calibrates on one part of the packaged news text, evaluates perplexity
# on another part and prints the table (dense, base 2-bit, same-budget baselines, HeadQ,
# HeadQ + A² values, with bits per element). Extra arguments go to `headq eval`.
set -euo pipefail
HEADQ_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$HEADQ_ROOT/scripts/setup_env.sh"
cd "$HEADQ_ROOT"
exec python -m headq_torch.evaluation --default "$@"
