"""A pipeline on one clock, in one process: the model's real stages, the schedule counted in steps.

``run_pipeline`` (pipeline.py) runs the stages in processes and measures its timeline in seconds, which noise
and unequal stages blur. Here the stages are objects of one process and time is counted in *steps*: in each step
every stage that has a micro-batch waiting in its inbox runs it through its layers (one step = one stage forward
of one micro-batch), and its output reaches the next stage's inbox for the next step. A stage with an empty inbox
that still expects micro-batches waits ("recv" events, as ``run_pipeline`` records them). The timeline (events as
in ``schedule.py``, times in steps) is the one the schedule makes, measured as it runs; the tokens are the model's.
"""
from __future__ import annotations

from collections import deque

import torch


def run_lockstep(stages, input_ids: torch.Tensor, num_microbatches: int, events: list,
                 clock: int = 0) -> tuple[torch.Tensor, int]:
    """One forward of ``input_ids`` [B, S] through ``stages`` (``pipeline.Stage`` objects, in order), cut into
    ``num_microbatches`` micro-batches along B, starting at step ``clock``. Appends the events to ``events``;
    returns the logits [B, S, V] and the step at which the last stage finished."""
    p, m = len(stages), num_microbatches
    if not 1 <= m <= input_ids.shape[0]:
        raise ValueError(f"num_microbatches must be in 1..B={input_ids.shape[0]}, got {m}")
    inbox = [deque() for _ in range(p)]               # (micro-batch, its input) waiting at each stage
    inbox[0].extend(enumerate(input_ids.tensor_split(m, dim=0)))
    done, outs, step = [0] * p, [None] * m, clock
    while done[-1] < m:
        arrived = []
        for s, stage in enumerate(stages):
            if not inbox[s]:
                if done[s] < m:                       # waiting for the previous stage
                    last = next((e for e in reversed(events) if e["stage"] == s), None)
                    if last is not None and last["kind"] == "recv" and last["end"] == step:
                        last["end"] = step + 1        # the same wait, one step longer
                    else:
                        events.append(dict(stage=s, mb=done[s], kind="recv", start=step, end=step + 1))
                continue
            j, x = inbox[s].popleft()
            y = stage(x)                              # [b, S, E] (the last stage: logits [b, S, V])
            events.append(dict(stage=s, mb=j, kind="F", start=step, end=step + 1))
            done[s] += 1
            if s == p - 1:
                outs[j] = y
            else:
                arrived.append((s + 1, j, y))
        for s, j, y in arrived:                       # sent this step: usable from the next one on
            inbox[s].append((j, y))
        step += 1
    return torch.cat(outs, dim=0), step


@torch.no_grad()
def lockstep_greedy(stages, input_ids: torch.Tensor, steps: int, num_microbatches: int,
                    clock: int = 0) -> tuple[torch.Tensor, list[dict]]:
    """``steps`` greedy tokens [B, steps] (no KV cache: every forward runs the whole sequence, as
    ``pipeline_greedy`` does) and the timeline of all the forwards on one clock: forward k + 1 starts when the last
    stage has finished forward k (stage 0 needs the sampled tokens)."""
    events, ids, tokens = [], input_ids, []
    for _ in range(steps):
        logits, clock = run_lockstep(stages, ids, num_microbatches, events, clock)
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
        ids = torch.cat([ids, tokens[-1]], dim=1)
    return torch.cat(tokens, dim=1), events
