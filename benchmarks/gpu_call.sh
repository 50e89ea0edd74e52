#!/usr/bin/env bash
# One device-tool call on one GPU: named steps, each with its own time limit, results copied to $OUT as soon as a
# step writes them (a later step running out of time loses nothing). With .whl/ carried (../shared/tools/device-wheels.sh).
#     STEPS="tests_fa serving1" COURSE_GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_call.sh
# Every step (a name in the case list below). Done in session 8 (2026-12-06, one H100; gpu_checks.md): tests_fa,
# tests_gpu, tests_e2e, tests_sampling, serving_step, serving2, serving3, fa_hopper, fa_configs; in session 9:
# serving_step (phases), fa_bwd_configs, paged (twice), fa_atomic; in session 10: piecewise, serving_step (H200),
# full_graph, serving_step_mixed, paged, profile_full; in session 11 (H100): tests_gpu (FULL the default),
# serving_step, paged (no sweep), fa_bwd_tma; in session 12 (H100): fa_auto128, paged (with --splits); in session 13:
# nothing (no GPU could be started); in session 14 (H100): fa_exp, serving1, serving5 (cut short), bench_batching,
# bench_spec_prefix; in session 15: nothing (no GPU could be started); in session 16 (H100): serving1g x3 (pooled:
# serving_..._2026-12-07c.json), fa_rot, paged_tune, "@eef2c7a serving2" (its 2nd run: ..._2026-12-07d.json); in
# session 17 (H100; naming nvidia-h200 gave an H100): serving_step_default, paged_tune, "@eef2c7a serving2" (3rd run,
# pooled into 07d), serving4 (07e), serving6 (cut in its KV-budget sweep) + that sweep engine-only (07f), fa_rot (_rot2).
# In session 18 (H100): fa_gluon (the Gluon forward's first GPU run: correct; ..._gluon.json, gluon_configs), serving5b
# (long-cot; multimodal by hand in a second call: merged into serving_..._2026-12-07g.json). In session 19: nothing
# (six starts failed, then lending was paused). In session 20: nothing (eleven starts failed). In session 21: nothing
# (three starts failed, then lending was paused); every sweep config's compiled resources recorded on a CPU instead
# (benchmarks/flash_attention_gluon_resources.py: all compile and fit; only the D = 64 two-per-SM ping-pong spills).
# In session 22: nothing (lending paused from the start); the INT8 decode kernel's variants compiled for sm_90 on a CPU
# instead (benchmarks/int8_kernel_resources.py: 1.75x the FP16 kernel's loop instructions per KB, 46% unpacking codes),
# and two switches written for the GPU to time (int8_sweep).
# Left, in the order to run them (on an H200 too: the Gluon kernel is sm_90, and its H200 files would be the first):
#   fa_gluon_mini (MINI_LIMIT=230: ~4 min) where less than ~6 min of device time is left: D = 128, causal first
#   fa_gluon_quick fa_gluon_best  (BEST_LIMIT=170: ~9.5 min in one call) where a call may be the session's only one:
#                the D = 128 sweep, then the ablation's rows (N = 8k first) with its fastest config per (D, causal)
#   fa_gluon     (~9 min, alone in its call) again: the switches SPLIT_MASK (causal tiles below each group's diagonal
#                without the mask), HEAVY_FIRST (causal: the last query blocks launched first), FMA_SOFTMAX (one FMA
#                per score), PINGPONG (FA3's turns between the two consumer groups) and PERSISTENT (one program per
#                SM looping over query tiles), written after the first run and off by default until the smoke cases
#                and the sweep (D = 128, then 64; a config whose smoke case failed is skipped) say they are right and
#                faster (the D = 128 rows fill the step; the D = 64 rows, with two programs per SM as well, are
#                fa_gluon_d64's, ~5 min). Then, in a second call: fa_gluon_tests (~3 min: also hopper="gluon",
#                kernels.flash_attention's route to it, and return_lse), fa_gluon_ablation (~3 min) with the defaults
#                that result, fa_gluon_bwd (~5 min: forward + backward with the Gluon forward, ours_gluon, beside the
#                default's and cuDNN's)
#   int8_sweep   (~5 min; on an H200 first, where INT8 misses its target) the Gluon INT8 kernel
#                (kernels/paged_attention_int8_gluon.py: loads in the mma layouts, no shared memory; never run on a
#                GPU) and the Triton kernel's new switches (K_INT8_DOT, BIASED) tested against the reference, then
#                benchmarks.int8_kernel_sweep timing them beside the shipped config and the tile kernels; a winner at
#                every shape becomes the default (kernels.paged_attention_int8_decode's route); then kv_quant (~3 min:
#                the course's INT8 file, with the Gluon kernel checked and timed beside the Triton one)
#   serving7     the tiny model on a GPU (one device call, ~8-9 min)
#   fa_rot       again (~2 min): flash_attention_hopper files record each compiled config's registers per thread and
#                spills ("compiled"; empty for the TMA kernel before session 17's fix), which would settle lesson 03's
#                "lost to registers"
#   on an H200, if the device tool lends one: serving_step_default (issue 18's targets with FULL graphs the default;
#                the H200 file predates it), paged_tune, fa_auto, fa_fwd (issue 21's H200 files)
#   engine_async the engine with and without async scheduling and without CUDA graphs, 3 repeats each (~5 min)
#   tests_fa, tests_e2e, tests_sampling, fa_hopper, fa_exp, fa_configs, fa_bwd_configs, fa_atomic: re-run
#                when their code changes
# A step "@<commit>" runs the steps after it in that commit's tree, carried as .pinned/<commit>.tar.gz (made here by
#     git archive --format=tar.gz -o .pinned/7ee05a3.tar.gz 7ee05a3
# and carried with .whl): the repeats of one measurement spread over sessions then measure the same code, and
# benchmarks.serving --merge accepts their files (it refuses files of different commits). The steps are this
# script's; the code they run is the pinned tree's. E.g. STEPS="fa_rot @7ee05a3 serving1".
set -u
OUT=${OUT:-/tmp/gpu_call}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD COURSE_GIT_COMMIT=${COURSE_GIT_COMMIT:-unknown}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    > /dev/null 2>&1 && export PYTHONPATH=$PWD:/tmp/site
fi
pin() {   # pin COMMIT: the steps after this one run in the tree of COMMIT
  local tree=/tmp/pinned/$1
  rm -rf "$tree" && mkdir -p "$tree" && tar -xzf ".pinned/$1.tar.gz" -C "$tree" || { echo "pin $1: no tree" | tee -a "$OUT/env.log"; exit 1; }
  cd "$tree" && export PYTHONPATH=$tree:/tmp/site COURSE_GIT_COMMIT=$1
  echo "pinned: the steps after this run the tree of $1" | tee -a "$OUT/env.log"
}
touch /tmp/.gpu_call_start
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'transformers', transformers.__version__)
import importlib.util as u   # what transformers' continuous batching could switch to (it runs paged SDPA without)
print('flash_attn installed', u.find_spec('flash_attn') is not None, '| kernels installed', u.find_spec('kernels') is not None)"
  date -u +%FT%TZ; } > "$OUT/env.log" 2>&1
