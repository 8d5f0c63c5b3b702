#!/usr/bin/env bash
# Runs every test on a fresh or prepared machine: sets up the environment, builds the extension,
# runs the GoogleTest suite (plain and with ASan/UBSan) through ctest, then pytest.
set -euo pipefail
HEADQ_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$HEADQ_ROOT/scripts/setup_env.sh"
cd "$HEADQ_ROOT"

echo "[test] GoogleTest (torch-free kernels)"
cmake -S . -B build/cpp -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build build/cpp -j "$MAX_JOBS" > /dev/null
ctest --test-dir build/cpp --output-on-failure

echo "[test] GoogleTest with AddressSanitizer + UndefinedBehaviorSanitizer"
cmake -S . -B build/cpp-asan -DCMAKE_BUILD_TYPE=Debug -DHEADQ_SANITIZE=ON > /dev/null
cmake --build build/cpp-asan -j "$MAX_JOBS" > /dev/null
ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  ctest --test-dir build/cpp-asan --output-on-failure

echo "[test] pytest, cache and transformers integration under transformers $(PYTHONPATH="$HEADQ_COMPAT_TF" python -c "import transformers as t; print(t.__version__)") (the GPU machine's)"
PYTHONPATH="$HEADQ_COMPAT_TF" python -m pytest -q -p no:cacheprovider tests/test_cache.py \
  tests/test_hf_integration.py tests/test_graph.py -k "not smollm2"

echo "[test] pytest, everything (transformers $(python -c 'import transformers as t; print(t.__version__)'))"
python -m pytest -q tests "$@"
