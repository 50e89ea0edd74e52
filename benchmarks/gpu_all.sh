#!/usr/bin/env bash
# Every GPU check of the course, for a 4-GPU machine (fewer work too, in turn; with one, the TP/PP part
# skips). Run from the repository root:
#     bash benchmarks/gpu_all.sh            # logs and result files go to $OUT (default /tmp/gpu_all)
#     PART=checks bash benchmarks/gpu_all.sh; PART=engines bash benchmarks/gpu_all.sh   # the same in two halves
#     PART=ablation ...; PART=tests ...   # the capstone ablation by workload; the tests file by file (see below)
# Benchmarks record their timings under benchmarks/results/; the tests, nbval over the notebooks and the grader
# run compiled. On 4 GPUs the streams below run side by side, one GPU each.
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

# Four streams of steps. With 4 GPUs each stream gets its own GPU (benchmarks never share a GPU with anything);
# with fewer, the streams run one after the other on GPU 0. PART=checks runs the correctness checks and the
# kernels' benchmarks, PART=engines the engine benchmarks (each half fits the 10 minutes of one device-tool call
# on 4 GPUs); the default runs both.
gpu_slug=$(python3 -c "from benchmarks.roofline import device_name, slug; print(slug(device_name()))")
g() { if [ "$gpus" -ge 4 ]; then echo "$1"; else echo 0; fi; }   # the GPU of stream $1
parallel_checks() {   # tensor and pipeline parallelism over NCCL: needs 2 GPUs
  [ "$gpus" -ge 2 ] || return 0
  local pair=$1
  step tp2 120 "$pair" python3 -m course_lib.parallel --tp 2
  step pp2 120 "$pair" python3 -m course_lib.parallel --pp 2 --microbatches 4
  step pp2_1f1b 120 "$pair" python3 -m course_lib.parallel --pp 2 --microbatches 4 --schedule 1f1b
  step torchrun_tp2 120 "$pair" torchrun --nproc-per-node 2 -m course_lib.parallel --tp 2
}
run_streams() {   # run_streams "stream 0 function" "stream 1 function" ...: in parallel on 4 GPUs, else in turn
  local k=0 pids=()
  for f in "$@"; do
    if [ "$gpus" -ge 4 ]; then "$f" "$k" & pids+=($!); else "$f" 0; fi
    k=$((k + 1))
  done
  [ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"
}
checks_kernels() { step bench_kv_quant 200 "$1" python3 -m benchmarks.kv_quant
                   step bench_engine "${T_ENGINE:-300}" "$1" python3 -m benchmarks.engine; }
checks_pytest() { step pytest "${T_PYTEST:-520}" "$1" python3 -m pytest -q -p no:cacheprovider -rf tests --ignore=tests/browser; }
checks_notebooks() { if [ "$gpus" -ge 4 ]; then parallel_checks 2,3; fi
                     step nbval "${T_NBVAL:-300}" "$1" python3 -m pytest -q -p no:cacheprovider -rf --nbval-lax --nbval-current-env notebooks/ solutions/
                     step grade "${T_GRADE:-150}" "$1" python3 -m course_lib.grade solutions/ --require-full; }
engines_batching() { step bench_batching "${T_BATCHING:-450}" "$1" python3 -m benchmarks.engine_batching; }
engines_speculative() { step bench_speculative 300 "$1" python3 -m benchmarks.speculative; }
engines_prefix() { step bench_prefix 200 "$1" python3 -m benchmarks.prefix_caching; }
engines_capstone_1b() {   # the capstone on a 1.2 B-parameter LLaMA shape (random weights, the same for both systems):
  # its HF row alone ran past 4 minutes on an H200 with 64 requests (outputs up to ~2k tokens), so it gets a slot
  # of its own and fewer requests; the file name keeps it out of the lessons' engine_*.json (tiny-model runs)
  step bench_engine_1b 560 "$1" python3 -m benchmarks.engine --config llama-1b --workloads chat --num-requests 32 \
    --time-limit 400 --out "benchmarks/results/engine-llama-1b_$gpu_slug.json"; }

WORKLOAD_LIST=(chat multi-turn long-cot multimodal)
# PART=ablation,kvquant,quickchecks,tests (any of them, comma-separated): jobs that any free GPU takes in turn, so they
# spread over however many GPUs there are. ablation: the capstone's ablation, one job and one JSON per workload;
# kvquant: the INT8 KV benchmark; tests: nbval + the grader, and the compiled test suite one file at a time
# (in TEST_JOBS jobs, so a slow file neither hides the others' results nor runs past the slot).
ablation_job() { step "engine_$1" "${T_ABLATION:-280}" "$2" python3 -m benchmarks.engine --workloads "$1" \
                   --time-limit "${ABLATION_LIMIT:-240}" --out "benchmarks/results/engine_${1}_$gpu_slug.json"; }
kvquant_job() { step bench_kv_quant 240 "$1" python3 -m benchmarks.kv_quant; }
notebooks_job() { step nbval "${T_NBVAL:-300}" "$1" python3 -m pytest -q -p no:cacheprovider -rf --nbval-lax \
                    --nbval-current-env notebooks/ solutions/
                  step grade "${T_GRADE:-150}" "$1" python3 -m course_lib.grade solutions/ --require-full; }
testfiles_job() {   # $1 of $2: every $2-th test file from the $1-th; $3: GPU
  local i=0 f
  for f in tests/test_*.py; do
    [ $((i % $2)) -eq "$1" ] && step "pytest_$(basename "$f" .py)" "${T_TESTFILE:-200}" "$3" \
      python3 -m pytest -q -p no:cacheprovider --tb=short -rf "$f"
    i=$((i + 1))
  done
}
quickchecks_job() {   # the test files and lessons that changed since the last full GPU run ($QUICK_TESTS, $QUICK_NBS)
  step pytest_quick "${T_QUICK:-240}" "$1" python3 -m pytest -q -p no:cacheprovider --tb=short -rf ${QUICK_TESTS:-tests}
  step nbval_quick "${T_QUICK:-240}" "$1" python3 -m pytest -q -p no:cacheprovider -rf --nbval-lax --nbval-current-env \
    ${QUICK_NBS:-notebooks}; }
run_jobs() {        # run_jobs "job args" ...: each GPU takes the next job when it is free (the GPU is appended)
  local jobs=("$@") q=$OUT/.queue d pids=()
  echo 0 > "$q"
  for ((d = 0; d < (gpus < 1 ? 1 : gpus); d++)); do
    ( while :; do
        until mkdir "$q.lock" 2> /dev/null; do sleep 0.1; done
        i=$(cat "$q"); echo $((i + 1)) > "$q"; rmdir "$q.lock"
        [ "$i" -lt ${#jobs[@]} ] || break
        eval "${jobs[$i]} $d"
      done ) & pids+=($!)
  done
  wait "${pids[@]}"; rm -f "$q"
}
if [[ ",${PART:-all}," =~ ,(ablation|kvquant|tests|quickchecks), ]]; then
  jobs=()
  [[ ",$PART," == *,ablation,* ]] && jobs+=("ablation_job ${WORKLOAD_LIST[0]}")   # chat: the longest first
  [[ ",$PART," == *,kvquant,* ]] && jobs+=("kvquant_job")
  [[ ",$PART," == *,quickchecks,* ]] && jobs+=("quickchecks_job")
  [[ ",$PART," == *,ablation,* ]] && for w in "${WORKLOAD_LIST[@]:1}"; do jobs+=("ablation_job $w"); done
  [[ ",$PART," == *,tests,* ]] && for ((k = 0; k < ${TEST_JOBS:-3}; k++)); do jobs+=("testfiles_job $k ${TEST_JOBS:-3}"); done \
    && jobs+=("notebooks_job")
  run_jobs "${jobs[@]}"
  if [[ ",$PART," == *,ablation,* ]]; then   # the four workloads' results as one (engine_<device>.json)
    parts=(); for w in "${WORKLOAD_LIST[@]}"; do parts+=("benchmarks/results/engine_${w}_$gpu_slug.json"); done
    python3 -m benchmarks.engine --merge "${parts[@]}" > "$OUT/merge.log" 2>&1 && rm -f "${parts[@]}" "$OUT"/engine_*_"$gpu_slug".json \
      && cp "benchmarks/results/engine_$gpu_slug.json" "$OUT/"; tail -n 6 "$OUT/merge.log"
  fi
  rm -f "$OUT/.start"; echo done; exit 0
fi

if [ "${PART:-all}" != engines ]; then
  [ "$gpus" -ge 4 ] || parallel_checks 0,1
  run_streams checks_kernels checks_pytest checks_notebooks
fi
if [ "${PART:-all}" != checks ]; then
  run_streams engines_batching engines_speculative engines_prefix engines_capstone_1b
fi
echo "done"
