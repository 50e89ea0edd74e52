"""Whole-sequence swap against partial, tail-first swap on the same requests (lesson 04, benchmarks/partial_swap.py).

``compare_swap_policies`` serves one trace twice, with ``preemption_mode="swap"`` and then with
``enable_partial_swap=True`` on top (course_lib.serving.partial_swap), and returns what each moved and how its
preempted sequences resumed: counts and bytes, which are the same on every machine. Time is an observation
only (the engine's clock), never a result to assert.
"""
from __future__ import annotations

import numpy as np

from course_lib.serving.engine import LLMEngine

POLICIES = {"whole": False, "partial": True}    # name -> enable_partial_swap


def swap_counters(engine: LLMEngine) -> dict:
    """The swap counters of the engine's last ``generate`` run."""
    m = engine.metrics
    steps = np.asarray(m.resume_steps) if m.resume_steps else np.zeros(0)
    return dict(preemptions=dict(m.preemptions), blocks_out=m.num_swapped_blocks, blocks_in=m.num_swapped_in_blocks,
                bytes_out=m.swap_bytes, bytes_in=m.swap_in_bytes, swap_out_ops=m.swap_ops.get("out", 0),
                swap_in_ops=m.swap_ops.get("in", 0), resumes=len(steps),
                resume_steps_mean=float(steps.mean()) if len(steps) else None,     # JSON keeps None, not NaN
                resume_steps_max=int(steps.max()) if len(steps) else 0,
                recomputed_tokens=m.num_recomputed_tokens, num_steps=len(m.steps), bytes_per_block=m.bytes_per_block,
                elapsed_s=m.elapsed_s)


def compare_swap_policies(model, prompts, params, *, arrival_times=None, **engine_kwargs) -> dict:
    """Serve ``prompts`` with whole-sequence swap and with partial swap (``engine_kwargs``: the other
    ``EngineConfig`` fields, e.g. ``num_blocks`` small enough to force preemption). Returns
    ``{"whole": counters, "partial": counters, "identical_outputs": bool}`` (``swap_counters``)."""
    result, tokens = {}, {}
    for name, partial in POLICIES.items():
        engine = LLMEngine(model, preemption_mode="swap", enable_partial_swap=partial, **engine_kwargs)
        outputs = engine.generate(prompts, params, arrival_times=arrival_times, use_tqdm=False)
        result[name], tokens[name] = swap_counters(engine), [o.token_ids for o in outputs]
    result["identical_outputs"] = tokens["whole"] == tokens["partial"]
    return result


def swap_table(result: dict) -> str:
    """The two policies side by side, one counter a line."""
    rows = [("preemptions by swap", lambda r: r["preemptions"].get("swap", 0)),
            ("preemptions by recompute (CPU pool full)", lambda r: r["preemptions"].get("recompute", 0)),
            ("blocks copied out (device -> CPU)", lambda r: r["blocks_out"]),
            ("blocks copied in (CPU -> device)", lambda r: r["blocks_in"]),
            ("MiB moved, both ways", lambda r: (r["bytes_out"] + r["bytes_in"]) / 2**20),
            ("swap-out copies (a sequence's blocks in one step)", lambda r: r["swap_out_ops"]),
            ("swap-in copies", lambda r: r["swap_in_ops"]),
            ("resumed sequences", lambda r: r["resumes"]),
            ("steps from preemption to resumption, mean", lambda r: r["resume_steps_mean"]),
            ("tokens recomputed", lambda r: r["recomputed_tokens"]),
            ("engine steps", lambda r: r["num_steps"])]
    lines = [f"{'':52s}{'whole':>10s}{'partial':>10s}"]
    for label, get in rows:
        a, b = get(result["whole"]), get(result["partial"])
        lines.append(f"{label:52s}{_cell(a)}{_cell(b)}")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return f"{'-':>10s}"
    return f"{value:10.2f}" if isinstance(value, float) else f"{value:10d}"
