"""Lesson 04 checks: each passes the solution, scores a stub "not attempted", and catches broken variants
(ceil vs floor blocks, skipping ahead in the queue, the wrong victim, a forgotten reset, decodes starved, ...)."""
from __future__ import annotations

import json

import pytest

from course_lib.grading import lesson04
from course_lib.serving.scheduler import RUNNING
from conftest import assert_caught, assert_not_attempted, edited, solution, stub

SOLVED = solution("04_continuous_batching")


# ---------------------------------------------------------------- 1. admission
admit_floor = edited(SOLVED.admit, {"need = -(-num_tokens // block_size)": "need = num_tokens // block_size"})
admit_skipping = edited(SOLVED.admit, {"break": "continue"})        # a later request overtakes one that waits
admit_no_watermark = edited(SOLVED.admit, {"if num_free_blocks - need < watermark:": "if num_free_blocks - need < 0:"})
admit_ignores_running = edited(SOLVED.admit, {"if num_running + len(admitted) >= max_num_seqs":
                                              "if len(admitted) >= max_num_seqs"})


def test_admit_check():
    assert lesson04.check_admit(SOLVED.admit).status == "passed"
    assert_not_attempted(lesson04.check_admit(stub))
    assert_caught(lesson04.check_admit(admit_floor), "ceil(n / block_size)")
    assert_caught(lesson04.check_admit(admit_skipping), "first come, first served")
    assert_caught(lesson04.check_admit(admit_no_watermark), "watermark")
    assert_caught(lesson04.check_admit(admit_ignores_running), "num_running")


# ---------------------------------------------------------------- 2. preemption
preempt_oldest = edited(SOLVED.preempt, {"victim = max(running": "victim = min(running"})
preempt_no_reset = edited(SOLVED.preempt, {"    victim.num_computed_tokens = 0\n": ""})   # its K/V is gone
preempt_to_back = edited(SOLVED.preempt, {"waiting.insert(0, victim)": "waiting.append(victim)"})
preempt_no_fallback = edited(SOLVED.preempt, {       # assumes the CPU pool always has room
    'if mode == "swap" and cpu_block_manager.can_allocate(held):': 'if mode == "swap":'})
preempt_mapping_after_free = edited(SOLVED.preempt, {
    "mapping = list(zip(block_manager.block_table(victim.seq_id), cpu_table))\n"
    "        block_manager.free(victim.seq_id)":
    "block_manager.free(victim.seq_id)\n        mapping = list(zip(range(len(cpu_table)), cpu_table))  # guessed ids"})


def test_preempt_check():
    assert RUNNING == "running"
    assert lesson04.check_preempt(SOLVED.preempt).status == "passed"
    assert_not_attempted(lesson04.check_preempt(stub))
    assert_caught(lesson04.check_preempt(preempt_oldest), "LARGEST seq.priority")
    assert_caught(lesson04.check_preempt(preempt_no_reset), "num_computed_tokens = 0")
    assert_caught(lesson04.check_preempt(preempt_to_back), "waiting.insert(0, victim)")
    assert_caught(lesson04.check_preempt(preempt_no_fallback))
    assert_caught(lesson04.check_preempt(preempt_mapping_after_free), "BEFORE freeing")


# ---------------------------------------------------------------- 3. the token budget
def split_prefill_first(decodes, prefills, budget, chunked=True):
    out = []
    for seq_id, remaining in prefills:
        n = min(remaining, budget) if chunked else (remaining if remaining <= budget else 0)
        if n:
            out.append((seq_id, n))
            budget -= n
    for seq_id in decodes:
        if budget:
            out.append((seq_id, 1))
            budget -= 1
    return out


split_zero_entries = edited(SOLVED.split_budget, {"        if n == 0:\n            break\n": ""})   # keeps (seq, 0)


def split_never_chunks(decodes, prefills, budget, chunked=True):
    return SOLVED.split_budget(decodes, prefills, budget, chunked=False)


