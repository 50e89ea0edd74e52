"""The baseline of lesson 04: static batching, as ``model.generate`` on a padded batch does it (Hugging Face style).

Requests are served in batches of up to ``max_batch_size``. A batch starts with the requests that have arrived;
their prompts are **left-padded** to the longest one (so every row's last prompt token is in the last column),
prefilled together, and decoded in lockstep **until every row is done**. A row that finished early keeps
occupying its place (its tokens are computed and thrown away), and requests that arrive meanwhile wait for the
whole batch to end. The contiguous KV cache reserves ``batch x (longest prompt + longest output)`` slots up
front. Those are the three costs continuous batching removes: padding, finished rows, and waiting.

Padding needs what the rest of the course never needs: an attention mask that hides the pad tokens, and
positions that start at each row's first real token (``positions = column - padding``, as Hugging Face derives
position ids from the attention mask). Measured with the same clock and metrics as ``LLMEngine``
(``course_lib.serving.metrics``). A response is complete when its batch ends (``finished_time``), as with a batched
``generate`` call; each token is timed when it is produced (TTFT, inter-token latencies).
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from course_lib.serving.engine import _synchronize
from course_lib.model.kv_cache import KVCache
from course_lib.serving.metrics import (CompletionOutput, RequestMetrics, RequestOutput, RunMetrics, StepRecord,
                                       summarize)
from course_lib.serving.validation import check_call, check_request, check_step_time
from course_lib.model.sampling import sample_tokens
from course_lib.device import DEVICE

PAD_ID = 0   # any id works: padded keys are masked, and padded/finished rows' outputs are discarded


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_lens: torch.Tensor) -> torch.Tensor:
    """Causal attention (queries = the last Sq of Skv positions) that also hides the first pad_lens[b] keys of
    row b. q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], pad_lens [B] -> [B, Hq, Sq, D]. Computed like
    ``course_lib.model.attention.attention`` (float32 scores), plus the padding mask. A pad query may see itself, so
    that no row of scores is all -inf (its output is garbage nobody reads, but not NaN)."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    key = torch.arange(Skv, device=q.device)
    query = torch.arange(Sq, device=q.device) + (Skv - Sq)
    visible = (key[None, :] <= query[:, None])[None] & \
        ((key[None, None, :] >= pad_lens[:, None, None]) | (key[None, :] == query[:, None])[None])   # [B, Sq, Skv]
    qg = q.float().reshape(B, Hkv, Hq // Hkv, Sq, D)                                            # [B, Hkv, G, Sq, D]
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k.float()) / math.sqrt(D)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    out = torch.einsum("bhgqk,bhkd->bhgqd", torch.softmax(scores, dim=-1), v.float())
    return out.reshape(B, Hq, Sq, D).to(q.dtype)


