#!/usr/bin/env bash
# One GPU step on a CUDA machine that already has torch + transformers (the device tool's H200
# image): build the extension, run the CUDA tests, the decode benchmark with its accuracy grid,
# and compute-sanitizer on a slice of the GPU tests. Result JSONs go under $OUT (default
# ./gpu_out), logs under $LOGDIR (their tails are printed: the lines recorded in
# benchmarks/results).
#
#   OUT=/tmp/out bash scripts/gpu_check.sh            # everything
#   STEPS="build tests decode" bash scripts/gpu_check.sh
#
# STEPS: any of build exc tests decode a2 quant dequant sanitize ncu exp (default: build tests decode
# sanitize). SANITIZERS: the compute-sanitizer tools of "sanitize" (default memcheck racecheck
# initcheck).
# exc: whether the C++ checks of this build raise Python errors on this machine (the bad-input
# tests; an extension linked with a private static C++ runtime crashed instead: setup.py's
# _shared_libstdcxx).
# dequant: the dequantised path of longer calls (sessions 20-22; first run on a card in session 24,
# gpu_dequantised_path.json "session24"): the out= forms, in-place reads, the A² key pass over
# kept + window keys, the CUDA tests of the HF path, memcheck on the out-form tests, and
# bench_chunk_prefill's A², grown-buffer and uniform rows ($OUT/prefill_*.json), each a step of
# its own.
# a2: the decode step with the A² value policy's kept tokens (3% of the context; graph timing),
# and with ncu, the heavy-slot kernel's time and stall profile.
# exp: a second build of a copy of the tree with HEADQ_NVCC_FLAGS=$EXP_FLAGS and the files under
# $EXP_OVERLAY (if set) copied over it (built in parallel with "build"), its fixed decode kernel
# benchmarked at $EXP_CONTEXTS through bench_decode --lib, then the main build's again (A/B).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
LOGDIR=${LOGDIR:-/tmp/gpu_check_logs}  # logs stay on the machine; $OUT gets the JSON results
STEPS=${STEPS:-"build tests decode sanitize"}
mkdir -p "$OUT" "$LOGDIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
has() { [[ " $STEPS " == *" $1 "* ]]; }
# test_ops.py's CUDA-only tests (skipif without CUDA) whose parametrised ids name no device.
CUDA_ONLY_BY_NAME="window_in_tensor_core_splits or heavy_stage_sizes_agree_exactly or split_min_tiles_keeps_the_answer or fixed_kernel_per_group_scales"
status=0
run() {  # run NAME CMD...: log to $LOGDIR/NAME.log, print its tail, remember a failure
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" >"$LOGDIR/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-6}" "$LOGDIR/$name.log"
  echo "== $name: rc=$rc, $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || status=1
}

EXP_DIR=/tmp/headq_exp
if has exp; then
  rm -rf "$EXP_DIR" && mkdir -p "$EXP_DIR" && cp -r setup.py pyproject.toml csrc headq_torch "$EXP_DIR"/
  [[ -n "${EXP_OVERLAY:-}" ]] && cp -r "$EXP_OVERLAY"/. "$EXP_DIR"/
  (cd "$EXP_DIR" && MAX_JOBS=8 HEADQ_NVCC_FLAGS="${EXP_FLAGS:-}" \
     python3 setup.py -q build_ext --inplace >"$LOGDIR/exp_build.log" 2>&1; echo $? >"$LOGDIR/exp_build.rc") &
