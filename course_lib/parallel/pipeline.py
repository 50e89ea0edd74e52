"""Pipeline parallelism for inference: the layers split into stages, one process per stage.

Stage 0 holds the embedding and the first L/p layers, the last stage the last layers, the final norm and
the LM head. A batch is cut into ``m`` micro-batches (along B); each goes stage to stage with
``send``/``recv`` of its activations ``[b, S, E]``, so stage s works on micro-batch j while stage s+1 works
on micro-batch j-1.

Schedules, forward only:

* ``gpipe``: every stage runs its micro-batches one after the other as soon as their input arrives.
* ``1f1b``: in training, "one forward, one backward" keeps at most ``p`` micro-batches' activations alive.
  Inference has no backward, so here its counterpart is the *completion*: the last stage tells stage 0 when
  a micro-batch is done (a tiny message standing for the backward, and in autoregressive decoding for the
  sampled token that stage 0 needs anyway), and stage 0 admits micro-batch j only after j - p is done.
  Same bubble, same latency; at most ``p`` micro-batches in flight even when the stages are unbalanced.

Every rank records events (see ``schedule.py``) timed from a common barrier: the timeline plots.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from course_lib.model.rope import rope_cos_sin


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, balanced layer ranges, one per stage (the first stages take the extra layers)."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


class Stage(nn.Module):
    """One pipeline stage of the course ``Llama``: [embedding] + its layers + [final norm, LM head]."""

    def __init__(self, model, stage: int, num_stages: int):
        super().__init__()
        self.config, self.stage, self.num_stages = model.config, stage, num_stages
        self.layer_ids = split_layers(model.config.num_hidden_layers, num_stages)[stage]
        self.is_first, self.is_last = stage == 0, stage == num_stages - 1
        self.embed_tokens = model.model.embed_tokens if self.is_first else None
        self.layers = nn.ModuleList(model.model.layers[i] for i in self.layer_ids)
        self.norm = model.model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stage 0: token ids [b, S]; others: hidden states [b, S, E]. Last stage: logits [b, S, V] (fp32)."""
        if self.is_first:
            x = self.embed_tokens(x)                                            # [b, S, E]
        positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype,
                                self.config.rope_scaling)
        for i, layer in zip(self.layer_ids, self.layers):
            x = layer(x, cos, sin, i)
        if self.is_last:
            x = self.lm_head(self.norm(x)).float()                              # [b, S, V]
        return x


def _sync(device: torch.device) -> None:
    # Only the compute stream: an isend still running on NCCL's stream must not count as compute time.
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def run_pipeline(stage: Stage, input_ids: torch.Tensor, num_microbatches: int, schedule: str = "gpipe",
                 events: list | None = None, t_ref: float = 0.0) -> torch.Tensor | None:
    """One forward of ``input_ids`` [B, S] through the pipeline (call it on every rank; rank = stage).

    Returns the logits [B, S, V] on the last stage, None elsewhere. Appends events to ``events``.
    """
    if schedule not in ("gpipe", "1f1b"):
        raise ValueError(f"unknown schedule {schedule!r}: use 'gpipe' or '1f1b'")
    s, p, m = stage.stage, stage.num_stages, num_microbatches
    if not 1 <= m <= input_ids.shape[0]:
        raise ValueError(f"num_microbatches must be in 1..B={input_ids.shape[0]}, got {m}")
    device, dtype = input_ids.device, stage.layers[0].input_layernorm.weight.dtype
    chunks = input_ids.tensor_split(m, dim=0)                       # micro-batches [b_j, S]
    ack = torch.zeros(1, device=device)
    limit = p if schedule == "1f1b" else m                          # micro-batches allowed in flight
    events = events if events is not None else []
    outs, sends, acks_sent = [], [], 0

    def record(kind, j, start):
        _sync(device)
        events.append(dict(stage=s, mb=j, kind=kind, start=start - t_ref, end=time.perf_counter() - t_ref))

    for j in range(m):
        if stage.is_first and p > 1 and j >= limit:                         # 1F1B: wait until j - p has finished
            t0 = time.perf_counter()
            dist.recv(ack, src=p - 1)
            record("recv", j, t0)
        if stage.is_first:
            x = chunks[j]
        else:
            t0 = time.perf_counter()
            x = torch.empty(chunks[j].shape[0], input_ids.shape[1], stage.config.hidden_size, dtype=dtype,
                            device=device)
            dist.recv(x, src=s - 1)
            record("recv", j, t0)
        # The last stage acknowledges j-1 only after receiving j: with p=2 both directions share one NCCL
        # channel, and this keeps the order of sends and receives the same on both ranks (no deadlock).
        if stage.is_last and schedule == "1f1b" and p > 1 and j >= 1:
            dist.send(ack, dst=0)
            acks_sent += 1
        t0 = time.perf_counter()
        y = stage(x)
        record("compute", j, t0)
        if stage.is_last:
            outs.append(y)
        else:
            t0 = time.perf_counter()
            sends.append(dist.isend(y.contiguous(), dst=s + 1))     # don't wait: start micro-batch j+1
            record("send", j, t0)
    if stage.is_last and schedule == "1f1b" and p > 1:
        for _ in range(m - acks_sent):
            dist.send(ack, dst=0)
    if stage.is_first and schedule == "1f1b" and p > 1:
        for _ in range(m - max(0, m - limit)):                      # the acks not waited for in the loop
            dist.recv(ack, src=p - 1)
    for work in sends:
        work.wait()
    return torch.cat(outs, dim=0) if stage.is_last else None