def split_over_budget(decodes, prefills, budget, chunked=True):
    return [(s, 1) for s in decodes] + [(s, r) for s, r in prefills]


def test_split_budget_check():
    assert lesson04.check_split_budget(SOLVED.split_budget).status == "passed"
    assert_not_attempted(lesson04.check_split_budget(stub))
    assert_caught(lesson04.check_split_budget(split_prefill_first), "decodes first")
    assert_caught(lesson04.check_split_budget(split_zero_entries), "0 tokens")
    assert_caught(lesson04.check_split_budget(split_never_chunks))
    assert_caught(lesson04.check_split_budget(split_over_budget), "must not exceed the budget")


# ---------------------------------------------------------------- the benchmark script runs (CPU smoke mode)
@pytest.mark.command
def test_benchmark_script_quick(tmp_path):
    from benchmarks import engine_batching as bench

    out = tmp_path / "r.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for key in ("device", "date", "torch", "triton", "trace", "offline", "poisson", "ratio_continuous_over_static"):
        assert key in result, key
    assert result["offline"]["continuous"]["num_output_tokens"] == result["offline"]["static"]["num_output_tokens"]
    if result["dtype"] == "float32":   # in bf16 (a GPU) other batch shapes may round a near-tie the other way
        assert result["outputs_identical"]


# ---------------------------------------------------------------- more mistakes a learner makes (issue 23)
admit_keeps_blocks = edited(SOLVED.admit, {"        num_free_blocks -= need\n": ""})      # every request sees the pool
admit_keeps_budget = edited(SOLVED.admit, {"        token_budget -= num_tokens\n": ""})
admit_one_too_many = edited(SOLVED.admit, {"if num_running + len(admitted) >= max_num_seqs":
                                           "if num_running + len(admitted) > max_num_seqs"})
admit_watermark_strict = edited(SOLVED.admit, {"if num_free_blocks - need < watermark:":
                                               "if num_free_blocks - need <= watermark:"})


@pytest.mark.parametrize("fn, hint", [
    (admit_keeps_blocks, "you did not subtract the blocks"),    # named before "ceil": the most specific hint wins
    (admit_keeps_budget, "you did not subtract the tokens"),
    (admit_one_too_many, "one sequence too many"),
    (admit_watermark_strict, "exactly `watermark` free blocks left is allowed"),
])
def test_admit_check_catches(fn, hint):
    assert_caught(lesson04.check_admit(fn), hint)


preempt_no_swap_status = edited(SOLVED.preempt, {"victim.status = SWAPPED": "pass"})
preempt_keeps_device_blocks_on_swap = edited(SOLVED.preempt, {
    "mapping = list(zip(block_manager.block_table(victim.seq_id), cpu_table))\n"
    "        block_manager.free(victim.seq_id)":
    "mapping = list(zip(block_manager.block_table(victim.seq_id), cpu_table))"})
preempt_by_arrival_only = edited(SOLVED.preempt, {"victim = max(running, key=lambda s: s.priority)":
                                                  "victim = max(running, key=lambda s: s.arrival_time)"})


def test_preempt_check_catches():
    assert_caught(lesson04.check_preempt(preempt_no_swap_status), "victim.status = SWAPPED")
    assert_caught(lesson04.check_preempt(preempt_keeps_device_blocks_on_swap), "block_manager.free")
    assert_caught(lesson04.check_preempt(preempt_by_arrival_only), "LARGEST seq.priority")


def split_decodes_ignore_budget(decodes, prefills, budget, chunked=True):   # every decode, budget or not
    out = [(s, 1) for s in decodes]
    return out + SOLVED.split_budget([], prefills, max(budget - len(decodes), 0), chunked)


split_skips_ahead = edited(SOLVED.split_budget, {"        if n == 0:\n            break\n":
                                                 "        if n == 0:\n            continue\n"})