step() {   # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.log"
  find benchmarks/results -name "*.json" -newer /tmp/.gpu_call_start -exec cp {} "$OUT/" \;
}
serving() {   # serving N ARGS...: benchmarks.serving with --out serving_partN.json
  local n=$1; shift
  step "serving$n" 560 python3 -m benchmarks.serving "$@" --out "$OUT/serving_part$n.json"
}
# fa_gluon_mini's configs (labels of benchmarks.flash_attention_gluon_configs): the default, then the switches' main
# combinations, the causal-only ones first
MINI_PICK=128/2/232,128/2/232/split/heavy,128/2/232/split/heavy/fma,128/2/232/heavy/fma/pp,128/2/232/heavy/fma/pp/pers
MINI_PICK=$MINI_PICK,128/2/232/split/heavy/fma/pers,128/2/232/pp,128/2/232/fma,128/2/232/fma/pp
for s in ${STEPS:?set STEPS}; do
  case $s in
    @*) pin "${s#@}" ;;
    tests_fa) step tests_fa ${FA_LIMIT:-300} python3 -m pytest -v -rfE tests/test_flash_attention_bwd.py -k "gpu or benchmark or float32" ;;
    tests_gpu) step tests_gpu ${GPU_LIMIT:-540} python3 -m pytest -q -rfE --durations=10 tests/test_flash_attention.py \
                 tests/test_engine_memory.py tests/test_grading_bounds.py tests/test_cuda_graph.py \
                 tests/test_paged_prefill.py tests/test_lesson00_warmups.py tests/test_prefix_cache_engine.py \
                 tests/test_engine.py tests/test_full_graph.py tests/test_piecewise_graph.py tests/test_device_sampling.py ;;
    tests_e2e) step tests_e2e 300 python3 -m pytest -q -rfE tests/test_lesson00_warmups.py tests/test_lesson03.py \
                 tests/test_lesson07.py -k end_to_end ;;
    serving_step) step serving_step 585 python3 -m benchmarks.serving_step --out "$OUT/serving_step_part.json" ;;
    engine_async) serving 0 --models qwen3-0.6b --workloads nano-vllm --systems llmengine --ablation async,graphs \
                --repeats 3 --time-limit 330 ;;
    serving1) serving 1 --models qwen3-0.6b --workloads nano-vllm --systems llmengine,hf-cb --repeats 1 --time-limit 400 ;;
    serving1g) serving 1g --models qwen3-0.6b --workloads nano-vllm --systems llmengine,hf-cb --hf-cb-graphs on \
                --repeats 1 --time-limit 400 ;;
    serving2) serving 2 --models qwen3-0.6b --workloads nano-vllm --systems llmengine,hf-static --hf-batch-sizes 128 \
                --hf-sweep-sample full --repeats 1 --time-limit 400 ;;
    serving3) serving 3 --models qwen3-0.6b --workloads nano-vllm --systems llmengine,hf-static --hf-batch-sizes 256 \
                --hf-sweep-sample full --repeats 1 --time-limit 400 ;;
    serving4) serving 4 --models llama-3.2-1b --workloads nano-vllm --systems llmengine,hf-cb --repeats 1 --time-limit 420 ;;
    serving5) serving 5 --models qwen3-0.6b --workloads chat,multi-turn,long-cot,multimodal --num-requests 64 \
                --repeats 1 --hf-batch-sizes 64 --hf-sweep-sample full --time-limit 420 ;;
    serving5b) serving 5b --models qwen3-0.6b --workloads long-cot,multimodal --num-requests 64 \
                --repeats 1 --hf-batch-sizes 64 --hf-sweep-sample full --time-limit 420 ;;
    serving6) serving 6 --models qwen3-0.6b --workloads none --systems llmengine,hf-cb --sweep-repeats 1 \
                --sweep-concurrency 8,32,128,256 --sweep-context 256,1024,1792 --sweep-kv-budget 8,32,128 --time-limit 420 ;;
    fa_hopper) step fa_hopper_tests ${FAH_TEST_LIMIT:-150} python3 -m pytest -q -rfE --durations=10 tests/test_flash_attention_hopper.py
               step fa_hopper 400 python3 -m benchmarks.flash_attention_hopper --time-limit ${FAH_BENCH_LIMIT:-280} \
                 --out "$OUT/flash_attention_hopper.json" ;;
    full_graph) step full_graph 200 python3 -m pytest -q -rfE --durations=5 tests/test_full_graph.py ;;
    serving_step_default) step serving_step_default 480 python3 -m benchmarks.serving_step --rows 6 \
                 --out "$OUT/serving_step_default.json" ;;
    serving_step_mixed) step serving_step_mixed 480 python3 -m benchmarks.serving_step --rows 4,5,6 \
                 --out "$OUT/serving_step_mixed.json" ;;
    piecewise) step piecewise 200 python3 -m pytest -q -rfE --durations=10 tests/test_piecewise_graph.py \
                 tests/test_cuda_graph.py tests/test_async_scheduling.py ;;
    tests_sampling) step tests_sampling 200 python3 -m pytest -q -rfE tests/test_device_sampling.py tests/test_cuda_graph.py \
                 tests/test_async_scheduling.py ;;
    fa_configs) step fa_configs 240 python3 -m benchmarks.flash_attention_configs --time-limit 150 \
                 --out "$OUT/flash_attention_configs.json" ;;
    fa_exp) step fa_exp_tests 240 python3 -m pytest -q -rfE tests/test_flash_attention_hopper.py \
              -k "exp16 or poly or tma_wide"
            step fa_exp 300 python3 -m benchmarks.flash_attention_hopper --variants tma_wide,tma_exp16,tma_poly \
              --time-limit 200 --out "$OUT/flash_attention_hopper_exp.json" ;;
    fa_rot) step fa_rot_tests 240 python3 -m pytest -q -rfE tests/test_flash_attention_hopper.py -k "rot or tma_wide"
            step fa_rot 300 python3 -m benchmarks.flash_attention_hopper --variants tma_wide,tma_rot \
              --time-limit 200 --out "$OUT/flash_attention_hopper_rot.json" ;;
    fa_gluon) step fa_gluon_smoke 200 python3 -m benchmarks.flash_attention_gluon_smoke   # smallest case first
              # the sweep skips every config whose smoke case hung or was wrong (the default's too: then nothing runs)
              step fa_gluon_configs 300 python3 -m benchmarks.flash_attention_gluon_configs --head-dims 128,64 \
                --time-limit 230 --smoke-log "$OUT/fa_gluon_smoke.log" --out "$OUT/flash_attention_gluon_configs.json" ;;
    fa_gluon_d64) step fa_gluon_d64 330 python3 -m benchmarks.flash_attention_gluon_configs --head-dims 64 \
                --time-limit 260 --smoke-log "$OUT/fa_gluon_smoke.log" --out "$OUT/flash_attention_gluon_configs_d64.json" ;;
    fa_gluon_tests) step fa_gluon_tests 200 python3 -m pytest -q -rfE --durations=5 tests/test_flash_attention_gluon.py ;;
    fa_gluon_bwd) step fa_gluon_bwd 300 python3 -m benchmarks.flash_attention_bwd --hopper-forward gluon --head-dims 128 \
                --out "$OUT/flash_attention_bwd_gluon.json" ;;
    fa_gluon_ablation) step fa_gluon 200 python3 -m benchmarks.flash_attention_hopper --variants tma_wide,gluon_ws \
                --time-limit 130 --out "$OUT/flash_attention_hopper_gluon.json" ;;
    fa_gluon_best) # the ablation (tma_wide beside gluon_ws, cuDNN first) with the sweep's fastest config per (D, causal)
              step fa_gluon_best ${BEST_LIMIT:-200} python3 -m benchmarks.flash_attention_hopper --variants tma_wide,gluon_ws \
                --gluon-configs "$OUT/flash_attention_gluon_configs.json" --time-limit $(( ${BEST_LIMIT:-200} - 70 )) \
                --out "$OUT/flash_attention_hopper_gluon_best.json" ;;
    fa_gluon_mini) # the least device time that says something (~4 min, no smoke run: each config is still checked
              # against cuDNN before it is timed, and a hang costs only the configs after it): D = 128, causal first,
              # the default and the switches' main combinations
              step fa_gluon_configs ${MINI_LIMIT:-240} python3 -m benchmarks.flash_attention_gluon_configs --causal-first \
                --pick "$MINI_PICK" --time-limit $(( ${MINI_LIMIT:-240} - 110 )) \
                --out "$OUT/flash_attention_gluon_configs.json" ;;
    fa_gluon_quick) step fa_gluon_smoke 100 python3 -m benchmarks.flash_attention_gluon_smoke --quick
              # a short call (~6 min): 9 smoke cases, the sweep at D = 128 without the configs whose case failed
              step fa_gluon_configs 260 python3 -m benchmarks.flash_attention_gluon_configs --time-limit 200 \
                --smoke-log "$OUT/fa_gluon_smoke.log" --out "$OUT/flash_attention_gluon_configs.json" ;;
    fa_fwd) step fa_fwd 330 python3 -m benchmarks.flash_attention --out "$OUT/flash_attention.json" ;;
    prefill_profile) step prefill_profile 240 python3 -m benchmarks.prefill_profile --out "$OUT/prefill_profile.json"
               step prefill_profile_full 200 python3 -m benchmarks.prefill_profile --mode FULL \
                 --out "$OUT/prefill_profile_full.json" ;;
    profile_full) step prefill_profile_full 200 python3 -m benchmarks.prefill_profile --mode FULL --top 20 \
                 --out "$OUT/prefill_profile_full.json" ;;
    paged) step paged 400 python3 -m benchmarks.paged_attention --splits --out "$OUT/paged_attention.json" ;;
    paged_tune) step paged_tune 480 python3 -m benchmarks.paged_attention --tune --out "$OUT/paged_attention_tune.json" ;;
    bench_batching) step bench_batching 450 python3 -m benchmarks.engine_batching ;;
    bench_spec_prefix) step bench_speculative 300 python3 -m benchmarks.speculative
               step bench_prefix 200 python3 -m benchmarks.prefix_caching ;;
    fa_bwd_configs) for kern in dkdv dq; do step "fa_configs_$kern" 240 python3 -m benchmarks.flash_attention_configs \
                 --kernel $kern --time-limit 150 --out "$OUT/flash_attention_configs_$kern.json"; done ;;
    serving7) serving 7 --models tiny --ablation --time-limit 420 ;;
    fa_atomic) step fa_atomic_tests 170 python3 -m pytest -v -rfE tests/test_flash_attention_bwd.py -k "gpu and atomic"
               step fa_configs_dkdv_dq 140 python3 -m benchmarks.flash_attention_configs --kernel dkdv_dq --time-limit 90 \
                 --out "$OUT/flash_attention_configs_dkdv_dq.json"
               step fa_bwd_atomic 220 python3 -m benchmarks.flash_attention_bwd --atomic-dq --head-dims 128 \
                 --out "$OUT/flash_attention_bwd_atomic.json" ;;
    fa_auto) step fa_auto_tests 240 python3 -m pytest -q -rfE --durations=5 tests/test_flash_attention_hopper.py \
                 tests/test_flash_attention.py -k "gpu or auto or default"
               step fa_bwd 330 python3 -m benchmarks.flash_attention_bwd --hopper-forward portable \
                 --out "$OUT/flash_attention_bwd.json" ;;
    fa_auto128) step fa_auto_tests 200 python3 -m pytest -q -rfE --durations=5 tests/test_flash_attention_hopper.py \
                 tests/test_flash_attention.py -k "gpu or auto or default"
               step fa_bwd 200 python3 -m benchmarks.flash_attention_bwd --hopper-forward portable --head-dims 128 \
                 --out "$OUT/flash_attention_bwd.json" ;;
    fa_bwd_tma) step fa_bwd_tma 300 python3 -m benchmarks.flash_attention_bwd --hopper-forward tma_wide --head-dims 128 \
                 --out "$OUT/flash_attention_bwd_tma.json" ;;
    int8_sweep) step int8_tests 200 python3 -m pytest -q -rfE tests/test_paged_attention_int8_gluon.py \
                 tests/test_kv_quant.py -k "gpu or k_int8_dot or biased or sweep"
               step int8_sweep 300 python3 -m benchmarks.int8_kernel_sweep --out "$OUT/int8_kernel_sweep.json" ;;
    kv_quant) step kv_quant 330 python3 -m benchmarks.kv_quant --out "$OUT/kv_quant.json" ;;
    *) echo "unknown step $s" | tee -a "$OUT/env.log" ;;
  esac
done
