"""Lesson 04 checks: each passes the solution, scores a stub "not attempted", and catches broken variants
(ceil vs floor blocks, skipping ahead in the queue, the wrong victim, a forgotten reset, decodes starved, ...)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from course_lib.grading import lesson04
from course_lib.serving.scheduler import RUNNING, SWAPPED, WAITING

ROOT = Path(__file__).resolve().parents[1]


def _stub(*args):
    raise NotImplementedError("Exercise: write this function")


def _assert_caught(result, hint_part=None):
    assert (result.status, result.points) == ("failed", 0), result
    assert "hint:" in result.message or "your code raised" in result.message
    if hint_part:
        assert hint_part in result.message, result.message


# ---------------------------------------------------------------- 1. admission
def admit(waiting, num_free_blocks, block_size, num_running, max_num_seqs, token_budget, watermark=0):
    admitted = []
    for seq_id, num_tokens in waiting:
        need = -(-num_tokens // block_size)
        if num_running + len(admitted) >= max_num_seqs or num_tokens > token_budget:
            break
        if num_free_blocks - need < watermark:
            break
        admitted.append(seq_id)
        num_free_blocks -= need
        token_budget -= num_tokens
    return admitted


def admit_floor(waiting, num_free_blocks, block_size, num_running, max_num_seqs, token_budget, watermark=0):
    return admit([(s, n // block_size * block_size) for s, n in waiting], num_free_blocks, block_size, num_running,
                 max_num_seqs, token_budget, watermark)


def admit_skipping(waiting, num_free_blocks, block_size, num_running, max_num_seqs, token_budget, watermark=0):
    admitted = []
    for seq_id, num_tokens in waiting:                      # `continue` instead of `break`: overtaking
        need = -(-num_tokens // block_size)
        if num_running + len(admitted) < max_num_seqs and num_tokens <= token_budget and num_free_blocks - need >= watermark:
            admitted.append(seq_id)
            num_free_blocks -= need
            token_budget -= num_tokens
    return admitted


def admit_no_watermark(waiting, num_free_blocks, block_size, num_running, max_num_seqs, token_budget, watermark=0):
    return admit(waiting, num_free_blocks, block_size, num_running, max_num_seqs, token_budget, 0)


def admit_ignores_running(waiting, num_free_blocks, block_size, num_running, max_num_seqs, token_budget, watermark=0):
    return admit(waiting, num_free_blocks, block_size, 0, max_num_seqs, token_budget, watermark)


def test_admit_check():
    assert lesson04.check_admit(admit).status == "passed"
    assert lesson04.check_admit(_stub).status == "not attempted"
    _assert_caught(lesson04.check_admit(admit_floor), "ceil(n / block_size)")
    _assert_caught(lesson04.check_admit(admit_skipping), "first come, first served")
    _assert_caught(lesson04.check_admit(admit_no_watermark), "watermark")
    _assert_caught(lesson04.check_admit(admit_ignores_running), "num_running")


# ---------------------------------------------------------------- 2. preemption
def preempt(running, block_manager, cpu_block_manager, waiting, swapped, mode):
    return _execute(max(running, key=lambda s: s.priority), running, block_manager, cpu_block_manager, waiting,
                    swapped, mode)


def _execute(victim, running, block_manager, cpu_block_manager, waiting, swapped, mode):
    running.remove(victim)
    held = block_manager.num_tokens[victim.seq_id]
    mapping = []
    if mode == "swap" and cpu_block_manager.can_allocate(held):
        cpu_table = cpu_block_manager.allocate(victim.seq_id, held)
        mapping = list(zip(block_manager.block_table(victim.seq_id), cpu_table))
        block_manager.free(victim.seq_id)
        victim.status = SWAPPED
        swapped.append(victim)
    else:
        block_manager.free(victim.seq_id)
        victim.num_computed_tokens = 0
        victim.status = WAITING
        waiting.insert(0, victim)
    return victim, mapping


def preempt_oldest(running, block_manager, cpu_block_manager, waiting, swapped, mode):
    return _execute(min(running, key=lambda s: s.priority), running, block_manager, cpu_block_manager, waiting,
                    swapped, mode)


def preempt_no_reset(running, block_manager, cpu_block_manager, waiting, swapped, mode):
    victim, mapping = preempt(running, block_manager, cpu_block_manager, waiting, swapped, mode)
    if victim.status == WAITING:
        victim.num_computed_tokens = len(victim.prompt_token_ids)      # forgot that its K/V is gone
    return victim, mapping


def preempt_to_back(running, block_manager, cpu_block_manager, waiting, swapped, mode):
    victim, mapping = preempt(running, block_manager, cpu_block_manager, waiting, swapped, mode)
    if victim.status == WAITING:
        waiting.remove(victim)
        waiting.append(victim)
    return victim, mapping


def preempt_no_fallback(running, block_manager, cpu_block_manager, waiting, swapped, mode):
    victim = max(running, key=lambda s: s.priority)
    running.remove(victim)
    held = block_manager.num_tokens[victim.seq_id]
    if mode == "swap":                                    # assumes the CPU pool always has room
        cpu_table = cpu_block_manager.allocate(victim.seq_id, held)
        mapping = list(zip(block_manager.block_table(victim.seq_id), cpu_table))
        block_manager.free(victim.seq_id)
        victim.status = SWAPPED
        swapped.append(victim)
        return victim, mapping
    block_manager.free(victim.seq_id)
    victim.num_computed_tokens = 0
    victim.status = WAITING
    waiting.insert(0, victim)
    return victim, []


def preempt_mapping_after_free(running, block_manager, cpu_block_manager, waiting, swapped, mode):
    victim = max(running, key=lambda s: s.priority)
    running.remove(victim)
    held = block_manager.num_tokens[victim.seq_id]
    if mode == "swap" and cpu_block_manager.can_allocate(held):
        cpu_table = cpu_block_manager.allocate(victim.seq_id, held)
        block_manager.free(victim.seq_id)
        mapping = list(zip(range(len(cpu_table)), cpu_table))      # the device table is gone: guessed ids
        victim.status = SWAPPED
        swapped.append(victim)
        return victim, mapping
    running.append(victim)
    return _execute(victim, running, block_manager, cpu_block_manager, waiting, swapped, mode)


def test_preempt_check():
    assert RUNNING == "running"
    assert lesson04.check_preempt(preempt).status == "passed"
    assert lesson04.check_preempt(_stub).status == "not attempted"
    _assert_caught(lesson04.check_preempt(preempt_oldest), "LARGEST seq.priority")
    _assert_caught(lesson04.check_preempt(preempt_no_reset), "num_computed_tokens = 0")
    _assert_caught(lesson04.check_preempt(preempt_to_back), "waiting.insert(0, victim)")
    _assert_caught(lesson04.check_preempt(preempt_no_fallback))
    _assert_caught(lesson04.check_preempt(preempt_mapping_after_free), "BEFORE freeing")


# ---------------------------------------------------------------- 3. the token budget
def split_budget(decodes, prefills, budget, chunked=True):
    out = []
    for seq_id in decodes:
        if budget == 0:
            break
        out.append((seq_id, 1))
        budget -= 1
    for seq_id, remaining in prefills:
        n = min(remaining, budget) if chunked else (remaining if remaining <= budget else 0)
        if n == 0:
            break
        out.append((seq_id, n))
        budget -= n
    return out


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


def split_zero_entries(decodes, prefills, budget, chunked=True):
    out = [(s, 1) for s in decodes[:budget]]
    budget -= len(out)
    for seq_id, remaining in prefills:
        n = min(remaining, budget) if chunked else (remaining if remaining <= budget else 0)
        out.append((seq_id, n))                  # keeps 0-token entries
        budget -= n
    return out


def split_never_chunks(decodes, prefills, budget, chunked=True):
    return split_budget(decodes, prefills, budget, chunked=False)


def split_over_budget(decodes, prefills, budget, chunked=True):
    return [(s, 1) for s in decodes] + [(s, r) for s, r in prefills]


def test_split_budget_check():
    assert lesson04.check_split_budget(split_budget).status == "passed"
    assert lesson04.check_split_budget(_stub).status == "not attempted"
    _assert_caught(lesson04.check_split_budget(split_prefill_first), "decodes first")
    _assert_caught(lesson04.check_split_budget(split_zero_entries), "0 tokens")
    _assert_caught(lesson04.check_split_budget(split_never_chunks))
    _assert_caught(lesson04.check_split_budget(split_over_budget), "must not exceed the budget")


# ---------------------------------------------------------------- the benchmark script runs (CPU smoke mode)
def test_benchmark_script_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_batching", ROOT / "benchmarks" / "engine_batching.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for key in ("device", "date", "torch", "triton", "trace", "offline", "poisson", "ratio_continuous_over_static"):
        assert key in result, key
    assert result["offline"]["continuous"]["num_output_tokens"] == result["offline"]["static"]["num_output_tokens"]
    if result["dtype"] == "float32":   # in bf16 (a GPU) other batch shapes may round a near-tie the other way
        assert result["outputs_identical"]