def test_split_budget_check_catches():
    assert_caught(lesson04.check_split_budget(split_decodes_ignore_budget), "must not exceed the budget")
    assert_caught(lesson04.check_split_budget(split_skips_ahead), "first come, first served")


# ---------------------------------------------------------------- end to end: the four functions inside LLMEngine
PIECES = dict(admit=SOLVED.admit, preempt=SOLVED.preempt, split_budget=SOLVED.split_budget,
              paged_prefill=SOLVED.paged_prefill)


def _pieces(**broken):
    return [broken.get(name, fn) for name, fn in PIECES.items()]


@pytest.mark.usefixtures("one_thread")
def test_end_to_end_trace_preempts_both_ways_and_chunks(tiny):
    """The trace does what the check says (swaps, a recompute, prompt chunks after a prefix) with the library's
    decisions and with the solution's, and both give the library engine's tokens."""
    waves = lesson04._e2e_waves(tiny[1])
    want = lesson04.continuous_batching_generate(None, None, None, None, waves, plain=True)
    for pieces in ([None] * 4, _pieces()):
        got = lesson04.continuous_batching_generate(*pieces, waves)
        assert got["tokens"] == want["tokens"] and max(got["steps"]) <= lesson04._E2E_ENGINE["max_num_batched_tokens"]
        assert got["preemptions"]["swap"] > 0 and got["preemptions"]["recompute"] > 0 and got["chunks"] > 0


@pytest.mark.usefixtures("one_thread")
def test_end_to_end_check():
    assert lesson04.check_end_to_end(*_pieces()).status == "passed"
    assert_not_attempted(lesson04.check_end_to_end(stub, stub, stub, stub))
    assert_not_attempted(lesson04.check_end_to_end(*_pieces(paged_prefill=stub)))
    assert_not_attempted(lesson04.check_end_to_end(*_pieces(preempt=stub)))


preempt_loses_victim = edited(SOLVED.preempt, {"    waiting.insert(0, victim)\n": ""})   # recompute: never requeued
prefill_top_left = edited(SOLVED.paged_prefill, {"pos = torch.arange(n) + (L - n)": "pos = torch.arange(n)"})
prefill_gqa_modulo = edited(SOLVED.paged_prefill, {   # query head h reads kv head h % Hkv
    "k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)":
    "k, v = k.repeat(1, G, 1), v.repeat(1, G, 1)"})
prefill_no_scale = edited(SOLVED.paged_prefill, {" / math.sqrt(D)": ""})


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("broken, hint", [
    (dict(admit=admit_floor), "ceil(n / block_size)"),
    (dict(admit=admit_skipping), "first come, first served"),
    (dict(preempt=preempt_oldest), "LARGEST seq.priority"),
    (dict(preempt=preempt_no_reset), "your preempt alone already changes the tokens"),
    (dict(preempt=preempt_to_back), "waiting.insert(0, victim)"),
    (dict(preempt=preempt_loses_victim), "its request is lost"),
    (dict(preempt=preempt_no_fallback), "OutOfBlocksError"),
    (dict(preempt=preempt_mapping_after_free), "read the table BEFORE freeing"),
    (dict(preempt=preempt_keeps_device_blocks_on_swap), "block_manager.free(seq_id)"),
    (dict(split_budget=split_prefill_first), "decodes first"),
    (dict(split_budget=split_never_chunks), "min(remaining, left)"),
    (dict(split_budget=split_over_budget), "must not exceed the budget"),
    (dict(paged_prefill=prefill_top_left), "aligned bottom-right"),
    (dict(paged_prefill=prefill_gqa_modulo), "h // G"),
    (dict(paged_prefill=prefill_no_scale), "1 / sqrt(D)"),
])
def test_end_to_end_check_catches(broken, hint):
    assert_caught(lesson04.check_end_to_end(*_pieces(**broken)), hint)
