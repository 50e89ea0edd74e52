"""Pipeline schedules on paper: op orders, an ideal-time simulation, the bubble, and a timeline plot.

An *event* is a dict ``{"stage", "mb", "kind", "start", "end"}`` (times in seconds, or in units of one
forward in the ideal simulation). ``kind`` is "F" (forward of a micro-batch), "B" (its backward, training
only), or, in measured timelines, "recv" (waiting for the previous stage) and "send".

GPipe (Huang et al., 2019) runs every micro-batch's forward, then (in training) every backward.
1F1B (PipeDream-Flush, Narayanan et al., 2019/2021; Megatron-LM's default) starts the backward of a
micro-batch as soon as possible: after a warm-up of ``p - s - 1`` forwards, stage ``s`` alternates one
forward and one backward. Same bubble, ``(p - 1) / (m + p - 1)``, but at most ``p`` micro-batches'
activations alive instead of ``m``. Forward-only inference has no backward: see ``pipeline.py``.
"""
from __future__ import annotations

COMPUTE_KINDS = ("F", "B", "compute")


def bubble_formula(num_stages: int, num_microbatches: int) -> float:
    """Idle fraction of an ideal pipeline: ``(p - 1) / (m + p - 1)``."""
    p, m = num_stages, num_microbatches
    return (p - 1) / (m + p - 1)


def stage_ops(schedule: str, stage: int, num_stages: int, num_microbatches: int,
              backward: bool) -> list[tuple[str, int]]:
    """The order in which ``stage`` runs its ops: [("F", j) | ("B", j), ...]."""
    m = num_microbatches
    fwd = [("F", j) for j in range(m)]
    if not backward:
        return fwd          # forward only: both schedules run the micro-batches in order
    bwd = [("B", j) for j in range(m)]
    if schedule == "gpipe":
        return fwd + bwd
    if schedule == "1f1b":
        warm = min(num_stages - stage - 1, m)
        ops = fwd[:warm]
        for j in range(warm, m):         # steady state: one forward, one backward
            ops += [("F", j), ("B", j - warm)]
        return ops + bwd[m - warm:]      # cool-down: the remaining backwards
    raise ValueError(f"unknown schedule {schedule!r}: use 'gpipe' or '1f1b'")


def simulate(schedule: str, num_stages: int, num_microbatches: int, *, backward: bool = False,
             t_forward: float = 1.0, t_backward: float = 2.0) -> list[dict]:
    """Ideal timeline: every op starts when its stage is free and its input exists (no communication time).

    F(s, j) needs F(s-1, j); B(s, j) needs B(s+1, j) (the last stage's B needs its own F).
    """
    p, m = num_stages, num_microbatches
    ops = [stage_ops(schedule, s, p, m, backward) for s in range(p)]
    done: dict[tuple[str, int, int], float] = {}
    free, pos, events = [0.0] * p, [0] * p, []
    while any(pos[s] < len(ops[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if pos[s] == len(ops[s]):
                continue
            kind, j = ops[s][pos[s]]
            dep = ("F", s - 1, j) if kind == "F" else (("B", s + 1, j) if s < p - 1 else ("F", s, j))
            if kind == "F" and s == 0:
                ready = 0.0
            elif dep in done:
                ready = done[dep]
            else:
                continue
            start = max(free[s], ready)
            end = start + (t_forward if kind == "F" else t_backward)
            done[(kind, s, j)], free[s] = end, end
            events.append(dict(stage=s, mb=j, kind=kind, start=start, end=end))
            pos[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError(f"schedule {schedule!r} deadlocks")  # cannot happen for gpipe / 1f1b
    return events


def measured_bubble(events: list[dict]) -> float:
    """1 - (time the stages compute) / (stages x span from the first compute start to the last compute end)."""
    work = [e for e in events if e["kind"] in COMPUTE_KINDS]
    stages = {e["stage"] for e in work}
    span = max(e["end"] for e in work) - min(e["start"] for e in work)
    busy = sum(e["end"] - e["start"] for e in work)
    return 1.0 - busy / (len(stages) * span)


def max_in_flight(events: list[dict]) -> int:
    """Most micro-batches started by stage 0 and not yet finished by the last stage at any moment.

    With a backward (training) a micro-batch is finished when stage 0 ends its backward (its activations
    are freed); forward-only, when the last stage ends its forward.
    """
    work = [e for e in events if e["kind"] in COMPUTE_KINDS]
    last = max(e["stage"] for e in work)
    has_b = any(e["kind"] == "B" for e in work)
    starts = [e["start"] for e in work if e["stage"] == 0 and e["kind"] in ("F", "compute")]
    if has_b:
        ends = [e["end"] for e in work if e["stage"] == 0 and e["kind"] == "B"]
    else:
        ends = [e["end"] for e in work if e["stage"] == last and e["kind"] in ("F", "compute")]
    marks = sorted([(t, 1) for t in starts] + [(t, -1) for t in ends], key=lambda x: (x[0], x[1]))
    level = best = 0
    for _, step in marks:
        level += step
        best = max(best, level)
    return best


def plot_timeline(ax, events: list[dict], *, title: str = "", unit: str = "ms", scale: float = 1e3) -> None:
    """Gantt chart: one row per stage, one bar per op, colored by micro-batch (backward hatched)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    t0 = min(e["start"] for e in events)
    for e in events:
        if e["kind"] not in COMPUTE_KINDS and e["kind"] != "recv":
            continue
        left, width = (e["start"] - t0) * scale, (e["end"] - e["start"]) * scale
        if e["kind"] == "recv":   # waiting for the previous stage: thin grey bar
            ax.barh(e["stage"], width, left=left, height=0.25, color="lightgrey")
            continue
        ax.barh(e["stage"], width, left=left, height=0.8, color=cmap(e["mb"] % 10), edgecolor="black",
                linewidth=0.5, hatch="//" if e["kind"] == "B" else None, alpha=0.6 if e["kind"] == "B" else 1.0)
        ax.text(left + width / 2, e["stage"], f"{e['kind'] if e['kind'] != 'compute' else 'F'}{e['mb']}",
                ha="center", va="center", fontsize=7)
    stages = sorted({e["stage"] for e in events})
    ax.set_yticks(stages, [f"stage {s}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel(f"time ({unit})")
    ax.set_title(title, fontsize=10)


def simulate_decode(num_stages: int, num_batches: int, num_steps: int, *, t_stage: float = 1.0) -> list[dict]:
    """Ideal timeline of autoregressive decode on a pipeline with ``num_batches`` independent batches in flight
    (KsanaLLM's "PP multi-batch"; vLLM V1's batch queue, V0's virtual engines): step k of batch j enters stage 0
    only once step k - 1 of the same batch has left the last stage (its next token must be sampled first), and a
    stage runs one batch at a time. One batch leaves every stage idle (p - 1) / p of the time; p batches or more
    keep them all busy. Events as ``simulate``'s, with ``mb`` the batch and ``step`` the decode step."""
    p, m = num_stages, num_batches
    free = [0.0] * p
    done_last = [0.0] * m                   # when each batch's previous step left the last stage
    events = []
    for k in range(num_steps):
        for j in range(m):                  # round-robin: batches take turns, in order
            ready = done_last[j]
            for s in range(p):
                start = max(free[s], ready)
                ready = free[s] = start + t_stage
                events.append(dict(stage=s, mb=j, kind="F", start=start, end=ready, step=k))
            done_last[j] = ready
    return events
