"""Tensor parallelism the Megatron way (Shoeybi et al., 2019, section 3), on the course model.

Each decoder layer has two blocks, and each block is one *column-parallel* linear followed by one
*row-parallel* linear:

    attention:  q_proj, k_proj, v_proj  column-parallel (each rank owns Hq/tp query and Hkv/tp kv heads)
                attention itself        local: a head never needs another head
                o_proj                  row-parallel: partial sums [B, S, E] -> all-reduce #1
    MLP:        gate_proj, up_proj      column-parallel (each rank owns F/tp hidden units)
                silu(gate) * up         local: elementwise on the rank's own units
                down_proj               row-parallel: partial sums [B, S, E] -> all-reduce #2

so a forward pass needs exactly two all-reduces per layer and no other communication. Embeddings,
norms and the LM head stay replicated (Megatron also splits the vocabulary; the course keeps it simple).

A weight ``W [out, in]`` computes ``y = x Wᵀ``. Column-parallel splits ``out`` (rows of W): each rank
gets a slice of y and needs no communication. Row-parallel splits ``in`` (columns of W): each rank
multiplies its slice of x and gets a *partial sum* of the whole y; the all-reduce adds them up.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from course_lib.parallel.comm import CommStats


def shard(weight: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank's contiguous slice of ``weight`` along ``dim`` (which must divide by ``world_size``)."""
    if weight.shape[dim] % world_size:
        raise ValueError(f"cannot split dim {dim} of size {weight.shape[dim]} into {world_size} equal shards")
    return weight.chunk(world_size, dim=dim)[rank].contiguous()


def row_parallel_forward(x_shard: torch.Tensor, weight_shard: torch.Tensor, bias: torch.Tensor | None = None,
                         all_reduce=dist.all_reduce) -> torch.Tensor:
    """y = x Wᵀ + b with W split along its input dim: x_shard [..., in/tp], weight_shard [out, in/tp] -> [..., out].

    ``all_reduce(t)`` sums ``t`` over the ranks in place (``dist.all_reduce``'s contract).
    """
    y = x_shard @ weight_shard.T          # this rank's partial sum over its in/tp inputs: [..., out]
    all_reduce(y)                          # every rank now holds the full sum
    if bias is not None:                   # after the reduce: added once, not tp times
        y = y + bias
    return y


class ColumnParallelLinear(nn.Module):
    """The rank's rows of an ``nn.Linear``: output features ``[rank·out/tp, (rank+1)·out/tp)``. No communication."""

    def __init__(self, linear: nn.Linear, rank: int, world_size: int):
        super().__init__()
        self.weight = nn.Parameter(shard(linear.weight.detach(), 0, rank, world_size), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(
            shard(linear.bias.detach(), 0, rank, world_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x [..., in] (replicated) -> [..., out/tp]
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """The rank's columns of an ``nn.Linear``: input features ``[rank·in/tp, ...)``, then one all-reduce."""

    def __init__(self, linear: nn.Linear, rank: int, world_size: int, stats: CommStats, all_reduce=None):
        super().__init__()
        self.weight = nn.Parameter(shard(linear.weight.detach(), 1, rank, world_size), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.stats, self._all_reduce = stats, all_reduce

    def forward(self, x_shard: torch.Tensor) -> torch.Tensor:   # x_shard [..., in/tp] -> [..., out]
        return row_parallel_forward(x_shard, self.weight, self.bias,
                                    lambda t: self.stats.all_reduce(t, self._all_reduce))


def check_tp_size(config, world_size: int) -> None:
    """Raise a ValueError unless heads, kv heads and the MLP width all divide by ``world_size``."""
    Hq, Hkv, Fh = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if Hkv % world_size:
        raise ValueError(
            f"tensor parallelism over {world_size} ranks needs num_key_value_heads % tp == 0, got Hkv={Hkv}: "
            f"each rank must own whole kv heads (with Hkv < tp, vLLM replicates kv heads; not done here)")
    if Hq % world_size or Fh % world_size:
        raise ValueError(f"Hq={Hq} and F={Fh} must divide by tp={world_size}")


def shard_model(model, rank: int, world_size: int, stats: CommStats | None = None, all_reduce=None):
    """A copy of the course ``Llama`` holding only rank's shards (Megatron layout); returns (model, stats).

    The layers' own ``forward`` runs unchanged: only their linears are swapped and the head counts divided,
    so attention sees Hq/tp query heads and Hkv/tp kv heads (query head h still reads kv head h // (Hq/Hkv)).
    """
    check_tp_size(model.config, world_size)
    stats = stats or CommStats()
    tp = copy.deepcopy(model)
    for layer in tp.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, ColumnParallelLinear(getattr(attn, name), rank, world_size))
        attn.o_proj = RowParallelLinear(attn.o_proj, rank, world_size, stats, all_reduce)        # all-reduce 1
        attn.num_heads //= world_size
        attn.num_kv_heads //= world_size
        mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, rank, world_size)
        mlp.up_proj = ColumnParallelLinear(mlp.up_proj, rank, world_size)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, rank, world_size, stats, all_reduce)    # all-reduce 2
    return tp, stats


@torch.no_grad()
def greedy_no_cache(model, input_ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, S, V] of ``input_ids`` and ``steps`` greedy tokens [B, steps] (full forward each step)."""
    logits = model(input_ids)
    ids, tokens = input_ids, []
    for step in range(steps):
        last = logits[:, -1] if step == 0 else model(ids, last_token_only=True)[:, -1]
        tokens.append(last.argmax(-1, keepdim=True))
        ids = torch.cat([ids, tokens[-1]], dim=1)
    return logits, torch.cat(tokens, dim=1) if tokens else input_ids[:, :0]


def tp_rank(ctx, input_ids: torch.Tensor, steps: int = 4, dtype: str = "float32", time_comm: bool = False,
            reps: int = 1) -> dict:
    """Rank function: load the shipped model, keep this rank's TP shard, run a forward and greedy decoding.

    Returns logits, greedy tokens, the all-reduces and bytes of one forward, its median time over ``reps``
    and, with ``time_comm``, the time spent inside the all-reduces (one more forward, synchronized).
    """
    import statistics
    import time

    from course_lib.model.checkpoint import load_tiny

    model, _ = load_tiny("target", dtype=getattr(torch, dtype), device=ctx.device)
    tp, stats = shard_model(model, ctx.rank, ctx.world_size)
    del model
    ids = input_ids.to(ctx.device)
    with torch.no_grad():
        tp(ids)  # warm-up (allocations, NCCL communicator set-up)
        times = []
        for _ in range(reps):
            stats.reset()
            dist.barrier()
            _sync(ctx.device)
            t0 = time.perf_counter()
            logits = tp(ids)
            _sync(ctx.device)
            times.append(time.perf_counter() - t0)
        first = dict(all_reduces=stats.all_reduces, bytes=stats.bytes, sizes=list(stats.sizes), all_reduce_s=None)
        if time_comm:  # one more forward that synchronizes around each all-reduce to time it
            stats.reset()
            stats.timed = True
            tp(ids)
            stats.timed = False
            first["all_reduce_s"] = stats.seconds
        _, tokens = greedy_no_cache(tp, ids, steps)
    return dict(rank=ctx.rank, logits=logits.cpu(), tokens=tokens.cpu(), forward_s=statistics.median(times),
                num_layers=len(tp.model.layers), **first)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
