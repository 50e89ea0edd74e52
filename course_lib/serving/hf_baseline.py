"""The baseline of the "14-24x" claim (lesson 10): Hugging Face ``transformers`` ``generate()`` in static batches.

vLLM's launch post (June 2023) reported 14-24x the throughput of Hugging Face Transformers ("HF") and 2.2-2.5x
that of HF's Text Generation Inference with one completion per request (8.5-15x and 3.3-3.5x with three parallel
completions: its "up to 3.5x"), on LLaMA-7B / 13B with ShareGPT-like requests. The HF baseline of
that claim is ``model.generate`` called on batches of requests. This module runs it on the **same weights**
(``LlamaForCausalLM.from_pretrained`` on the checkpoint folder the engine loaded), the same trace, device and
dtype, and measures it with the engine's metrics (``course_lib.serving.metrics``), so that the ratio means something:

* **Static batches** of ``batch_size`` requests in arrival order; prompts **left-padded** to the longest one
  (with an ``attention_mask``, HF's way); greedy; EOS ignored (the model's ``eos_token_id`` is unset, as vLLM's
  benchmarks set ``ignore_eos``), so every request gets exactly its requested number of tokens.
* Each batch runs ``max_new_tokens`` = its longest request's output: ``generate`` cannot drop a finished row
  (it keeps computing it), and the next batch starts only when ``generate`` returns. A padded row can thus run
  past the model's context (a long prompt padded beside a long output; transformers warns): those tokens are
  past the row's own length, so they are computed but not counted.
* **Useful tokens only**: each row's output is cut at its own requested length. Tokens computed past it, and
  the pad tokens, cost time but are not counted (``static_batch_accounting`` counts both kinds of waste).
* **Times**: a streamer records when each step's tokens come out (``put`` is called once per step; on a GPU it
  synchronizes first). TTFT runs from a request's arrival to its first token (waiting behind earlier batches
  included); a response is complete when ``generate`` returns, as with ``StaticBatchEngine``.
* **Batch size**: ``kv_budget_batch_size`` -- how many contiguous KV reservations of the model's full context
  fit the KV budget the engine gets. A server that does not know how long an output will be must reserve the
  maximum for each request (the vLLM paper, section 3, on FasterTransformer and Orca; HF's ``StaticCache`` with
  ``max_cache_len`` = the context). HF's default ``DynamicCache`` grows instead, so ``batch_size`` can be set
  larger, to see how much of the gap is memory and how much is lockstep decoding.
"""
from __future__ import annotations

import copy
import time

import torch

from course_lib.serving.engine import _synchronize
from course_lib.serving.metrics import (CompletionOutput, RequestMetrics, RequestOutput, RunMetrics, StepRecord,
                                       summarize)
from course_lib.serving.validation import check_call, check_request


def kv_budget_batch_size(kv_budget_tokens: int, max_model_len: int) -> int:
    """Requests that fit a KV budget of ``kv_budget_tokens`` token slots when each reserves ``max_model_len``
    contiguous slots (its possible maximum): ``kv_budget_tokens // max_model_len``."""
    if kv_budget_tokens < max_model_len:
        raise ValueError(f"kv_budget_tokens ({kv_budget_tokens}) must hold at least one full context "
                         f"({max_model_len} tokens): a reservation scheme could not serve a long request")
    return kv_budget_tokens // max_model_len


