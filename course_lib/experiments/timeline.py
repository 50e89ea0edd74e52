"""Pictures of a serving run (lesson 04): what each step computed, each request's life, KV blocks over time, and
the gaps between the tokens of decoding requests. Every function draws on a matplotlib ``ax`` from the
``RunMetrics`` / ``RequestOutput`` objects that ``LLMEngine`` and ``StaticBatchEngine`` return."""
from __future__ import annotations

import numpy as np

from course_lib.serving.metrics import RequestOutput, RunMetrics


def plot_batch_composition(ax, metrics: RunMetrics, title: str = "") -> None:
    """One bar per step (x: its start and duration, in s), stacked: sequences decoding, sequences prefilling a
    prompt (or a chunk of it), and rows computed for nothing (static batching: padding and finished rows)."""
    starts = np.array([s.start for s in metrics.steps])
    widths = np.array([s.duration for s in metrics.steps])
    prefill = np.array([sum(1 for _, n in s.composition if n > 1) for s in metrics.steps])
    decode = np.array([s.num_decode_tokens for s in metrics.steps])
    wasted = np.array([s.num_running for s in metrics.steps]) - prefill - decode
    ax.bar(starts, decode, widths, align="edge", color="C0", label="sequences decoding (1 token each)", linewidth=0)
    ax.bar(starts, prefill, widths, bottom=decode, align="edge", color="C1", label="sequences prefilling", linewidth=0)
    ax.bar(starts, wasted, widths, bottom=decode + prefill, align="edge", color="lightgray",
           label="rows computed for nothing (finished / padding)", linewidth=0)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("sequences in the step")
    ax.set_title(title or f"{metrics.name} batching: batch composition step by step")
    ax.legend(fontsize=7, loc="upper right")


def plot_request_gantt(ax, outputs: list[RequestOutput], title: str = "") -> None:
    """One line per request: waiting (gray, from arrival to first scheduled), then served (until finished)."""
    ok = [o for o in outputs if o.ok]
    for row, o in enumerate(ok):
        m = o.metrics
        ax.plot([m.arrival_time, m.first_scheduled_time], [row, row], color="lightgray", lw=2)
        ax.plot([m.first_scheduled_time, m.finished_time], [row, row], color="C2", lw=2)
        ax.plot([m.first_token_time], [row], "|", color="k", ms=4)
    ax.plot([], [], color="lightgray", lw=2, label="waiting")
    ax.plot([], [], color="C2", lw=2, label="in the batch")
    ax.plot([], [], "|", color="k", label="first token")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("request")
    ax.set_title(title or "each request's life")
    ax.legend(fontsize=7, loc="lower right")


def plot_blocks(ax, metrics: RunMetrics, label: str, color: str = "C0", show_pool: bool = True) -> None:
    """KV blocks in use after each step, with a marker at each preemption (x = recompute, v = swap) and a dashed
    line at the pool's size (``show_pool``)."""
    t = [s.start + s.duration for s in metrics.steps]
    ax.step(t, metrics.blocks_used, where="post", color=color, label=label)
    for s in metrics.steps:
        for _, mode in s.preempted:
            ax.plot(s.start, s.blocks_used, "x" if mode == "recompute" else "v", color=color, ms=6)
    if metrics.num_blocks and show_pool:
        ax.axhline(metrics.num_blocks, color="k", ls="--", lw=0.8)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KV blocks in use")


def plot_inter_token_gaps(ax, outputs: list[RequestOutput], label: str, color: str = "C0", marker: str = "o") -> None:
    """Every gap between two consecutive tokens of the given requests (y, in ms), at the time of the later one."""
    x, y = [], []
    for o in outputs:
        times = o.outputs[0].token_times
        x += times[1:]
        y += [1e3 * (b - a) for a, b in zip(times, times[1:])]
    ax.plot(x, y, marker, color=color, ms=3, label=label, alpha=0.7)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("time between two tokens (ms)")
