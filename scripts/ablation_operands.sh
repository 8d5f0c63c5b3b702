#!/usr/bin/env bash
# Device call behind operand_ablation_session29 (gpu_decode.json; docs/PERF.md, "The operands'
# share of the streaming loop"): main's module against timing-only builds that leave parts of
# the fixed kernel's operand work out (scripts/ablation_operands.patch; their outputs are wrong),
# alternating, two repeats, CUDA graphs; then ncu of four of them at 32k. Not part of CI.
#
# Before the call, here (scripts/device_so.sh builds the tree for the GPU machine's Python;
# strip + xz makes each module ~4 MB):
#   bash scripts/device_so.sh && strip -o /tmp/main.so headq_torch/_C.cpython-312-*.so \
#     && xz -c /tmp/main.so > build/abx/main.so.xz
#   git apply scripts/ablation_operands.patch && cp csrc/cuda/decode_mma.cu /tmp/abl.cu
#   for each NAME:MACROS of keyfree:KEYFREE valfree:VALFREE "codesfree:KEYFREE VALFREE"
#       qfree:QFREE pfree:PFREE "allfree:KEYFREE VALFREE QFREE PFREE":
#     { for m in MACROS; do echo "#define HEADQ_ABL_$m 1"; done; cat /tmp/abl.cu; } \
#       > csrc/cuda/decode_mma.cu && bash scripts/device_so.sh \
#       && strip -o /tmp/NAME.so headq_torch/_C.cpython-312-*.so && xz -c /tmp/NAME.so > build/abx/NAME.so.xz
#   git checkout csrc/cuda/decode_mma.cu
# then run(command="bash scripts/ablation_operands.sh", carry=["build/abx"]). MODS (the timed
# builds) and NCU_MODS (the profiled ones) choose subsets, e.g. MODS="main codesfree qfree allfree".
# Results: $OUT/ablation.json (HeadQ, dense us per step), $OUT/gpu_decode_now.json (#5's table,
# main's module), $OUT/ncu_*.csv, $OUT/log.txt.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
SO=headq_torch/_C.cpython-312-x86_64-linux-gnu.so
LOG=$OUT/log.txt
mkdir -p /tmp/ab
MODS=${MODS:-"main keyfree valfree codesfree qfree pfree allfree"}
for m in $MODS; do
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" build/abx/$m.so.xz /tmp/ab/$m.so
done
cp /tmp/ab/main.so $SO
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a $LOG
t0=$(date +%s); T() { echo "t=$(( $(date +%s) - t0 ))s" | tee -a $LOG; }
echo "== #5 table, main module, check grid" | tee -a $LOG
python3 benchmarks/bench_decode.py --check --impl mma --variants fixed --timing graph \
  --out $OUT/gpu_decode_now.json 2>&1 | tail -8 | tee -a $LOG
T
merge() {
python3 - <<'PY'
import json, glob, os
out = os.environ["OUT"]; runs = {}
for f in sorted(glob.glob("/tmp/ab/abl_*.json")):
    d = json.load(open(f)); k = os.path.basename(f)[4:-5]
    runs[k] = {str(r['context']): [round(r['headq']['median_ms'] * 1000, 2), round(r['dense_sdpa']['median_ms'] * 1000, 2)] for r in d['rows']}
    runs["meta"] = {x: d.get(x) for x in ("command", "device", "torch", "cuda")}
json.dump(runs, open(f"{out}/ablation.json", "w"), indent=1)
PY
}
for rep in 1 2; do
  for m in $MODS; do
    python3 benchmarks/bench_decode.py --lib /tmp/ab/$m.so --impl mma --variants fixed --timing graph \
      --contexts 256,4096,32768,131072 --out /tmp/ab/abl_${m}_r$rep.json 2>&1 | grep -E "^ *[0-9]" | sed "s/^/$m r$rep /" | tee -a $LOG
    merge
  done
  T
done
echo "== ncu at 32k" | tee -a $LOG
for m in ${NCU_MODS:-main codesfree qfree allfree}; do
  ncu -k regex:decode_mma --launch-skip 2 --launch-count 1 --clock-control none --csv \
    --metrics gpu__time_duration.sum,smsp__inst_executed.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,smsp__warps_eligible.avg.per_cycle_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread \
    python3 benchmarks/bench_decode.py --lib /tmp/ab/$m.so --impl mma --variants fixed --contexts 32768 --reps 3 --warmup 1 --sets 1 \
    --out /tmp/ab/ncu_$m.json > $OUT/ncu_$m.csv 2>&1
  T
done