class PaddedKVCache(KVCache):
    """The contiguous cache of lesson 01, attending with a padding mask (row b starts with pad_lens[b] pads)."""

    def __init__(self, config, pad_lens: list[int], max_seq_len: int, *, dtype=torch.float32, device=None):
        device = DEVICE if device is None else device
        super().__init__(config, len(pad_lens), max_seq_len, dtype=dtype, device=device)
        self.pad_lens = torch.tensor(pad_lens, device=device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_all, v_all = self.update(layer, k, v)
        return padded_attention(q, k_all, v_all, self.pad_lens)


class StaticBatchEngine:
    """Static batching on the same model and with the same interface and metrics as ``LLMEngine``."""

    def __init__(self, model, *, max_batch_size: int = 32, tokenizer=None, block_size: int = 16, seed: int = 0):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.block_size = block_size          # only to report reserved memory in the engine's unit (blocks)
        self.max_model_len = model.config.max_position_embeddings
        self.seed = seed
        self.metrics: RunMetrics | None = None

    def generate(self, prompts, params=None, *, arrival_times=None, step_time: float | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """As ``LLMEngine.generate``; step_time: seconds each forward pass costs on the replay clock (default: its
        measured time)."""
        prompts, params_list, arrivals = check_call(prompts, params, arrival_times)
        step_time = check_step_time(step_time)
        outputs, queue = [], []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            prompt_ids, p, error = check_request(i, prompt, p, vocab_size=self.model.config.vocab_size,
                                                 max_model_len=self.max_model_len, tokenizer=self.tokenizer)
            outputs.append(RequestOutput(i, prompt_ids, error=error, finished=True))   # returned when done
            if error is None:
                queue += [(arrivals[i], i, j, prompt_ids, p) for j in range(p.n)]   # one row per sample
        queue.sort(key=lambda r: (r[0], r[1], r[2]))
        bar = tqdm(total=len(queue), desc="rows", unit="row",
                   disable=not (len(prompts) >= 64 if use_tqdm is None else use_tqdm))
        clock, steps, rows_done = 0.0, [], {}
        while queue:
            if queue[0][0] > clock:                      # idle: jump to the next arrival
                clock = queue[0][0]
            batch = [r for r in queue if r[0] <= clock][: self.max_batch_size]
            queue = [r for r in queue if r not in batch]
            clock = self._run_batch(batch, clock, steps, rows_done, step_time)
            bar.update(len(batch))
        bar.close()
        for (i, j), (tokens, times, reason, end) in sorted(rows_done.items()):
            out = outputs[i]
            text = self.tokenizer.decode(tokens) if self.tokenizer is not None else None
            out.outputs.append(CompletionOutput(j, tokens, text, reason, times))
            m = out.metrics or RequestMetrics(arrival_time=arrivals[i], first_scheduled_time=times[0],
                                              first_token_time=times[0], finished_time=end)
            m.first_token_time, m.finished_time = min(m.first_token_time, times[0]), max(m.finished_time, end)
            m.num_output_tokens += len(tokens)
            out.metrics = m
        self.metrics = summarize("static", outputs, steps, clock - min(arrivals, default=0.0))
        return outputs

    @torch.no_grad()
    def _run_batch(self, batch, clock: float, steps: list[StepRecord], rows_done: dict,
                   step_time: float | None = None) -> float:
        """Prefill the padded batch, decode until every row is done. Returns the clock at the end."""
        model, device = self.model, self.model.device
        lens = [len(r[3]) for r in batch]
        S = max(lens)
        # every row stops at its max_tokens or at the context limit; the batch runs until the last one stops
        budgets = [min(p.max_tokens, self.max_model_len - n) for (_, _, _, _, p), n in zip(batch, lens)]
        steps_needed = max(budgets)
        pads = [S - n for n in lens]
        cache = PaddedKVCache(model.config, pads, S + steps_needed, dtype=model.dtype, device=device)
        reserved_blocks = -(-len(batch) * (S + steps_needed) // self.block_size)
        seeds = [p.seed + j if p.seed is not None else self.seed + i for (_, i, j, _, p) in batch]
        ids = torch.tensor([[PAD_ID] * pad + r[3] for pad, r in zip(pads, batch)], device=device)      # [B, S]
        pad_t = torch.tensor(pads, device=device)
        positions = (torch.arange(S, device=device)[None, :] - pad_t[:, None]).clamp(min=0)           # [B, S]
        tokens = [[] for _ in batch]
        times = [[] for _ in batch]
        done = [False] * len(batch)
        for step in range(steps_needed):
            _synchronize(device)
            t0 = time.perf_counter()
            logits = model(ids, cache=cache, positions=positions, last_token_only=True)[:, -1]         # [B, V]
            params = [r[4] for r in batch]
            sampled = sample_tokens(logits, params, seeds, [len(t) for t in tokens]).tolist()   # one copy
            active = [not d for d in done]
            for b, p in enumerate(params):
                if done[b]:
                    continue
                tok = sampled[b]
                tokens[b].append(tok)
                done[b] = tok in p.stop_token_ids or len(tokens[b]) >= budgets[b]
            ids = torch.tensor([[t[-1] if t else PAD_ID] for t in tokens], device=device)            # [B, 1]
            positions = (cache.length - pad_t)[:, None]
            _synchronize(device)
            duration = time.perf_counter() - t0 if step_time is None else step_time
            for b in range(len(batch)):
                if active[b]:
                    times[b].append(clock + duration)
            n_active = sum(active)
            steps.append(StepRecord(
                start=clock, duration=duration, num_prefill_tokens=sum(lens) if step == 0 else 0,
                num_decode_tokens=n_active if step else 0, num_running=len(batch), blocks_used=reserved_blocks,
                num_padding_tokens=sum(pads) if step == 0 else len(batch) - n_active,
                composition=[(r[1], S if step == 0 else 1) for r in batch]))
            clock += duration
            if all(done):
                break
        for b, r in enumerate(batch):
            reason = "stop" if tokens[b] and tokens[b][-1] in r[4].stop_token_ids else "length"
            rows_done[(r[1], r[2])] = (tokens[b], times[b], reason, clock)
        return clock