def pipeline_greedy(stage: Stage, input_ids: torch.Tensor, steps: int, num_microbatches: int,
                    schedule: str = "gpipe") -> tuple[torch.Tensor | None, torch.Tensor]:
    """Logits of ``input_ids`` (last stage only, else None) and ``steps`` greedy tokens [B, steps] (every rank)."""
    p, ids, tokens, logits0 = stage.num_stages, input_ids, [], None
    for step in range(steps + 1):
        logits = run_pipeline(stage, ids, num_microbatches, schedule)
        if step == 0:
            logits0 = logits
        if step == steps:
            break
        nxt = logits[:, -1].argmax(-1, keepdim=True) if stage.is_last else \
            torch.empty(ids.shape[0], 1, dtype=torch.long, device=ids.device)
        dist.broadcast(nxt, src=p - 1)                               # stage 0 needs the token for the next step
        tokens.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
    return logits0, torch.cat(tokens, dim=1) if tokens else input_ids[:, :0]


def pp_rank(ctx, input_ids: torch.Tensor, num_microbatches: int, schedule: str = "gpipe", steps: int = 4,
            dtype: str = "float32", reps: int = 3) -> dict:
    """Rank function: this rank's stage of the shipped model; logits, greedy tokens and a measured timeline.

    The timeline is that of the fastest of ``reps`` timed forwards (after one warm-up), times in seconds
    from the moment the first rank leaves a barrier.
    """
    from course_lib.model.checkpoint import load_tiny

    model, _ = load_tiny("target", dtype=getattr(torch, dtype), device=ctx.device)
    stage = Stage(model, ctx.rank, ctx.world_size)
    ids = input_ids.to(ctx.device)
    run_pipeline(stage, ids, num_microbatches, schedule)             # warm-up
    best = None
    for _ in range(reps):
        events: list[dict] = []
        dist.barrier()
        # One time origin for all ranks: perf_counter is the machine's monotonic clock, shared by the
        # processes of one host (across hosts the clocks differ, and so would the alignment of timelines).
        t_ref = torch.tensor([time.perf_counter()], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(t_ref, op=dist.ReduceOp.MIN)
        t_ref = t_ref.item()
        logits = run_pipeline(stage, ids, num_microbatches, schedule, events, t_ref)
        _sync(ctx.device)
        elapsed = torch.tensor([time.perf_counter() - t_ref], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)              # the pipeline is done when its last rank is
        if best is None or elapsed.item() < best[0]:
            best = (elapsed.item(), events)
    logits, tokens = pipeline_greedy(stage, ids, steps, num_microbatches, schedule)
    return dict(rank=ctx.rank, layers=list(stage.layer_ids), logits=None if logits is None else logits.cpu(),
                tokens=tokens.cpu(), forward_s=best[0], events=best[1])