def static_batch_accounting(prompt_lens, output_lens, batch_size: int) -> dict:
    """Token slots that static batches of ``batch_size`` (in order) compute, and how many of them are useful.

    A batch of prompts P_b and outputs O_b computes B * max(P_b) prompt slots (left padding included) and
    B * max(O_b) output slots (rows that finished keep going). Returns the totals: ``useful_output_tokens``
    (sum of the requested outputs), ``computed_output_slots``, ``padding_prompt_slots``, ``num_batches``,
    ``decode_steps`` (sum over batches of max(O_b)) and ``useful_fraction`` of the output slots."""
    prompt_lens, output_lens = list(map(int, prompt_lens)), list(map(int, output_lens))
    if len(prompt_lens) != len(output_lens):
        raise ValueError(f"prompt_lens ({len(prompt_lens)}) and output_lens ({len(output_lens)}) differ in length")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    computed = padding = steps = 0
    for start in range(0, len(prompt_lens), batch_size):
        p, o = prompt_lens[start:start + batch_size], output_lens[start:start + batch_size]
        computed += len(o) * max(o)
        padding += len(p) * max(p) - sum(p)
        steps += max(o)
    useful = sum(output_lens)
    return dict(num_batches=-(-len(prompt_lens) // batch_size), decode_steps=steps, useful_output_tokens=useful,
                computed_output_slots=computed, padding_prompt_slots=padding,
                useful_fraction=useful / computed if computed else float("nan"))


def load_hf_model(path, *, dtype: torch.dtype, device: torch.device | str):
    """``transformers.AutoModelForCausalLM.from_pretrained(path)`` in ``dtype`` on ``device``, eval mode, its
    default attention (SDPA), EOS unset (see the module docstring)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    model.generation_config = copy.deepcopy(model.generation_config)
    model.generation_config.eos_token_id = None
    return model


class _StepTimes:
    """A ``generate`` streamer that only records when each step's tokens come out (the first put is the prompt)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def put(self, value) -> None:
        _synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFStaticBatchBaseline:
    """``transformers`` ``generate()`` on static batches of ``batch_size``, with ``LLMEngine``'s interface
    (``generate(prompts, params, arrival_times=...)`` -> RequestOutputs, ``.metrics``). Greedy only."""

    def __init__(self, hf_model, *, batch_size: int, pad_token_id: int = 0, block_size: int = 16,
                 max_model_len: int | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model, self.batch_size, self.pad_token_id = hf_model, batch_size, pad_token_id
        self.block_size = block_size          # only to report the contiguous KV in the engine's unit (blocks)
        self.vocab_size = hf_model.config.vocab_size
        # the context requests must fit (default the checkpoint's; an engine run with a shorter one passes it)
        self.max_model_len = max_model_len or hf_model.config.max_position_embeddings
        self.metrics: RunMetrics | None = None

    def generate(self, prompts, params=None, *, arrival_times=None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        prompts, params_list, arrivals = check_call(prompts, params, arrival_times)
        outputs, queue = [], []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            ids, p, error = check_request(i, prompt, p, vocab_size=self.vocab_size, max_model_len=self.max_model_len)
            if error is None and (not p.greedy or p.n != 1 or p.stop_token_ids):
                error = ValueError(f"request {i}: params: the HF baseline is greedy, n = 1, no stop tokens (it "
                                   f"ignores EOS), got temperature={p.temperature}, n={p.n}, "
                                   f"stop_token_ids={p.stop_token_ids}")
            outputs.append(RequestOutput(i, ids, error=error, finished=True))   # returned when done
            if error is None:
                queue.append((arrivals[i], i, ids, p))
        queue.sort(key=lambda r: (r[0], r[1]))
        clock, steps = 0.0, []
        while queue:
            clock = max(clock, queue[0][0])           # idle: jump to the next arrival
            batch = [r for r in queue if r[0] <= clock][: self.batch_size]
            queue = queue[len(batch):]
            clock = self._run_batch(batch, clock, steps, outputs)
        self.metrics = summarize("hf-generate", outputs, steps, clock - min(arrivals, default=0.0))
        return outputs

    @torch.no_grad()
    def _padded_generate(self, batch, max_new_tokens: int) -> tuple[list[list[int]], list[float], float, float]:
        """One batch the way ``transformers`` serves it: the prompts left-padded to the longest, an attention mask
        that hides the pads, one greedy ``generate`` call (EOS ignored) of ``max_new_tokens``. Returns each row's
        new tokens [B, <= max_new_tokens], when each step's tokens came out, and when the call started and
        returned (``time.perf_counter``)."""
        device = self.model.device
        S = max(len(r[2]) for r in batch)
        pads = [S - len(r[2]) for r in batch]
        ids = torch.tensor([[self.pad_token_id] * pad + r[2] for pad, r in zip(pads, batch)], device=device)  # [B, S]
        mask = (torch.arange(S, device=device)[None, :] >= torch.tensor(pads, device=device)[:, None]).long()
        streamer = _StepTimes(device)
        _synchronize(device)
        t0 = time.perf_counter()
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=None, pad_token_id=self.pad_token_id,
                                  streamer=streamer)
        _synchronize(device)
        return out[:, S:].tolist(), streamer.times, t0, time.perf_counter()

    def _run_batch(self, batch, clock: float, steps: list[StepRecord], outputs: list[RequestOutput]) -> float:
        """Run one static batch (``_padded_generate``) and account for it: its steps, each row's useful tokens
        (cut at the row's own length) and times. Returns the clock when the batch returned."""
        lens = [len(r[2]) for r in batch]
        S = max(lens)
        budgets = [min(p.max_tokens, self.max_model_len - n) for (_, _, _, p), n in zip(batch, lens)]
        T = max(budgets)
        pads = [S - n for n in lens]
        new, step_times, t0, t1 = self._padded_generate(batch, T)                   # new: [B, <= T]
        end = clock + t1 - t0
        times = [clock + t - t0 for t in step_times[1:]]                            # when each step's tokens came
        reserved_blocks = -(-len(batch) * (S + T) // self.block_size)
        for k, t in enumerate(times):
            start = clock if k == 0 else times[k - 1]
            active = sum(k < b for b in budgets)
            steps.append(StepRecord(start=start, duration=t - start, num_prefill_tokens=sum(lens) if k == 0 else 0,
                                    num_decode_tokens=active if k else 0, num_running=len(batch),
                                    blocks_used=reserved_blocks,
                                    num_padding_tokens=sum(pads) if k == 0 else len(batch) - active))
        for b, (arrival, i, _, _) in enumerate(batch):
            tokens = new[b][:budgets[b]]                        # useful: the row's own length, no more
            outputs[i].outputs = [CompletionOutput(0, tokens, None, "length", times[:len(tokens)])]
            outputs[i].metrics = RequestMetrics(arrival_time=arrival, first_scheduled_time=clock,
                                                first_token_time=times[0], finished_time=end,
                                                num_output_tokens=len(tokens))
        return end
