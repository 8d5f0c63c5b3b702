#!/usr/bin/env bash
# Device call for this branch (wip/window-front): the window slice attended before the streaming
# loop (new: this branch's module) vs after it (main: main's module), the new NaN-merge test on a
# module from before that fix (pre: does the test catch the bug?), the CUDA tests of both
# modules, sanitizers, and #5's table. Before the call, here (scripts/device_so.sh builds the
# checked-out tree; strip + xz makes each module ~4 MB):
#   for each of pre (main before 5457923), main, new (this branch): check it out,
#     bash scripts/device_so.sh && strip -o /tmp/$m.so headq_torch/_C.cpython-312-*.so \
#       && xz -c /tmp/$m.so > build/abx/$m.so.xz
# then run(command="bash scripts/ab_window_front.sh", carry=["build/abx"]).
# Results: $OUT/ab_window_front.json (HeadQ, dense us per step), $OUT/log.txt, gpu_decode_now.json.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
SO=headq_torch/_C.cpython-312-x86_64-linux-gnu.so
mkdir -p /tmp/ab
for m in pre main new; do
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" build/abx/$m.so.xz /tmp/ab/$m.so
done
use() { cp /tmp/ab/$1.so $SO; echo "== module $1" | tee -a $LOG; }
LOG=$OUT/log.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a $LOG
t0=$(date +%s)
T() { echo "t=$(( $(date +%s) - t0 ))s" | tee -a $LOG; }
PT="python3 -m pytest -q -p no:cacheprovider"
merge() {
python3 - <<'PY'
import json, glob, os
out = os.environ["OUT"]; runs = {}
for f in sorted(glob.glob(f"/tmp/ab/ab_*.json")):
    d = json.load(open(f)); k = os.path.basename(f)[3:-5]
    runs[k] = {f"{r['batch']}x{r['context']}": [round(r['headq_min_tiles_auto']['median_ms'] * 1000, 2),
                                                 round(r['dense_sdpa']['median_ms'] * 1000, 2)] for r in d['rows']}
    runs["meta"] = {x: d.get(x) for x in ("command", "device", "torch", "cuda", "timing")}
json.dump(runs, open(f"{out}/ab_window_front.json", "w"), indent=1)
PY
}
B="--batches 1,4,8,16 --contexts 4096,16384,32768 --no-check --min-tiles auto"
ab() {  # rep module window [extra args]
  python3 benchmarks/bench_decode_batch.py --lib /tmp/ab/$2.so ${4:-$B} --window $3 --out /tmp/ab/ab_$2_w$3_r$1.json 2>&1 | tail -1 | tee -a $LOG
  merge; T
}
NAN="cuda and (nan_key_group or nan_window or nonfinite or nan_query)"
use pre
echo "== pre-fix module: NaN tests (one_tile cases expected to fail if the bug is real)" | tee -a $LOG
timeout 120 $PT -rf tests/test_ops.py tests/test_bad_input.py -k "$NAN" 2>&1 | grep -E "FAILED|passed|failed" | tail -25 | tee -a $LOG
T
use main
echo "== main module: decode + NaN CUDA tests" | tee -a $LOG
timeout 200 $PT -rf tests/test_ops.py tests/test_bad_input.py tests/test_graph.py -k "cuda and (decode or nan or nonfinite or graph)" 2>&1 | tail -4 | tee -a $LOG
T
use new
echo "== new module: CUDA tests (gpu_check's set)" | tee -a $LOG
timeout 240 $PT -rf tests/test_ops.py tests/test_bad_input.py tests/test_graph.py tests/test_quant_cuda_exact.py -k "cuda or graph" 2>&1 | tail -4 | tee -a $LOG
T
ab 1 new 32; ab 1 main 32
echo "== memcheck (new): window + NaN" | tee -a $LOG
# (as recorded in gpu_sanitizers.json: "cuda and" leaves out the window_in_tensor_core_splits
# tests, whose ids name no device; its 22 tests are the NaN window and NaN key-group ones)
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 $PT tests/test_ops.py \
  -k "cuda and ((window_in_tensor_core_splits and float16) or nan_window or nan_key_group)" 2>&1 | tail -2 | tee -a $LOG
T
ab 2 new 32; ab 2 main 32
S="--batches 1,8 --contexts 4096,32768 --no-check --min-tiles auto"
ab 1 new 0 "$S"; ab 1 main 0 "$S"
echo "== racecheck (new): window" | tee -a $LOG
timeout 100 compute-sanitizer --tool racecheck --error-exitcode 9 $PT tests/test_ops.py \
  -k "(window_in_tensor_core_splits and float16) or (nan_key_group and cuda and k2_side)" 2>&1 | tail -2 | tee -a $LOG
T
echo "== #5 table (new)" | tee -a $LOG
timeout 120 python3 benchmarks/bench_decode.py --impl mma --variants fixed --timing graph \
  --contexts 4096,16384,32768,131072 --out $OUT/gpu_decode_now.json 2>&1 | tail -7 | tee -a $LOG
T
python3 -c "import json; d=json.load(open('$OUT/ab_window_front.json')); [print(k, v) for k, v in d.items()]"