fi
if has build; then
  so=$(python3 -c "import sysconfig; print('headq_torch/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
  if [[ -f "$so.src-sha256" && "$(cat "$so.src-sha256")" == "$(bash scripts/src_hash.sh)" ]] &&
     python3 -c "import headq_torch._C" 2>/dev/null; then
    echo "== build: $so was carried, built from these sources (scripts/device_so.sh): not rebuilt"
  else
    run build env MAX_JOBS=${MAX_JOBS:-16} python3 setup.py -q build_ext --inplace
  fi
fi
if has exp; then
  wait
  echo "== exp build (flags '${EXP_FLAGS:-}', overlay '${EXP_OVERLAY:-}'): rc=$(cat "$LOGDIR/exp_build.rc")"
  for ab in exp main exp main; do
    lib="$(ls "$EXP_DIR"/headq_torch/_C*.so)"
    [[ $ab == main ]] && lib="$(ls headq_torch/_C*.so)"
    TAIL=3 run "ab_$ab" python3 benchmarks/bench_decode.py --impl mma --variants fixed \
      --contexts ${EXP_CONTEXTS:-32768,131072} --lib "$lib" --out "$LOGDIR/ab_$ab.json"
  done
fi
if has exc; then  # C++ checks on CPU and CUDA tensors (test_cuda_op_errors_raise)
  run exc python3 -m pytest -q -rf tests/test_bad_input.py
fi
if has tests; then
  # The CUDA-only tests of test_ops.py whose ids name no device are selected by name.
  run tests python3 -m pytest -q tests/test_ops.py tests/test_bad_input.py tests/test_graph.py \
    tests/test_quant_cuda_exact.py -k "cuda or graph or $CUDA_ONLY_BY_NAME"
fi
if has decode; then
  TAIL=8 run decode python3 benchmarks/bench_decode.py --check --impl mma --variants lean,fixed \
    --contexts ${CONTEXTS:-4096,16384,32768,131072} --out "$OUT/gpu_decode.json"
fi
if has a2; then
  TAIL=5 run a2 python3 benchmarks/bench_decode.py --timing graph --heavy-frac 0.03 \
    --contexts ${CONTEXTS:-4096,32768,131072} --out "$OUT/gpu_decode_a2.json"
fi
if has quant; then
  run quant python3 benchmarks/bench_quant.py --out "$OUT/gpu_quant.json"
fi
if has dequant; then
  # with "tests" selected too, its run already covers the CUDA tests of these three files
  has tests || run dequant_tests_ops python3 -m pytest -q -rf tests/test_ops.py \
    tests/test_quant_cuda_exact.py -k "cuda and (out_forms or agree or in_place)"
  # test_a2_weights_fused_attention_lse is CUDA-only by a skipif: no "cuda" in its id
  run dequant_tests_a2 python3 -m pytest -q -rf tests/test_a2_weights.py \
    -k "(cuda and (kept_window or prompt_weights or not_taken)) or fused_attention_lse"
  run dequant_tests_hf python3 -m pytest -q -rf tests/test_hf_integration.py \
    $(has tests || echo tests/test_graph.py) -k "cuda and (dequantised or prefill or chunk or padded)"
  run dequant_memcheck compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest -q -rf tests/test_ops.py -k "cuda and (out_forms_write or in_place)" -p no:cacheprovider
  B="python3 benchmarks/bench_chunk_prefill.py --device cuda --model llama8b --layers 4 --batch 8 --context 32768 --reps 2"
  TAIL=16 run prefill_a2 $B --chunk 96,256,1024 --policies a2 \
    --paths dequantised,dequantised_full_weights,dynamic --out "$OUT/prefill_a2.json"
  TAIL=10 run prefill_grown $B --chunk 96,1024 --policies uniform --pre-calls 1 \
    --paths dequantised,dequantised_packed_copies --out "$OUT/prefill_grown.json"
  TAIL=10 run prefill_uniform $B --chunk 96,256,1024 --policies uniform \
    --paths dequantised,dynamic --out "$OUT/prefill_uniform.json"
fi
if has sanitize; then
  # The decode tests at D = 128 ("float16" also matches the bfloat16 ids), the tensor-core
  # window-slice and per-group-scale tests at D = 128 (variants fixed + window and fixed), and
  # the quantisers.
  sel='(cuda and ((test_decode_attention and float16 and 128) or (quantize_keys_cuda_exact and float16) or (quantize_values_cuda_exact and float16) or (side_code_cuda_exact and plain) or (quantize_kv_cuda_exact and float16 and plain))) or (window_in_tensor_core_splits and 128) or fixed_kernel_per_group_scales'
  for tool in ${SANITIZERS:-memcheck racecheck initcheck}; do
    TAIL=3 run "sanitize_$tool" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      python3 -m pytest -q tests/test_ops.py tests/test_quant_cuda_exact.py -k "$sel"
  done
fi
if has ncu; then
  # The default (fixed) decode kernel at 32k: time, warp instructions, registers, occupancy.
  run ncu ncu -k regex:decode_mma --launch-skip 2 --launch-count 1 --clock-control none \
    --metrics gpu__time_duration.sum,smsp__inst_executed.sum,launch__registers_per_thread,sm__warps_active.avg.per_cycle_active,smsp__warps_eligible.avg.per_cycle_active,dram__throughput.avg.pct_of_peak_sustained_elapsed \
    python3 benchmarks/bench_decode.py --impl mma --variants fixed --contexts 32768 --reps 3 --warmup 1 --sets 1 \
    --out "$LOGDIR/ncu_decode.json"
  run ncu_combine ncu -k regex:decode_combine --launch-skip 2 --launch-count 1 --clock-control none \
    --metrics gpu__time_duration.sum,smsp__inst_executed.sum \
    python3 benchmarks/bench_decode.py --impl mma --variants fixed --contexts 32768 --reps 3 --warmup 1 --sets 1 \
    --out "$LOGDIR/ncu_decode2.json"
  if has a2; then  # the heavy-slot kernel at 32k, 3% kept: where its blocks wait
    run ncu_heavy ncu -k regex:decode_heavy --launch-skip 2 --launch-count 1 --clock-control none \
      --section SchedulerStats --section WarpStateStats --section LaunchStats --section Occupancy \
      --metrics gpu__time_duration.sum,smsp__inst_executed.sum \
      python3 benchmarks/bench_decode.py --contexts 32768 --heavy-frac 0.03 --reps 3 --warmup 1 --sets 1 \
      --out "$LOGDIR/ncu_heavy.json"
  fi
fi
exit $status
