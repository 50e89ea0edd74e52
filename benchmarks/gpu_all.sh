#!/usr/bin/env bash
# Every GPU check of the course in one run, for a 2-GPU machine (one GPU works too; the TP/PP part then
# skips). Run from the repository root:
#     bash benchmarks/gpu_all.sh            # logs and result files go to $OUT (default /tmp/gpu_all)
# GPU 0 runs the benchmarks one after another (their timings are recorded under benchmarks/results/);
# GPU 1, at the same time, runs the test suite, nbval over the notebooks and the grader, all compiled.
# A machine without Jupyter needs the wheels of ../shared/tools/device-wheels.sh in .whl/ (installed here).
set -u
OUT=${OUT:-/tmp/gpu_all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    > /dev/null 2>&1 && export PYTHONPATH=$PWD:/tmp/site
fi
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
LOG=$OUT/gpu_all.log

step() {  # step NAME SECONDS CUDA_VISIBLE_DEVICES COMMAND...: run with a time limit, log, record the exit code
  local name=$1 limit=$2 devices=$3; shift 3
  local t0=$(date +%s)
  CUDA_VISIBLE_DEVICES=$devices timeout "$limit" "$@" > "$OUT/$name.part" 2>&1
  local rc=$?
  # a failing step keeps its whole output (the failures), a passing one its last lines
  { echo "=================== $name (rc=$rc, $(( $(date +%s) - t0 )) s, GPUs $devices): $*"
    if [ $rc -eq 0 ]; then tail -n 40 "$OUT/$name.part"; else grep -v "ProcessGroupNCCL.cpp\|c10d_logger\|return func" "$OUT/$name.part" | tail -n 400; fi; } >> "$LOG"
  # results are copied as soon as a step writes them: a later step running out of time loses nothing
  find benchmarks/results -name "*.json" -newer "$OUT/.start" -exec cp {} "$OUT/" \;
  echo "$name rc=$rc ($(( $(date +%s) - t0 )) s)"
  rm -f "$OUT/$name.part"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  date -u +%FT%TZ; } > "$LOG" 2>&1
cat "$LOG"
touch "$OUT/.start"

if [ "$gpus" -ge 2 ]; then
  step tp2 120 0,1 python3 -m course_lib.parallel --tp 2
  step pp2 120 0,1 python3 -m course_lib.parallel --pp 2 --microbatches 4
  step pp2_1f1b 120 0,1 python3 -m course_lib.parallel --pp 2 --microbatches 4 --schedule 1f1b
  step torchrun_tp2 120 0,1 torchrun --nproc-per-node 2 -m course_lib.parallel --tp 2
fi

second=$(( gpus >= 2 ? 1 : 0 ))
( step pytest "${T_PYTEST:-240}" $second python3 -m pytest -q -p no:cacheprovider -rf tests --ignore=tests/browser
  step nbval "${T_NBVAL:-240}" $second python3 -m pytest -q -p no:cacheprovider -rf --nbval-lax --nbval-current-env notebooks/ solutions/
  step grade "${T_GRADE:-150}" $second python3 -m course_lib.grade solutions/ --require-full ) &

step bench_speculative "${T_BENCH:-120}" 0 python3 benchmarks/speculative.py
step bench_batching "${T_BENCH:-120}" 0 python3 benchmarks/engine_batching.py
step bench_prefix "${T_BENCH:-120}" 0 python3 benchmarks/prefix_caching.py
[ "$gpus" -ge 2 ] && step bench_parallel "${T_BENCH:-120}" 0,1 python3 benchmarks/parallel.py --quick
wait
echo "done"
